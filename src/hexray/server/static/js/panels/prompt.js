// The prompt, the explained token and the presets: what every analysis starts from.
import { $, sequential, showTok } from "../draw.js";
import { bind, set, state, subscribe } from "../store.js";

const FORM = { prompt: "prompt", granularity: "granularity", target: "target", contrast: "contrast", dict: "dict" };  // element id -> state key

export default {
  id: "prompt",
  wide: true,
  body: `
  <div class="row">
    <label for="preset">preset</label><select id="preset"><option value="">—</option></select>
    <label for="granularity">granularity</label>
    <select id="granularity"><option>head</option><option>layer</option><option>neuron</option></select>
    <label for="target">target</label><input id="target" size="10" placeholder="prediction" spellcheck="false">
    <label for="contrast">contrast</label><input id="contrast" size="10" placeholder="none" spellcheck="false">
    <label for="dict" title="a sparse dictionary: each token's features (hover a token), and its site split into features in the attribution">features</label>
    <select id="dict"><option value="">—</option></select>
    <label title="the logit lens through the model's tuned lens (hexray lens train), beside the logit lens"><input id="tuned" type="checkbox" disabled> tuned lens</label>
    <button id="run" type="button" class="primary">Analyse ▸</button>
    <button id="run-stop" type="button" data-stop="analysis" disabled title="stop the analysis">■ stop</button>
    <span class="queue dim" id="analysis-queue"></span>
  </div>
  <textarea id="prompt" rows="2" spellcheck="false" placeholder="Type a prompt, or pick a preset"></textarea>
  <div id="live-layers" class="live" title="the lens at the explained position after each block, as the forward pass runs"></div>
  <div id="preset-expected" class="dim"></div>
  <div id="error" class="error" role="alert" hidden></div>`,

  init({ analyse, channel }) {
    for (const [id, key] of Object.entries(FORM)) {
      if (id !== "dict") bind($(id), key);  // the dictionaries arrive with configure(); binding now would drop a shared URL's choice
      $(id).addEventListener("input", () => {
        set({ [key]: $(id).value });
        const p = (this.presets || []).find((x) => x.name === state.preset);
        if (p && key !== "dict" && (state.prompt !== p.prompt || state.target !== (p.target || "") || state.contrast !== (p.contrast || ""))) {
          set({ preset: "" });  // edited away from the preset: its expected circuit no longer applies
          $("preset").value = "";
          this.explain("");
        }
      });
    }
    const fresh = () => { set({ pos: null }); analyse(); };
    $("tuned").addEventListener("change", () => set({ tuned: $("tuned").checked }));
    $("run").addEventListener("click", fresh);
    $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) fresh(); });
    $("run-stop").addEventListener("click", () => channel("analysis").stop());
    $("preset").addEventListener("change", (e) => this.apply(e.target.value, analyse));
    this.sync = () => { for (const [id, key] of Object.entries(FORM)) if ($(id).value !== state[key]) $(id).value = state[key]; };
    subscribe(this.sync);  // a candidate's "target" button or a preset changes the state, and the form follows
  },

  analysisStarted() { this.live = []; $("live-layers").replaceChildren(); },

  layer(m) { (this.live ??= [])[m.layer] = m; return true; },

  drawLive() {  // one cell a block: its lens top token at the explained position, shaded by probability
    const box = $("live-layers");
    const n = this.live.find(Boolean).n_layers;
    if (box.children.length !== n) {
      box.replaceChildren(...Array.from({ length: n }, (_, l) => { const c = document.createElement("span"); c.dataset.layer = String(l); return c; }));
    }
    this.live.forEach((m, l) => {
      const cell = box.children[l];
      if (!m || cell.textContent) return;
      const top = m.lens[0];
      cell.textContent = showTok(top.token) || "·";
      cell.title = `after L${l}: ${showTok(top.token)} ${top.prob.toFixed(3)}`;
      cell.style.background = sequential(top.prob);
    });
  },

  request() { return { ...(state.dict ? { dict: state.dict } : {}), ...(state.tuned && this.tunedLens ? { tuned_lens: true } : {}) }; },

  configure({ presets, dictionaries = [], tunedLens = false }) {
    this.tunedLens = tunedLens;  // without a trained lens the server would refuse the request
    $("tuned").disabled = !tunedLens;
    $("tuned").checked = tunedLens && state.tuned;
    if (!tunedLens) $("tuned").parentElement.title = "no tuned lens for this model yet: hexray lens train (or hexray dict defaults)";
    $("dict").append(...dictionaries.map((d) => {
      const o = document.createElement("option");
      o.value = d.use;
      o.textContent = `${d.use} (${d.latents})`;
      o.title = d.quality ? `FVU ${d.quality.fvu.toFixed(3)}, L0 ${d.quality.l0.toFixed(1)}, loss recovered ${d.quality.loss_recovered.toFixed(3)}` : d.kind;
      return o;
    }));
    bind($("dict"), "dict");
    this.presets = presets;
    $("preset").append(...presets.map((p) => { const o = document.createElement("option"); o.value = p.name; o.textContent = p.title; return o; }));
    if (state.preset) { $("preset").value = state.preset; this.explain(state.preset); }
  },

  explain(name) {
    const p = (this.presets || []).find((x) => x.name === name);
    $("preset-expected").textContent = p ? `expected circuit: ${p.expected}` : "";
  },

  apply(name, analyse) {
    const p = (this.presets || []).find((x) => x.name === name);
    if (!p) { set({ preset: "" }); this.explain(""); return; }
    set({ preset: name, prompt: p.prompt, target: p.target || "", contrast: p.contrast || "", clean: p.clean || p.prompt, corrupt: p.corrupt || "",
      components: p.components || state.components, pos: null, head: null });
    this.explain(name);
    analyse();
  },
};
