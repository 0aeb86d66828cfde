// The circuit view: layers × heads (+ MLP) with edges along the strongest contributors, from the
// prediction backwards. Colour = direct attribution (blue raises the target), brightness = how much
// the component writes at the explained position, edges = the circuit (width ∝ |edge score|).
// This 2D map carries the three channels a 3D layer × head view would, without hiding cells
// behind one another (the note on issue 13 argues it).
import { $, LEGEND, canvasFigure, clip, css, diverging, emptyCanvas, fmt, hover, maxAbs, rowNames, sizeCanvas } from "../draw.js";
import { ran, set, state } from "../store.js";
import { openUnit, unitLabel } from "../units.js";

const CW = 30, CH = 18, LEFT = 40, TOP = 22, GAP = 8;

function fade(color, t) {  // "rgb(r,g,b)" -> the same colour at opacity t
  const m = /rgb\((\d+),(\d+),(\d+)\)/.exec(color);
  return m ? `rgba(${m[1]},${m[2]},${m[3]},${t.toFixed(3)})` : color;
}

export default {
  id: "circuit",
  title: "Circuit",
  subtitle: "layers × heads + MLP · edges from the prediction backwards (input × gradient)",
  body: `<div class="row">
    <label for="circuit-k">per node</label><input id="circuit-k" type="number" min="1" max="16" value="5" class="num">
    <label for="circuit-depth">depth</label><input id="circuit-depth" type="number" min="1" max="4" value="2" class="num">
    <button id="circuit-run" type="button">Circuit ▸</button>
    <button id="circuit-stop" type="button" data-stop="circuit" disabled>■ stop</button>
  </div>
  <div id="circuit-summary" class="sumcheck"></div><div class="legend dim"></div>
  <div class="scroll"><canvas id="circuit-map" class="figure"></canvas></div>
  <ol id="circuit-edges" class="toplist"></ol>`,

  init({ lab, job, channel, status }) {
    this.lab = lab; this.job = job; this.status = status; this.doc = null;
    $("circuit-panel").querySelector(".legend").textContent = `${LEGEND} · brighter: writes more at the explained position · ◆ in the circuit`;
    for (const [id, key] of [["circuit-k", "circuit_k"], ["circuit-depth", "circuit_depth"]]) {
      $(id).value = state[key];
      $(id).addEventListener("change", () => set({ [key]: $(id).value }));
    }
    $("circuit-run").addEventListener("click", () => this.run());
    $("circuit-stop").addEventListener("click", () => channel("circuit").stop());
    hover($("circuit-map"), (h) => this.describe(h), (h) => { if (this.grid && h.c < this.grid.H) openUnit(`L${h.r}H${h.c}`); });  // a head: its neuroscope card
  },

  restore() { return this.run(); },

  async run() {
    if (!state.prompt.trim()) return;
    set({ circuit_k: $("circuit-k").value, circuit_depth: $("circuit-depth").value });
    const body = { prompt: state.prompt, k: Number(state.circuit_k), depth: Number(state.circuit_depth) };
    if (state.target) body.target = state.target;
    if (state.contrast) body.contrast = state.contrast;
    if (state.pos !== null) body.token_index = state.pos;
    ran("circuit");
    this.status("tracing the circuit…");
    const doc = await this.job("circuit", "/ws/circuit", body);
    if (!doc) return;
    this.doc = doc;
    this.lab.docs["circuit-panel"] = doc;
    this.render();
    this.status(`circuit: ${doc.nodes.length} nodes, ${doc.edges.length} edges`);
  },

  render() {
    const canvas = $("circuit-map"), doc = this.doc, info = this.lab.info;
    if (!doc || !info) { emptyCanvas(canvas, "run an analysis, then Circuit"); canvas.hit = () => null; return; }
    const L = info.n_layers, H = info.n_heads;
    const width = LEFT + (H + 1) * CW + GAP + 10, height = TOP + (L + 1) * CH + 16;
    const ctx = sizeCanvas(canvas, width, height);
    ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, width, height);
    const col = (head) => (head === null ? H : head);
    const cx = (c) => LEFT + c * CW + (c >= H ? GAP : 0) + CW / 2, cy = (r) => TOP + r * CH + CH / 2;
    const a = this.lab.analysis && this.lab.analysis.prompt === doc.prompt ? this.lab.analysis : null;
    const dla = (r, c) => (c < H ? (a && a.head_scores ? a.head_scores[r][c] : null) : (a ? a.layer_totals.mlp[r] : null));
    const inCircuit = new Map(doc.nodes.map((n) => [`${n.layer}:${col(n.head)}`, n]));
    const scores = [...doc.nodes.map((n) => n.score)];
    for (let r = 0; r < L; r++) for (let c = 0; c <= H; c++) scores.push(dla(r, c));
    const scale = maxAbs(scores);
    const norms = doc.output_norm, mlpNorms = doc.mlp_norm;
    const normMax = norms ? maxAbs([...norms.flat(), ...(mlpNorms || [])]) : 1;
    const bright = (r, c) => (norms ? 0.25 + 0.75 * ((c < H ? norms[r][c] : (mlpNorms || [])[r]) || 0) / normMax : 1);
    ctx.fillStyle = css("--dim"); ctx.textAlign = "center";
    for (let c = 0; c <= H; c++) ctx.fillText(c < H ? `H${c}` : "MLP", cx(c), TOP - 9);
    ctx.textAlign = "right";
    rowNames(L).forEach((l, r) => ctx.fillText(l, LEFT - 4, cy(r)));
    for (let r = 0; r < L; r++) {
      for (let c = 0; c <= H; c++) {
        const node = inCircuit.get(`${r}:${c}`);
        const score = node ? node.score : dla(r, c);
        ctx.fillStyle = score === null ? css("--cell") : fade(diverging(score, scale), bright(r, c));
        ctx.fillRect(cx(c) - CW / 2, cy(r) - CH / 2, CW - 1, CH - 1);
      }
    }
    const logitY = TOP + L * CH + CH / 2, logitX = cx((H + 1) / 2 - 0.5);
    ctx.fillStyle = css("--fg"); ctx.textAlign = "center";
    ctx.fillText(`logit ${doc.contrast ? "diff" : ""}`, logitX, logitY + 4);
    const at = (name) => doc.nodes.find((n) => n.name === name);
    const edgeMax = maxAbs(doc.edges.map((e) => e.score));
    for (const e of doc.edges) {
      const s = at(e.source), d = e.destination === null ? null : at(e.destination);
      const [x0, y0] = [cx(col(s.head)), cy(s.layer)];
      const [x1, y1] = d ? [cx(col(d.head)), cy(d.layer)] : [logitX, logitY - 4];
      ctx.strokeStyle = e.score >= 0 ? css("--pos") : css("--neg");
      ctx.lineWidth = 0.6 + 4 * Math.abs(e.score) / edgeMax;
      ctx.setLineDash(e.exact ? [] : [4, 2]);
      ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
    }
    ctx.setLineDash([]);
    ctx.strokeStyle = css("--sel"); ctx.lineWidth = 1.5;
    for (const n of doc.nodes) ctx.strokeRect(cx(col(n.head)) - CW / 2 + 1, cy(n.layer) - CH / 2 + 1, CW - 3, CH - 3);
    canvas.cellCenter = (r, c) => [cx(c), cy(r)];
    canvas.hit = (x, y) => {
      const r = Math.floor((y - TOP) / CH);
      let c = Math.floor((x - LEFT) / CW);
      if (c >= H) c = Math.floor((x - LEFT - GAP) / CW);
      return r >= 0 && r < L && c >= 0 && c <= H ? { r, c } : null;
    };
    this.grid = { H, dla, inCircuit };
    $("circuit-summary").textContent = `${doc.nodes.length} nodes, ${doc.edges.length} edges explaining ${fmt(doc.value)} at position ${doc.position} · solid: exact direct effect on the logit · dashed: ${doc.method}`;
    const edges = [...doc.edges].sort((x, y) => Math.abs(y.score) - Math.abs(x.score)).slice(0, 12);
    $("circuit-edges").replaceChildren(...edges.map((e) => {
      const li = document.createElement("li");
      li.className = e.score >= 0 ? "pos" : "neg";
      li.append(unitLabel(e.source), " → ", unitLabel(e.destination ?? "logit"), `  ${fmt(e.score)}`);
      return li;
    }));
  },

  describe({ r, c }) {
    if (!this.grid) return "";
    const { H, dla, inCircuit } = this.grid;
    const name = c < H ? `L${r}H${c}` : `MLP${r}`;
    const node = inCircuit.get(`${r}:${c}`);
    const lines = [`${name}: direct attribution ${fmt(node ? node.score : dla(r, c))}`];
    if (this.doc.output_norm) lines.push(`writes |${(c < H ? this.doc.output_norm[r][c] : this.doc.mlp_norm[r]).toFixed(3)}| at position ${this.doc.position}`);
    for (const e of this.doc.edges) {
      if (e.destination === name) lines.push(`  ← ${e.source} ${fmt(e.score)}`);
      if (e.source === name) lines.push(`  → ${e.destination ?? "logit"} ${fmt(e.score)}`);
    }
    if (c < H) lines.push("click: its neuroscope card");
    return lines.join("\n");
  },

  figure(panel) { return this.doc && canvasFigure(panel, $("circuit-map"), `${this.title} — ${clip(this.doc.prompt, 90)}`); },
};
