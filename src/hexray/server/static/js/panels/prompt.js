// The prompt, the explained token and the presets: what every analysis starts from.
import { $ } from "../draw.js";
import { set, state, subscribe } from "../store.js";

const FORM = { prompt: "prompt", granularity: "granularity", target: "target", contrast: "contrast" };  // element id -> state key

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
    <button id="run" type="button" class="primary">Analyse ▸</button>
    <button id="run-stop" type="button" data-stop="analysis" disabled title="stop the analysis">■ stop</button>
    <span class="queue dim" id="analysis-queue"></span>
  </div>
  <textarea id="prompt" rows="2" spellcheck="false" placeholder="Type a prompt, or pick a preset"></textarea>
  <div id="preset-expected" class="dim"></div>
  <div id="error" class="error" role="alert" hidden></div>`,

  init({ analyse, channel }) {
    for (const [id, key] of Object.entries(FORM)) {
      $(id).value = state[key];
      $(id).addEventListener("input", () => set({ [key]: $(id).value }));
    }
    const fresh = () => { set({ pos: null }); analyse(); };
    $("run").addEventListener("click", fresh);
    $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) fresh(); });
    $("run-stop").addEventListener("click", () => channel("analysis").stop());
    $("preset").addEventListener("change", (e) => this.apply(e.target.value, analyse));
    this.sync = () => { for (const [id, key] of Object.entries(FORM)) if ($(id).value !== state[key]) $(id).value = state[key]; };
    subscribe(this.sync);  // a candidate's "target" button or a preset changes the state, and the form follows
  },

  configure({ presets }) {
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
