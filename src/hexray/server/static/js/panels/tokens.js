// The token strip: hover for the next-token distribution, click to explain that position,
// right-click (or "units firing here") for the neuroscope units that fire most at a token.
import { $, showTok, textFigure, tip, wrap } from "../draw.js";
import { set } from "../store.js";
import { unitLabel, unitsAtToken } from "../units.js";

export default {
  id: "tokens",
  title: "Tokens",
  subtitle: "hover: next-token top-k and features · click: explain that position · right-click: the units firing there",
  wide: true,
  readsAnalysis: true,
  body: `<div id="tokens" class="tokens"></div><div id="explained" class="explained"></div><div id="token-features" class="explained"></div>`,

  init({ lab, analyse }) { this.lab = lab; this.analyse = analyse; },

  render() {
    const analysis = this.lab.analysis;
    const box = $("tokens");
    box.replaceChildren();
    if (!analysis) return;
    analysis.tokens.forEach((t, i) => {
      const span = document.createElement("span");
      span.className = "tok" + (i === analysis.position ? " sel" : "");
      span.dataset.pos = String(i);
      span.textContent = t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
      span.addEventListener("mousemove", (e) => {
        const top = (analysis.predictions || [])[i] || [];
        const features = (analysis.features || []).flatMap((d) => {
          const row = d.tokens[i];
          return row ? [`${d.dictionary} (L0 ${row.l0}, rel. error ${row.relative_error.toFixed(2)}):`, ...row.features.map((f) => `  ${f.label}  ${f.activation.toFixed(2)}`)] : [];
        });
        tip(e, [`position ${i}: ${showTok(t)}   next token:`, ...top.map((p) => `  ${p.prob.toFixed(3)}  ${showTok(p.token)}`), ...features].join("\n"));
      });
      span.addEventListener("mouseleave", (e) => tip(e, ""));
      span.addEventListener("click", () => { set({ pos: i }); this.analyse(); });
      span.addEventListener("contextmenu", (e) => { e.preventDefault(); tip(e, ""); unitsAtToken(analysis.prompt, analysis.tokens, i); });
      box.append(span);
    });
    const ex = $("explained");
    ex.replaceChildren();
    const label = (text) => { const s = document.createElement("span"); s.textContent = text; return s; };
    const { target, contrast } = analysis;
    ex.append(label(`explaining position ${analysis.position} → ${contrast ? "logit diff" : "logit"} of ${showTok(target.token)} (p=${target.prob.toFixed(3)})${contrast ? ` − ${showTok(contrast.token)}` : ""} = ${analysis.value.toFixed(3)}.  candidates:`));
    for (const p of (analysis.predictions || [])[analysis.position] || []) {
      const c = document.createElement("span");
      c.className = "cand";
      c.textContent = `${showTok(p.token)} ${p.prob.toFixed(3)}`;
      for (const role of ["target", "contrast"]) {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = role;
        b.title = `make ${showTok(p.token)} the ${role}`;
        b.addEventListener("click", () => { set({ [role]: p.token }); this.analyse(); });
        c.append(b);
      }
      ex.append(c);
    }
    const here = document.createElement("button");
    here.type = "button";
    here.id = "units-here";
    here.textContent = "units firing here ▸";
    here.title = `the neuroscope units firing most at ${showTok(analysis.tokens[analysis.position])}, relative to their max (needs an index: hexray index build)`;
    here.addEventListener("click", () => unitsAtToken(analysis.prompt, analysis.tokens, analysis.position));
    ex.append(here);
    const features = $("token-features");  // the explained token's features, each opening its card
    features.replaceChildren(...(analysis.features || []).flatMap((d) => {
      const row = d.tokens[analysis.position];
      return row && row.features.length ? [`${d.dictionary} at ${analysis.position}:`, ...row.features.flatMap((f) => [" ", unitLabel(f.label), ` ${f.activation.toFixed(2)}`])] : [];
    }));
  },

  figure() {
    const a = this.lab.analysis;
    return a && textFigure([...wrap(a.tokens.map(showTok).join("|"), 200), $("explained").textContent]);
  },
};
