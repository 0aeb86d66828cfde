// Activation patching clean → corrupt: progress while the sweep runs, ■ stop, then the map.
import { $, LEGEND, canvasFigure, clip, diverging, drawGrid, emptyCanvas, fmt, hover, listItems, maxAbs, rowNames, showTok } from "../draw.js";
import { bind, ran, set, state, subscribe } from "../store.js";
import { openUnit, unitName } from "../units.js";

const FORM = { clean: "clean", corrupt: "corrupt", sweep: "sweep", method: "method" };

function grid(doc, sweep) {
  const rows = doc.results.filter((p) => p.sweep === sweep);
  const info = doc.model_info;
  if (sweep === "features") {  // thousands of latents: the 40 that matter most, as one row
    const top = [...rows].sort((a, b) => Math.abs(b.score) - Math.abs(a.score)).slice(0, 40);
    return { rows: 1, cols: top.length, rowLabels: ["features"], colLabels: top.map((p) => p.name), at: (p) => [0, top.indexOf(p)], sites: top };
  }
  if (sweep === "heads") {
    return { rows: info.n_layers, cols: info.n_heads, rowLabels: rowNames(info.n_layers), colLabels: Array.from({ length: info.n_heads }, (_, i) => `H${i}`),
      at: (p) => [p.layer, p.head], sites: rows };
  }
  const positions = [...new Set(rows.map((p) => p.position))].sort((a, b) => a - b);
  const colOf = new Map(positions.map((p, i) => [p, i]));
  const colLabels = positions.map((p) => showTok(doc.clean_tokens[p]));
  if (sweep === "heads-pos") {
    return { rows: info.n_layers * info.n_heads, cols: positions.length, colLabels,
      rowLabels: Array.from({ length: info.n_layers * info.n_heads }, (_, i) => `L${Math.floor(i / info.n_heads)}H${i % info.n_heads}`),
      at: (p) => [p.layer * info.n_heads + p.head, colOf.get(p.position)], sites: rows };
  }
  const nRows = Math.max(...rows.map((p) => p.layer)) + 1;
  return { rows: nRows, cols: positions.length, rowLabels: rowNames(nRows), colLabels, at: (p) => [p.layer, colOf.get(p.position)], sites: rows };
}

