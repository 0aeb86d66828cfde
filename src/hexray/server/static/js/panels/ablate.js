// Ablation: the next-token distribution before and after removing components.
import { $, canvasFigure, clip, drawPairedBars, emptyCanvas, showTok } from "../draw.js";
import { bind, ran, set, state, subscribe } from "../store.js";
import { unitLabel } from "../units.js";

export default {
  id: "ablate",
  title: "Ablation",
  subtitle: "shift-click a head in the map to add it",
  body: `<div class="row">
    <label for="components">components</label><input id="components" class="grow" placeholder="L9H6, MLP10, L10N1234@-1" spellcheck="false">
    <select id="mode"><option>zero</option><option>mean</option><option>resample</option></select>
    <button id="ablate-run" type="button">Ablate ▸</button>
  </div>
  <div id="ablate-summary" class="sumcheck"></div>
  <canvas id="ablate-chart" class="figure"></canvas>`,

  init({ lab, job, status }) {
    this.lab = lab; this.job = job; this.status = status; this.doc = null;
    for (const [id, key] of [["components", "components"], ["mode", "mode"]]) {
      bind($(id), key);
      $(id).addEventListener("input", () => set({ [key]: $(id).value }));
      $(id).addEventListener("change", () => set({ [key]: $(id).value }));
    }
    subscribe(() => { if ($("components").value !== state.components) $("components").value = state.components; });
    $("ablate-run").addEventListener("click", () => this.run());
  },

  restore() { if (state.components) return this.run(); },

  async run() {
    const body = { prompt: state.prompt, components: state.components, mode: state.mode, top_k: 8 };
    if (state.target) body.target = state.target;
    if (state.contrast) body.contrast = state.contrast;
    if (state.pos !== null) body.token_index = state.pos;
    ran("ablate");
    $("ablate-run").disabled = true;
    this.status("ablating…");
    const doc = await this.job("ablate", "/ws/ablate", body);
    $("ablate-run").disabled = false;
    if (!doc) return;
    this.doc = doc;
    this.lab.docs["ablate-panel"] = doc;
    this.render();
    this.status("ablated");
  },

  render() {
    const doc = this.doc, canvas = $("ablate-chart");
    if (!doc) { emptyCanvas(canvas, "list components (or shift-click heads), then Ablate"); return; }
    const rows = new Map();
    for (const t of doc.before.top) rows.set(t.id, { label: t.token, before: t.prob, after: null });
    for (const t of doc.after.top) rows.set(t.id, { ...(rows.get(t.id) || { label: t.token, before: null }), after: t.prob });
    for (const d of [doc.before, doc.after]) {  // a token in only one top list: its probability from the other side's target/contrast when known
      for (const t of [d.target, d.contrast].filter(Boolean)) {
        const row = rows.get(t.id);
        if (row) row[d === doc.before ? "before" : "after"] ??= t.prob;
      }
    }
    drawPairedBars(canvas, [...rows.values()]);
    const t0 = doc.before.target, t1 = doc.after.target;
    const diff = doc.before.logit_diff !== null ? ` · logit diff ${doc.before.logit_diff.toFixed(3)} → ${doc.after.logit_diff.toFixed(3)}` : "";
    const names = doc.components.flatMap((c, i) => [...(i ? [", "] : []), unitLabel(c.name + (c.position === null ? "" : `@${c.position}`), c.name)]);
    $("ablate-summary").replaceChildren(`${doc.mode}-ablated `, ...names, `: ${showTok(t0.token)} p ${t0.prob.toFixed(3)} → ${t1.prob.toFixed(3)}, logit ${t0.logit.toFixed(2)} → ${t1.logit.toFixed(2)}${diff} · KL ${doc.kl.toFixed(4)}`);
  },

  figure(panel) { return this.doc && canvasFigure(panel, $("ablate-chart"), `${this.title} — ${clip(this.doc.prompt || "", 90)}`); },
};
