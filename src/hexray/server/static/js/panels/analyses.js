// Every registered analysis without a panel of its own: a checkbox adds it to the next analysis,
// and its table (the registry's View) is drawn here.
import { $, fillTable } from "../draw.js";
import { set, state } from "../store.js";
import { unitName } from "../units.js";

export default {
  id: "analyses",
  title: "More analyses",
  subtitle: "every analysis in the registry without a panel of its own; tick to add it to the next analysis",
  wide: true,
  readsAnalysis: true,
  body: `<div id="analyses-options" class="row"></div><div id="analyses-views"></div>`,

  init({ lab }) { this.lab = lab; },

  configure({ registry }) {
    const box = $("analyses-options");
    box.replaceChildren();
    for (const a of registry.filter((x) => x.lab_panel === "analyses-panel" && x.switch)) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.dataset.field = a.switch;
      input.dataset.name = a.name;
      if (a.switch_type === "flag") {
        input.type = "checkbox";
        input.checked = state.analyses.includes(a.name);
        label.append(input, ` ${a.title}`);
      } else {  // switched on by a value (weights: which matrices), typed here
        input.type = "text";
        input.size = 16;
        input.spellcheck = false;
        input.placeholder = (a.options.find((o) => o.name === a.switch) || {}).help?.slice(0, 40) || a.switch;
        label.append(`${a.title} `, input);
      }
      input.addEventListener("change", () => set({ analyses: this.ticked() }));
      box.append(label);
    }
    if (!box.children.length) box.textContent = "every registered analysis has its own panel";
  },

  ticked() { return [...document.querySelectorAll("#analyses-options input:checked")].map((box) => box.dataset.name); },

  request() {  // the ticked analyses' switches (and typed values), added to the analysis request
    const fields = {};
    for (const input of document.querySelectorAll("#analyses-options input")) {
      if (input.type === "checkbox" ? input.checked : input.value.trim()) fields[input.dataset.field] = input.type === "checkbox" ? true : input.value.trim();
    }
    return fields;
  },

  render() {
    const out = $("analyses-views");
    out.replaceChildren();
    for (const [name, view] of Object.entries((this.lab.analysis && this.lab.analysis.views) || {})) {
      const h = document.createElement("h3");
      h.textContent = view.title;
      const table = document.createElement("table");
      table.className = "roles";
      table.dataset.analysis = name;
      fillTable(table, view.columns, view.rows, unitName);  // a head or neuron named in a cell opens its card
      out.append(h, table);
      if (view.note) { const p = document.createElement("p"); p.className = "dim"; p.textContent = view.note; out.append(p); }
    }
  },
};