export default {
  id: "patch",
  title: "Activation patching",
  subtitle: "clean → corrupt, 1 = fully restored",
  body: `
  <div class="row"><label for="clean">clean</label><input id="clean" class="grow" spellcheck="false"></div>
  <div class="row"><label for="corrupt">corrupt</label><input id="corrupt" class="grow" spellcheck="false"></div>
  <div class="row">
    <label for="sweep">sweep</label>
    <select id="sweep"><option>heads</option><option>resid</option><option>attn</option><option>mlp</option><option>heads,resid</option><option>heads-pos</option><option title="the prompt panel's dictionary, feature by feature">features</option><option>heads,resid,features</option><option>all</option></select>
    <label for="method">method</label>
    <select id="method"><option>exact</option><option>attribution</option><option>both</option></select>
    <button id="patch-run" type="button">Patch ▸</button>
    <button id="patch-stop" type="button" data-stop="patch" disabled title="stop the sweep">■ stop</button>
    <label for="patch-view">show</label><select id="patch-view"></select>
  </div>
  <progress id="patch-progress" max="1" value="0" hidden></progress>
  <div id="patch-summary" class="sumcheck"></div><div class="legend dim"></div>
  <div class="scroll"><canvas id="patch-map" class="figure"></canvas></div>
  <ol id="patch-top" class="toplist"></ol>`,

  init({ lab, job, channel, status }) {
    this.lab = lab; this.job = job; this.status = status; this.doc = null;
    $("patch-panel").querySelector(".legend").textContent = LEGEND;
    for (const [id, key] of Object.entries(FORM)) {
      bind($(id), key);
      $(id).addEventListener("change", () => set({ [key]: $(id).value }));
      $(id).addEventListener("input", () => set({ [key]: $(id).value }));
    }
    subscribe(() => { for (const [id, key] of Object.entries(FORM)) if ($(id).value !== state[key]) $(id).value = state[key]; });
    $("patch-run").addEventListener("click", () => this.run());
    $("patch-stop").addEventListener("click", () => channel("patch").stop());
    $("patch-view").addEventListener("change", () => { set({ view: $("patch-view").value }); this.render(); });
    hover($("patch-map"), (h) => this.describe(h), (h) => {  // a head's (or feature's) cell: its neuroscope card
      const unit = unitName(this.cells && this.cells[h.r][h.c] && this.cells[h.r][h.c].name);
      if (unit) openUnit(unit);
    });
  },

  restore() { if (state.clean && state.corrupt) return this.run(); },

  async run() {
    const body = { clean: state.clean, corrupt: state.corrupt, sweep: state.sweep, method: state.method };
    if (state.target) body.target = state.target;
    if (state.contrast) body.contrast = state.contrast;
    if (state.dict) body.dict = state.dict;  // the prompt panel's dictionary: its features can be patched
    ran("patch");
    const bar = $("patch-progress");
    bar.hidden = false;
    bar.removeAttribute("value");  // indeterminate until the first progress message
    $("patch-run").disabled = true;
    this.status("patching…");
    const doc = await this.job("patch", "/ws/patch", body, (m) => { bar.max = m.total; bar.value = m.done; this.status(`patching… ${m.done}/${m.total} variants`); });
    $("patch-run").disabled = false;
    if (!doc) { bar.hidden = true; return; }
    this.doc = doc;
    this.lab.docs["patch-panel"] = doc;
    const sweeps = [...new Set(doc.results.map((p) => p.sweep))];
    const view = $("patch-view");
    view.replaceChildren(...sweeps.map((s) => { const o = document.createElement("option"); o.textContent = s; return o; }));
    if (sweeps.includes(state.view)) view.value = state.view;
    bar.max = 1; bar.value = 1;
    this.render();
    this.status(`patched ${doc.results.length} sites`);
  },

  render() {
    const canvas = $("patch-map"), doc = this.doc;
    if (!doc) { emptyCanvas(canvas, "pick clean and corrupt prompts, then Patch"); return; }
    const sweep = $("patch-view").value || doc.results[0].sweep;
    const g = grid(doc, sweep);
    this.cells = Array.from({ length: g.rows }, () => new Array(g.cols).fill(null));
    for (const p of g.sites) { const [r, c] = g.at(p); this.cells[r][c] = p; }
    const scale = maxAbs(g.sites.map((p) => p.score));
    const cw = g.cols > 40 ? Math.max(6, Math.floor(900 / g.cols)) : 26;
    drawGrid(canvas, {
      rows: g.rows, cols: g.cols, cw, ch: g.rows > 100 ? 4 : 14, rotate: sweep !== "heads",
      rowLabels: g.rowLabels, colLabels: g.colLabels, color: (r, c) => diverging(this.cells[r][c] ? this.cells[r][c].score : null, scale),
    });
    const corr = doc.correlation ? ` · attribution vs exact r=${(doc.correlation.all ?? NaN).toFixed(3)}` : "";
    $("patch-summary").textContent = `${doc.metric} of ${showTok(doc.target.token)}${doc.contrast ? ` vs ${showTok(doc.contrast.token)}` : ""}: clean ${doc.clean_value.toFixed(3)}, corrupt ${doc.corrupt_value.toFixed(3)} · ${doc.method}${corr}`;
    const top = [...g.sites].sort((a, b) => Math.abs(b.score) - Math.abs(a.score)).slice(0, 10);
    listItems($("patch-top"), top.map((p) => ({ text: `${(p.name + (p.position === null || p.position === undefined ? "" : `@${p.position}`)).padEnd(12)} ${fmt(p.score)}`, score: p.score, unit: unitName(p.name) })));
  },

  describe({ r, c }) {
    const p = this.cells && this.cells[r][c];
    if (!p) return "";
    const where = p.position === null || p.position === undefined ? "all positions" : `position ${p.position} ${showTok(this.doc.clean_tokens[p.position])}`;
    return `${p.name} at ${where}: ${fmt(p.score)}${p.attribution !== undefined ? `\nattribution estimate ${fmt(p.attribution)}` : ""}${unitName(p.name) ? "\nclick: its neuroscope card" : ""}`;
  },

  figure(panel) { return this.doc && canvasFigure(panel, $("patch-map"), `${this.title} — ${clip(this.doc.clean_prompt, 90)}`); },
};
