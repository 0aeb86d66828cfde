// The residual stream at the explained position: its norm, what each block wrote, and the lens's
// probability of the target; lines grow as each block finishes during the pass.
import { $, canvasFigure, clip, css, drawLines, emptyCanvas } from "../draw.js";

export default {
  id: "resid",
  title: "Residual stream",
  subtitle: "norms at the explained position",
  readsAnalysis: true,
  body: `<canvas id="resid-chart" class="figure"></canvas>`,

  init({ lab }) { this.lab = lab; this.live = []; },

  analysisStarted() { this.live = []; },

  layer(m) { this.live[m.layer] = m; return true; },

  drawLive() {
    const { position: p, n_layers: n } = this.live.find(Boolean);
    const at = (f) => Array.from({ length: n }, (_, l) => (this.live[l] && this.live[l][f] ? this.live[l][f][p] : null));
    drawLines($("resid-chart"), Array.from({ length: n }, (_, l) => `L${l}`), [
      { label: "|resid|", values: at("resid_norm"), color: css("--accent") },
      { label: "|attn out|", values: at("attn_norm"), color: css("--attn") },
      { label: "|mlp out|", values: at("mlp_norm"), color: css("--mlp") },
    ]);
  },

  render() {
    if (this.lab.streaming) { if (this.live.length) this.drawLive(); return; }  // mid-pass (a theme change): keep the live rows
    const canvas = $("resid-chart"), a = this.lab.analysis;
    const res = a && a.residual;
    if (!res) { emptyCanvas(canvas, "run an analysis"); return; }
    const p = a.position;
    drawLines(canvas, res.rows, [
      { label: "|resid|", values: res.resid_norm.map((row) => row[p]), color: css("--accent") },
      { label: "|attn out|", values: [null, ...res.attn_delta_norm.map((row) => row[p])], color: css("--attn") },
      { label: "|mlp out|", values: [null, ...res.mlp_delta_norm.map((row) => row[p])], color: css("--mlp") },
      { label: "p(target), lens", values: a.logit_lens.layers.map((l) => l.target_prob), color: css("--sel"), axis: "right" },
    ]);
  },

  figure(panel) { return canvasFigure(panel, $("resid-chart"), `${this.title} — ${this.lab.analysis ? clip(this.lab.analysis.prompt, 90) : ""}`); },
};
