// Direct logit attribution: layers × heads (+ MLP), filled layer by layer as the stream arrives.
import { $, LEGEND, canvasFigure, diverging, drawGrid, emptyCanvas, fmt, hover, listItems, maxAbs, rowNames } from "../draw.js";
import { set, state, subscribe } from "../store.js";
import { unitName } from "../units.js";

export function headGrid(doc) {
  // rows = layers; columns = heads (or one attention column when the granularity has none), then MLP
  const info = doc.model_info;
  const heads = doc.head_scores;
  const nHeadCols = heads ? info.n_heads : 1;
  const cell = (r, c) => (c < nHeadCols ? (heads ? heads[r][c] : doc.layer_totals.attn[r]) : doc.layer_totals.mlp[r]);
  return { info, heads, nHeadCols, cell };
}

export function parseHead(name) {
  const m = /^L(\d+)H(\d+)$/.exec(name || "");
  return m ? [Number(m[1]), Number(m[2])] : [null, null];
}

export default {
  id: "dla",
  title: "Direct logit attribution",
  subtitle: "layers × heads + MLP · click a head · shift-click: add to ablation · click a row: its neuroscope card",
  readsAnalysis: true,
  body: `<div id="sumcheck" class="sumcheck"></div><div class="legend dim"></div>
  <div class="scroll"><canvas id="dla-map" class="figure"></canvas></div><ol id="dla-top" class="toplist"></ol>`,

  init({ lab }) {
    this.lab = lab;
    this.partial = [];
    this.root = $("dla-panel");
    this.root.querySelector(".legend").textContent = LEGEND;
    hover($("dla-map"), (h) => (lab.analysis ? this.describe(h) : ""), (h, e) => lab.analysis && this.click(h, e));
    subscribe((changed) => { if (changed.includes("head") && lab.analysis) this.render(); });
  },

  analysisStarted() { this.partial = []; },

  attribution(m) { this.partial[m.layer] = m; return true; },

  drawLive() {  // the layers whose heads have arrived; the rest blank
    const m = this.partial.find(Boolean);
    const nHeads = m.heads ? m.heads.length : 1;
    const row = (r) => this.partial[r];
    const cell = (r, c) => (row(r) ? (c < nHeads ? (m.heads ? row(r).heads[c] : row(r).attn) : row(r).mlp) : null);
    this.drawMap(m.n_layers, nHeads, m.heads ? Array.from({ length: nHeads }, (_, i) => `H${i}`) : ["attn"], cell);
  },

  drawMap(nLayers, nHeadCols, headLabels, cell, mark = []) {
    const values = [];
    for (let r = 0; r < nLayers; r++) for (let c = 0; c <= nHeadCols; c++) values.push(cell(r, c));
    const scale = maxAbs(values);
    drawGrid($("dla-map"), {
      rows: nLayers, cols: nHeadCols + 1, cw: 30, ch: 16, gapBefore: nHeadCols,
      rowLabels: rowNames(nLayers), colLabels: [...headLabels, "MLP"], color: (r, c) => diverging(cell(r, c), scale), mark,
    });
    return scale;
  },

  render() {
    if (this.lab.streaming && this.partial.length) { this.drawLive(); return; }
    const analysis = this.lab.analysis;
    if (!analysis) { emptyCanvas($("dla-map"), "run an analysis"); return; }
    const { info, heads, nHeadCols, cell } = headGrid(analysis);
    const [sl, sh] = parseHead(state.head);
    const headLabels = heads ? Array.from({ length: nHeadCols }, (_, i) => `H${i}`) : ["attn"];
    const scale = this.drawMap(info.n_layers, nHeadCols, headLabels, cell, [{ r: sl, c: sh }]);
    const err = analysis.reconstruction_error;
    const s = $("sumcheck");
    s.replaceChildren();
    const ok = document.createElement("span");
    ok.className = "ok";
    ok.textContent = err < 1e-3 ? "✓ " : "✗ ";
    s.append(ok, `the ${analysis.components.length} parts (heads, MLPs, embeddings, biases) add up to ${analysis.value.toFixed(4)} = the ${analysis.contrast ? "logit difference" : "logit"}; error ${err.toExponential(1)} · scale ±${scale.toFixed(2)}`);
    listItems($("dla-top"), analysis.components.slice(0, 12).map((c) => ({ text: `${c.name.padEnd(9)} ${fmt(c.score)}`, score: c.score, unit: unitName(c.name) })));
  },

  describe({ r, c }) {
    const { nHeadCols, heads, cell } = headGrid(this.lab.analysis);
    const name = c < nHeadCols ? (heads ? `L${r}H${c}` : `attention L${r}`) : `MLP${r}`;
    return `${name}: ${fmt(cell(r, c))}${c < nHeadCols && heads ? "\nclick: inspect the head · shift-click: add to ablation" : ""}`;
  },

  click({ r, c }, event) {
    const { nHeadCols, heads } = headGrid(this.lab.analysis);
    const name = c < nHeadCols ? (heads ? `L${r}H${c}` : null) : `MLP${r}`;
    if (!name) return;
    if (event.shiftKey) {
      const parts = state.components.split(",").map((p) => p.trim()).filter(Boolean);
      if (!parts.includes(name)) parts.push(name);
      set({ components: parts.join(", ") });
      return;
    }
    if (c < nHeadCols) set({ head: name });  // the head panel follows the state
  },

  figure(panel) { return canvasFigure(panel, $("dla-map"), `${this.title} — ${this.lab.analysis ? this.lab.analysis.prompt.slice(0, 90) : ""}`); },
};
