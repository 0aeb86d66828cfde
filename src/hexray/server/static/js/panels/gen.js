// Generation, live: each token as it is made, with the components that wrote it; ■ stop keeps
// what was made so far.
import { $, css, fmt, mix, showTok, textFigure, wrap } from "../draw.js";
import { ran, set, state } from "../store.js";
import { unitLabel } from "../units.js";

export default {
  id: "gen",
  title: "Generation",
  subtitle: "live: each token with the components (and, with a dictionary, the features) that wrote it · click a head, neuron or feature: its card",
  wide: true,
  body: `<div class="row">
    <label for="max-new">tokens</label><input id="max-new" type="number" min="1" max="256" value="32" class="num">
    <label for="watch">watch</label><input id="watch" size="22" placeholder="L23H3, MLP29" spellcheck="false">
    <label><input id="chat" type="checkbox"> chat template</label>
    <button id="gen-run" type="button">Generate ▸</button>
    <button id="gen-stop" type="button" data-stop="gen" disabled>■ stop</button>
  </div>
  <div id="gen-text" class="gen-text"></div>
  <div id="gen-detail" class="gen-detail"></div>`,

  init({ lab, job, channel, status }) {
    this.lab = lab; this.job = job; this.status = status; this.tokens = [];
    if (state.max_new) $("max-new").value = state.max_new;
    $("watch").value = state.watch;
    $("chat").checked = state.chat;
    $("max-new").addEventListener("input", () => set({ max_new: $("max-new").value }));
    $("watch").addEventListener("input", () => set({ watch: $("watch").value }));
    $("chat").addEventListener("change", () => set({ chat: $("chat").checked }));
    $("gen-run").addEventListener("click", () => this.run());
    $("gen-stop").addEventListener("click", () => channel("gen").stop());
  },

  configure({ options }) {  // one source of defaults: the server's options
    const maxNew = options.generate.find((o) => o.name === "max_new_tokens");
    if (maxNew && !state.max_new) $("max-new").value = maxNew.default;
  },

  restore() { return this.run(); },

  async run() {
    const body = { prompt: state.prompt, max_new_tokens: Number($("max-new").value), chat: state.chat };
    if (state.watch.trim()) body.watch = state.watch;
    if (state.dict) body.features = state.dict;  // the prompt panel's dictionary: each token's features, streamed
    ran("gen");
    this.tokens = [];
    const box = $("gen-text");
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = body.chat ? "" : body.prompt;
    box.replaceChildren(prompt);
    $("gen-detail").textContent = "";
    $("gen-run").disabled = true;
    this.status("generating…");
    const done = await this.job("gen", "/ws/generate", body, (m) => this.token(m));
    $("gen-run").disabled = false;
    this.lab.docs["gen-panel"] = done ? { ...done, type: undefined } : { tokens: this.tokens, done: false };
    this.status(done ? `generated ${this.tokens.length} tokens (${done.stop_reason})` : `stopped after ${this.tokens.length} tokens`);
  },

  token(m) {
    this.tokens.push(m);
    const span = document.createElement("span");
    span.className = "gtok" + (m.crossed.length ? " crossed" : "");
    span.dataset.index = String(m.index);
    span.textContent = m.token;
    span.style.background = mix(css("--cell"), css("--accent"), 0.5 * (1 - m.prob));  // shaded by surprise
    span.addEventListener("click", () => this.show(m.index));
    $("gen-text").append(span);
    this.show(m.index);
    this.status(`generating… ${m.index + 1} tokens`);
  },

  show(index) {
    const m = this.tokens[index];
    if (!m) return;
    for (const el of $("gen-text").querySelectorAll(".gtok.sel")) el.classList.remove("sel");
    const el = $("gen-text").querySelector(`.gtok[data-index="${index}"]`);
    if (el) el.classList.add("sel");
    // the same text as before, with each head, neuron and feature a label that opens its neuroscope card
    const labels = (items, name, value, sep = "  ") => items.flatMap((x, i) => [...(i ? [sep] : []), unitLabel(name(x)), value(x)]);
    const parts = [`#${m.index} ${showTok(m.token)}  p=${m.prob.toFixed(3)}  top: `, ...labels(m.top, (c) => c.name, (c) => ` ${fmt(c.score, 2)}`)];
    const watched = Object.entries(m.watch);
    if (watched.length) parts.push("\nwatched: ", ...labels(watched, ([k]) => k, ([, v]) => ` ${fmt(v)}`));
    if (m.crossed.length) parts.push("  crossed: ", ...labels(m.crossed, (k) => k, () => "", ", "));
    if ((m.features || []).length) parts.push("\nfeatures: ", ...labels(m.features, (f) => f.label, (f) => ` ${fmt(f.activation, 2)} (${fmt(f.attribution, 2)})`));
    $("gen-detail").replaceChildren(...parts);
  },

  figure() { return this.tokens.length && textFigure([...wrap($("gen-text").textContent, 160), ...$("gen-detail").textContent.split("\n")]); },
};
