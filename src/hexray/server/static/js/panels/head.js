// The head inspector: one head's pattern with what it does there — entropy, concentration, value
// and output norms, its strongest token pairs, its role scores and its direct attribution.
import { $, canvasFigure, clip, drawGrid, emptyCanvas, fillTable, fmt, hover, sequential, showTok } from "../draw.js";
import { state, subscribe } from "../store.js";
import { parseHead } from "./dla.js";
import { unitLabel } from "../units.js";

export default {
  id: "head",
  title: "Head inspector",
  subtitle: "click a head in the attribution map",
  body: `<div id="head-name" class="dim">click a head in the attribution map</div>
  <table id="head-summary" class="roles"></table><table id="role-scores" class="roles"></table>
  <div class="pairs"><div><h3>strongest attention</h3><ol id="head-pairs"></ol></div>
  <div><h3>moves most · weight × |value|</h3><ol id="head-moved"></ol></div></div><div id="head-sink" class="dim"></div>
  <div class="scroll"><canvas id="attn-map" class="figure"></canvas></div>`,

  init({ lab, job }) {
    this.lab = lab; this.job = job; this.doc = null;
    hover($("attn-map"), (h) => (this.doc ? this.describe(h) : ""));
    subscribe((changed) => {
      if (!changed.includes("head")) return;
      if (state.head && lab.analysis) this.load();
      else if (!state.head) { this.doc = null; delete lab.docs["head-panel"]; this.render(); }
    });
  },

  analysed() { if (state.head) return this.load(); },

  async load() {
    const [layer, head] = parseHead(state.head);
    if (layer === null) return;
    const name = state.head, prompt = this.lab.analysis.prompt;
    $("head-name").textContent = `${name} loading…`;
    const doc = await this.job("head", "/ws/attention", { prompt, layer, head, exclude_first_key: true });  // without a BOS, the first word is the sink
    if (state.head !== name) return;  // another head was asked for meanwhile
    if (!doc) { $("head-name").textContent = name; return; }
    this.doc = doc;
    this.lab.docs["head-panel"] = doc;
    this.render();
  },

  render() {
    const canvas = $("attn-map"), doc = this.doc, a = this.lab.analysis;
    if (!doc || (a && a.prompt !== doc.prompt)) { emptyCanvas(canvas, "click a head in the attribution map"); return; }
    $("head-name").replaceChildren(unitLabel(doc.name), " · rows: query position, columns: key position");
    const dla = a && a.head_scores ? a.head_scores[doc.layer][doc.head] : null;
    const q = a ? a.position : doc.tokens.length - 1;
    const row = doc.pattern[q] || [];
    const key = row.indexOf(Math.max(...row.slice(0, q + 1)));  // where the explained position looks
    fillTable($("head-summary"), ["direct attribution", "entropy (mean)", `entropy @${q}`, "concentration (mean)", `top key @${q}`, "its value norm", `output norm @${q}`], [[
      dla === null ? "—" : fmt(dla), doc.mean_entropy, doc.entropy[q], doc.mean_concentration, key < 0 ? "—" : `${clip(showTok(doc.tokens[key]), 10)} (${key})`, doc.value_norm[key], doc.output_norm[q],
    ]]);
    const roles = Object.entries(doc.scores);
    fillTable($("role-scores"), roles.map(([r]) => r.replace("_", " ")), [roles.map(([, v]) => (v === null ? "—" : v))]);
    const pair = (p, value) => {
      const li = document.createElement("li");
      li.textContent = `${clip(showTok(p.query_token), 10)} (${p.query}) ← ${clip(showTok(p.key_token), 10)} (${p.key})  ${value.toFixed(3)}`;
      return li;
    };
    $("head-pairs").replaceChildren(...doc.top_pairs.slice(0, 5).map((p) => pair(p, p.weight)));
    $("head-moved").replaceChildren(...doc.top_moved_pairs.slice(0, 5).map((p) => pair(p, p.moved)));
    $("head-sink").textContent = doc.sink_excluded ? "pairs leave out query 0 and the first token (the attention sink)" : "pairs leave out query 0";
    const n = doc.tokens.length;
    const cs = Math.max(3, Math.min(26, Math.floor(900 / n)));
    const labels = doc.tokens.map(showTok);
    drawGrid(canvas, {
      rows: n, cols: n, cw: cs, ch: cs, rotate: true, rowLabels: labels.map((l) => clip(l, 14)), colLabels: labels,
      color: (r, c) => (c > r ? getComputedStyle(document.documentElement).getPropertyValue("--bg") : sequential(doc.pattern[r][c])),
    });
  },

  describe({ r, c }) {
    if (c > r) return "";
    const d = this.doc;
    return `${showTok(d.tokens[r])} (${r}) → ${showTok(d.tokens[c])} (${c}): ${d.pattern[r][c].toFixed(3)}\nvalue norm at ${c}: ${d.value_norm[c].toFixed(3)}`;
  },

  figure(panel) { return this.doc && canvasFigure(panel, $("attn-map"), `${this.doc.name} — ${clip(this.doc.prompt, 90)}`); },
};

