// Token flow: attention between token pairs, summed over every head and layer (or one layer's, on
// demand), drawn as arcs from the key a query reads up to the query.
import { $, canvasFigure, clip, css, emptyCanvas, showTok, sizeCanvas, tip } from "../draw.js";
import { ran, set, state } from "../store.js";

export default {
  id: "flow",
  title: "Token flow",
  subtitle: "attention between token pairs · arcs from key to query, width ∝ weight",
  wide: true,
  body: `<div class="row">
    <label for="flow-layer">layers</label><select id="flow-layer"><option value="">all, summed</option></select>
    <button id="flow-run" type="button">Flow ▸</button>
    <span id="flow-summary" class="dim"></span>
  </div>
  <div class="scroll"><canvas id="flow-arcs" class="figure"></canvas></div>`,

  init({ lab, job, status }) {
    this.lab = lab; this.job = job; this.status = status; this.doc = null;
    $("flow-run").addEventListener("click", () => this.run());
    $("flow-layer").addEventListener("change", () => { set({ flow_layer: $("flow-layer").value }); if (this.doc) this.run(); });
    const canvas = $("flow-arcs");
    canvas.addEventListener("mousemove", (e) => {
      const box = canvas.getBoundingClientRect();
      const i = this.tokenAt ? this.tokenAt(e.clientX - box.left, e.clientY - box.top) : null;
      tip(e, i === null ? "" : this.describe(i));
    });
    canvas.addEventListener("mouseleave", (e) => tip(e, ""));
  },

  configure() {
    const info = this.lab.info;
    if (!info) return;
    $("flow-layer").append(...Array.from({ length: info.n_layers }, (_, l) => { const o = document.createElement("option"); o.value = String(l); o.textContent = `L${l} only`; return o; }));
    $("flow-layer").value = state.flow_layer;
  },

  restore() { return this.run(); },

  async run() {
    if (!state.prompt.trim()) return;
    const body = { prompt: state.prompt, exclude_first_key: true };  // without a BOS (SmolLM2 adds none), the first word is the sink
    if (state.flow_layer !== "") body.layer = Number(state.flow_layer);
    ran("flow");
    this.status("token flow…");
    const doc = await this.job("flow", "/ws/flow", body);
    if (!doc) return;
    this.doc = doc;
    this.lab.docs["flow-panel"] = doc;
    this.render();
    this.status(`token flow over ${doc.layer === null ? "every layer" : `L${doc.layer}`}`);
  },

  render() {
    const canvas = $("flow-arcs"), doc = this.doc;
    if (!doc) { emptyCanvas(canvas, "run an analysis, then Flow"); this.tokenAt = null; return; }
    const n = doc.tokens.length;
    const step = Math.max(14, Math.min(70, Math.floor(1300 / n)));
    const left = 20, base = 250;
    const width = left * 2 + step * n, height = base + 70;
    const ctx = sizeCanvas(canvas, width, height);
    ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, width, height);
    const x = (i) => left + step * i + step / 2;
    const pairs = doc.top_pairs;
    const top = Math.max(1e-9, ...pairs.map((p) => p.weight));
    ctx.strokeStyle = css("--accent");
    for (const p of [...pairs].reverse()) {  // the strongest drawn last, on top
      const t = p.weight / top;
      const r = (x(p.query) - x(p.key)) / 2;
      ctx.globalAlpha = 0.25 + 0.75 * t;
      ctx.lineWidth = 0.5 + 5 * t;
      ctx.beginPath();
      ctx.ellipse((x(p.query) + x(p.key)) / 2, base, r, Math.min(r, base - 12), 0, Math.PI, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.globalAlpha = 1;
    ctx.fillStyle = css("--fg");
    ctx.save();
    doc.tokens.forEach((tok, i) => {
      ctx.save();
      ctx.translate(x(i), base + 8);
      ctx.rotate(Math.PI / 4);
      ctx.textAlign = "left";
      ctx.fillText(clip(showTok(tok), 10), 0, 0);
      ctx.restore();
    });
    ctx.restore();
    this.tokenAt = (px, py) => { const i = Math.floor((px - left) / step); return i >= 0 && i < n && py > base - 4 ? i : null; };
    canvas.tokenCenter = (i) => [x(i), base + 12];
    const where = doc.layer === null ? `all ${doc.n_layers} layers × ${doc.n_heads} heads` : `L${doc.layer}'s ${doc.n_heads} heads`;
    $("flow-summary").textContent = `${pairs.length} strongest pairs over ${where}${doc.sink_excluded ? " · attention to the first token (the sink) left out" : ""} · the first token takes ${(100 * Math.max(...doc.sink_by_layer)).toFixed(0)}% of a layer's attention at most`;
  },

  describe(i) {
    const doc = this.doc;
    const into = doc.top_pairs.filter((p) => p.query === i), from = doc.top_pairs.filter((p) => p.key === i);
    return [`${i}: ${showTok(doc.tokens[i])}`,
      ...into.map((p) => `  reads ${showTok(p.key_token)} (${p.key})  ${p.weight.toFixed(3)}`),
      ...from.map((p) => `  read by ${showTok(p.query_token)} (${p.query})  ${p.weight.toFixed(3)}`)].join("\n");
  },

  figure(panel) { return this.doc && canvasFigure(panel, $("flow-arcs"), `${this.title} — ${clip(this.doc.prompt, 90)}`); },
};
