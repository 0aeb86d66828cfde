// The logit lens: the top token per layer × position; during the pass, the explained column fills
// in as each block finishes.
import { $, canvasFigure, clip, css, drawGrid, emptyCanvas, hover, rowNames, sequential, showTok } from "../draw.js";
import { set } from "../store.js";

export default {
  id: "lens",
  title: "Logit lens",
  subtitle: "top token per layer × position · target rank (and through the tuned lens, when on)",
  readsAnalysis: true,
  body: `<div class="scroll"><canvas id="lens-grid" class="figure"></canvas></div>`,

  init({ lab, analyse }) {
    this.lab = lab; this.live = [];
    hover($("lens-grid"), (h) => this.describe(h), (h) => {
      if (lab.streaming || !lab.analysis) return;
      set({ pos: lab.analysis.residual.lens_positions[h.c] });
      analyse();
    });
  },

  analysisStarted() { this.live = []; },

  layer(m) { this.live[m.layer] = m; return true; },  // the explained position's lens after block m.layer, read during the pass

  drawLive() {
    const m = this.live.find(Boolean);
    drawGrid($("lens-grid"), {
      rows: m.n_layers, cols: 1, cw: 120, ch: 16, rowLabels: rowNames(m.n_layers), colLabels: [`position ${m.position}`],
      color: (r) => (this.live[r] ? sequential(this.live[r].lens[0].prob) : css("--bg")),
      text: (r) => (this.live[r] ? `${showTok(this.live[r].lens[0].token)} ${this.live[r].lens[0].prob.toFixed(2)}` : ""),
    });
  },

  render() {
    if (this.lab.streaming) { if (this.live.length) this.drawLive(); return; }  // mid-pass (a theme change): keep the live rows
    const canvas = $("lens-grid"), a = this.lab.analysis;
    const res = a && a.residual, lens = a && a.logit_lens, tuned = a && a.tuned_lens;
    if (!res || !lens) { emptyCanvas(canvas, "run an analysis"); return; }
    const cols = res.lens_positions, nRows = res.rows.length;
    const fit = Math.floor((canvas.parentElement.clientWidth - 150) / cols.length);  // fit the panel when cells stay readable
    const cw = Math.max(30, Math.min(58, fit));
    drawGrid(canvas, {
      rows: nRows, cols: cols.length, cw, ch: 16, rotate: true,
      rowLabels: res.rows, colLabels: cols.map((p) => showTok(a.tokens[p])),
      color: (r, c) => sequential(res.lens_top_probs[r][c]),
      text: (r, c) => showTok(res.lens_top_tokens[r][c]),
      markCol: cols.indexOf(a.position), mark: [],
      extraW: tuned ? 230 : 90,
      extra: (ctx, x, y, ch) => {
        ctx.textAlign = "left";
        ctx.fillStyle = css("--dim");
        ctx.fillText(`rank of ${clip(showTok(lens.target.token), 8)}`, x, y - 9);
        if (tuned) ctx.fillText("tuned: rank, p, top · KL bits", x + 90, y - 9);
        lens.layers.forEach((row, r) => {
          ctx.fillStyle = row.target_rank === 0 ? css("--accent") : css("--fg");
          ctx.fillText(`${String(row.target_rank).padStart(5)}  ${row.target_prob.toFixed(2)}`, x, y + r * ch + ch / 2);
          const t = tuned && tuned.layers[r];
          if (!t) return;
          const kl = tuned.held_out_kl_bits ? ` ${tuned.held_out_kl_bits.tuned[r].toFixed(1)}` : "";
          ctx.fillStyle = t.target_rank === 0 ? css("--accent") : css("--fg");
          ctx.fillText(`${String(t.target_rank).padStart(5)}  ${t.target_prob.toFixed(2)} ${clip(showTok(t.top[0].token), 8)}${kl}`, x + 90, y + r * ch + ch / 2);
        });
      },
    });
    const [x] = canvas.cellCenter(0, Math.max(0, cols.indexOf(a.position)));
    canvas.parentElement.scrollLeft = Math.max(0, x + 130 - canvas.parentElement.clientWidth);  // the explained column and ranks in view
  },

  describe({ r, c }) {
    const a = this.lab.analysis;
    if (this.lab.streaming) {
      const m = this.live[r];
      return m ? [`after L${r}, position ${m.position} (live)`, ...m.lens.map((t) => `  ${t.prob.toFixed(3)} ${showTok(t.token)}`)].join("\n") : "";
    }
    if (!a) return "";
    const res = a.residual, pos = res.lens_positions[c];
    const lines = [`after ${res.rows[r]}, position ${pos} ${showTok(a.tokens[pos])}`, `top: ${showTok(res.lens_top_tokens[r][c])} ${res.lens_top_probs[r][c].toFixed(3)}`];
    if (pos === a.position) {
      const row = a.logit_lens.layers[r];
      lines.push(`target ${showTok(a.logit_lens.target.token)}: rank ${row.target_rank}, p=${row.target_prob.toFixed(3)}`);
      for (const t of row.top) lines.push(`  ${t.prob.toFixed(3)} ${showTok(t.token)}`);
      const t = a.tuned_lens && a.tuned_lens.layers[r];
      if (t) {
        lines.push(`tuned lens: rank ${t.target_rank}, p=${t.target_prob.toFixed(3)}`);
        for (const x of t.top) lines.push(`  ${x.prob.toFixed(3)} ${showTok(x.token)}`);
      }
    }
    return lines.join("\n");
  },

  figure(panel) { return canvasFigure(panel, $("lens-grid"), `${this.title} — ${this.lab.analysis ? clip(this.lab.analysis.prompt, 90) : ""}`); },
};
