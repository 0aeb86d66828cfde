"""One self-contained HTML page: every figure inlined as base64, every table as HTML. No CDN."""

from __future__ import annotations

import base64
from html import escape

from hexray.analysis.report import Report
from hexray.analysis.results import Attribution, HeadClassification
from hexray.generation.results import GenerationResult
from hexray.intervene.results import AblationResult, PatchingResult
from hexray.render.palette import LEGEND, NEGATIVE, NEGATIVE_DARK, PATCHING_LEGEND, POSITIVE, POSITIVE_DARK, SELECTION, SELECTION_DARK
from hexray.tracing.sites import head as head_component

# sign colours from the palette, as in the lab; the dark block comes last so its .pos/.neg win in dark mode
_STYLE = f"""
body{{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1d1d1f;background:#fff}}
h1{{font-size:1.4rem}}h2{{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #8884}}
table{{border-collapse:collapse;margin:.5rem 0}}td,th{{border:1px solid #ddd;padding:2px 8px;text-align:right;font-variant-numeric:tabular-nums}}
td:first-child,th:first-child{{text-align:left}}.tok{{font-family:ui-monospace,monospace;white-space:pre;background:#8882;border-radius:3px;padding:0 2px}}
.pos{{color:{POSITIVE}}}.neg{{color:{NEGATIVE}}}.here{{outline:2px solid {SELECTION}}}.legend{{font-size:.9em}}img{{max-width:100%;border:1px solid #8883;margin:.5rem 0}}
@media (prefers-color-scheme:dark){{body{{background:#111;color:#e6e6e6}}table td,table th{{border-color:#333}}.pos{{color:{POSITIVE_DARK}}}.neg{{color:{NEGATIVE_DARK}}}.here{{outline-color:{SELECTION_DARK}}}}}
"""


_HIGHLIGHT = ' class="here"'


def _tok(text: str) -> str:
    return f'<span class="tok">{escape(repr(text))}</span>'


def _legend(text: str) -> str:
    """The sign-colour key shown once above a report's first signed table, with a swatch of each colour."""
    return f'<p class="legend"><span class="pos">&#9632;</span><span class="neg">&#9632;</span> {escape(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _attribution_table(a: Attribution, k: int) -> str:
    top = a.top(k)
    share = (lambda s: f"{100 * s / a.value:+.1f}%") if abs(a.value) > 1e-9 else (lambda s: "&mdash;")
    rows = "".join(
        f'<tr><td>{escape(c.component.label)}</td><td class="{"pos" if c.score >= 0 else "neg"}">{c.score:+.4f}</td>'
        f"<td>{share(c.score)}</td></tr>"
        for c in top
    )
    return (
        f"<table><tr><th>component</th><th>score</th><th>share of the value</th></tr>{rows}</table>"
        f"<p>Sum of all {len(a.components)} components: {sum(c.score for c in a.components):+.4f}; "
        f"explained value {a.value:+.4f} (error {a.reconstruction_error:.1e}).</p>"
    )


def report_html(report: Report, figures: dict[str, bytes]) -> str:
    """The report page for ``report``; ``figures`` maps file names to PNG bytes (drawn after the attribution)."""
    a = report.attribution
    strip = " ".join(
        f'<span title="position {i}"{_HIGHLIGHT if i == a.position else ""}>{_tok(t)}</span>' for i, t in enumerate(a.tokens)
    )
    explained = f"logit({_tok(a.target.token)})" + (f" &minus; logit({_tok(a.contrast.token)})" if a.contrast else "")
    parts = [
        f"<h1>HexRay report &mdash; {escape(report.spec.title)}</h1>",
        f"<p><b>Prompt</b> {escape(a.prompt)}</p><p><b>Tokens</b> {strip}</p>",
        f"<p><b>Position {a.position}</b> predicts {_tok(a.target.token)} with p={a.target.prob:.3f}; "
        f"explaining {explained} = {a.value:+.4f} at {escape(a.granularity)} granularity.</p>",
    ]
    ctx, later = report.context, []
    for analysis, result in report.computed():
        section = analysis.html(result, ctx) if analysis.html is not None else view_section(analysis.table(result, ctx)) if analysis.table is not None else ""
        (parts if analysis.switch is None else later).append(section)
    parts += [f"<h2>{escape(name.removesuffix('.png').replace('_', ' '))}</h2>{_img(png, name)}" for name, png in figures.items() if name.endswith(".png")]
    body = "\n".join(parts + later)
    return f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HexRay &mdash; {escape(a.prompt[:60])}</title><style>{_STYLE}</style></head><body>{body}</body></html>'


def attribution_section(a: Attribution, k: int) -> str:
    return f"<h2>Direct logit attribution</h2>{_legend(LEGEND)}{_attribution_table(a, k)}"


def lens_section(lens) -> str:
    rows = "".join(
        f"<tr><td>{escape(r.label)}</td><td style='text-align:left'>{' '.join(_tok(t.token) + f' {t.prob:.2f}' for t in r.top)}</td>"
        f"<td>{r.target_rank}</td><td>{r.target_prob:.3f}</td></tr>"
        for r in lens.rows
    )
    return f"<h2>Logit lens table</h2><table><tr><th>after</th><th>top tokens</th><th>target rank</th><th>target p</th></tr>{rows}</table>"


def steps_section(steps, k: int) -> str:
    parts = [f"<h2>Reasoning steps (split by {escape(steps.rule)})</h2>"]
    for st in steps.steps:
        parts.append(f"<h3>Step {st.index}: {escape(st.text)}</h3>{_attribution_table(st.attribution, k)}")
    return "".join(parts)


def weights_section(views) -> str:
    parts = []
    for view in views:
        rows = "".join(f"<tr><td>{i}</td><td>{n:.4f}</td></tr>" for i, n in enumerate(view.norms))
        parts.append(f"<h2>{escape(view.spec)} norms</h2><table><tr><th>head</th><th>Frobenius norm</th></tr>{rows}</table>")
    return "".join(parts)


def view_section(v) -> str:
    """A registry View as an HTML table."""
    head = "".join(f"<th>{escape(c)}</th>" for c in v.columns)
    rows = "".join("<tr>" + "".join(f"<td>{x:.3f}</td>" if isinstance(x, float) else f"<td>{escape(str(x))}</td>" for x in row) + "</tr>" for row in v.rows)
    note = f"<p>{escape(v.note)}</p>" if v.note else ""
    return f"<h2>{escape(v.title)}</h2><table><tr>{head}</tr>{rows}</table>{note}"


# -- causal tools -------------------------------------------------------------------------------
def _page(title: str, parts: list[str]) -> str:
    body = "\n".join([f"<h1>{escape(title)}</h1>", *parts])
    return f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HexRay &mdash; {escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>'


def _figures(figures: dict[str, bytes]) -> list[str]:
    return [f"<h2>{escape(name.removesuffix('.png').replace('_', ' '))}</h2>{_img(png, name)}" for name, png in figures.items() if name.endswith(".png")]


def patching_html(r: PatchingResult, figures: dict[str, bytes], k: int) -> str:
    parts = [
        f"<p><b>Clean</b> {' '.join(_tok(t) for t in r.clean_tokens)}</p>",
        f"<p><b>Corrupt</b> {' '.join(_tok(t) for t in r.corrupt_tokens)}</p>",
        f"<p>Metric logit({_tok(r.target.token)}) &minus; logit({_tok(r.contrast.token)}): clean {r.clean_value:+.4f}, "
        f"corrupt {r.corrupt_value:+.4f}. Scores are (patched &minus; corrupt) / (clean &minus; corrupt); method {escape(r.method)}.</p>",
    ]
    if r.correlation:
        parts.append("<p>Exact vs attribution, Pearson r: " + ", ".join(f"{escape(s)} {'n/a' if v is None else f'{v:+.3f}'}" for s, v in r.correlation.items()) + "</p>")
    parts.append(_legend(PATCHING_LEGEND))
    for sweep in r.sweeps:
        rows = "".join(
            f"<tr><td>{escape(p.site.label)}</td><td class=\"{'pos' if p.score >= 0 else 'neg'}\">{p.score:+.4f}</td>"
            + (f"<td>{p.attribution:+.4f}</td>" if p.attribution is not None else "") + "</tr>"
            for p in r.top(k, sweep)
        )
        extra = "<th>attribution</th>" if r.method == "both" else ""
        parts.append(f"<h2>Top {k} sites: {escape(sweep)}</h2><table><tr><th>site</th><th>score</th>{extra}</tr>{rows}</table>")
    return _page(f"Activation patching — {r.model}", parts + _figures(figures))


def ablation_html(r: AblationResult, figures: dict[str, bytes]) -> str:
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{_tok(b.token)}</td><td>{b.prob:.3f}</td><td>{_tok(a.token)}</td><td>{a.prob:.3f}</td></tr>"
        for i, (b, a) in enumerate(zip(r.before.top, r.after.top))
    )
    diff = ""
    if r.before.logit_diff is not None and r.after.logit_diff is not None:
        diff = f"<p>logit({_tok(r.before.target.token)}) &minus; logit({_tok(r.before.contrast.token)}): {r.before.logit_diff:+.4f} &rarr; {r.after.logit_diff:+.4f}</p>"
    parts = [
        f"<p><b>Prompt</b> {escape(r.prompt)}</p>",
        f"<p><b>Ablated</b> {escape(', '.join(s.label for s in r.sites))} ({escape(r.mode)}) at position {r.position}; KL(before&#8214;after) = {r.kl:.4f} nats</p>",
        f"<p>Target {_tok(r.before.target.token)}: p {r.before.target.prob:.4f} &rarr; {r.after.target.prob:.4f}</p>",
        diff,
        f"<table><tr><th>#</th><th>before</th><th>p</th><th>after</th><th>p</th></tr>{rows}</table>",
    ]
    return _page(f"Ablation — {r.model}", parts + _figures(figures))


def heads_html(h: HeadClassification, figures: dict[str, bytes]) -> str:
    rows = "".join(
        f"<tr><td>{head_component(layer, head).name}</td>" + "".join(f"<td>{v:.3f}</td>" if v == v else "<td>n/a</td>" for v in scores.values()) + f"<td>{escape(label or '')}</td></tr>"
        for layer, head, scores, label in h.heads()
    )
    header = "".join(f"<th>{escape(role)}</th>" for role in h.scores)
    parts = [
        f"<p>Previous-token, duplicate-token and BOS scores on: {escape(h.prompt)}</p>",
        f"<p>Induction on {h.n_sequences} repeated random sequences of {h.seq_len} tokens (seed {h.seed}); labels at score &ge; {h.threshold}.</p>",
        *_figures(figures),
        f"<h2>Every head</h2><table><tr><th>head</th>{header}<th>label</th></tr>{rows}</table>",
    ]
    return _page(f"Head roles — {h.model}", parts)


def generation_html(g: GenerationResult, figures: dict[str, bytes]) -> str:
    with_features = any(r.features for r in g.records)
    rows = "".join(
        f"<tr><td>{r.index}</td><td>{_tok(r.token)}</td><td>{r.prob:.3f}</td><td style='text-align:left'>"
        + " ".join(f"{escape(c.component.name)} {c.score:+.2f}" for c in r.top)
        + "</td><td style='text-align:left'>" + " ".join(f"{escape(k)}={v:.3g}" + (" &#9664;" if k in r.crossed else "") for k, v in r.watch.items())
        + ("</td><td style='text-align:left'>" + " ".join(f"{escape(f.label)} {f.activation:.2f} ({f.attribution:+.2f})" for f in r.features) if with_features else "")
        + "</td></tr>"
        for r in g.records
    )
    steps = "".join(
        f"<h3>Step {s.index}: {escape(s.text)}</h3><p>Top components: " + ", ".join(f"{escape(c.component.name)} {c.score:+.2f}" for c in s.top)
        + "</p><p>Drew on: " + ", ".join(f"{escape(d.source)} (attention {d.attention:.2f}, {d.dla:+.2f} logit)" for d in s.depends)
        + "</p><p>Prompt tokens most drawn on: " + ", ".join(f"{_tok(t)}@{p} {v:+.2f}" for p, t, v in s.top_prompt_tokens) + "</p>"
        for s in g.steps
    )
    parts = [
        f"<p><b>Prompt</b> {escape(g.prompt)}{' (chat template applied)' if g.chat else ''}</p>",
        f"<p><b>Generated</b> ({len(g.generated_ids)} tokens, stopped: {escape(g.stop_reason)})</p><pre>{escape(g.text)}</pre>",
        f"<h2>Reasoning steps (split by {escape(g.rule)})</h2>{steps}",
        *_figures(figures),
        f"<h2>Every token</h2><table><tr><th>#</th><th>token</th><th>p</th><th>top components</th><th>watched</th>"
        + ("<th>features: activation (attribution)</th>" if with_features else "") + f"</tr>{rows}</table>",
    ]
    return _page(f"Traced generation — {g.model}", parts)


def dataset_html(title: str, document: dict) -> str:
    """A dataset-level document as a page: its summary fields, then every list of rows as a table."""
    parts = [f"<p><b>Model</b> {escape(str(document.get('model')))}</p>"]
    for key, value in document.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            columns = list(value[0])
            head = "".join(f"<th>{escape(c)}</th>" for c in columns)
            rows = "".join("<tr>" + "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in value)
            parts.append(f"<h2>{escape(key)}</h2><table><tr>{head}</tr>{rows}</table>")
        elif key != "model_info" and not isinstance(value, list):
            parts.append(f"<p><b>{escape(key)}</b> {escape(_cell(value))}</p>")
    return _page(title, parts)


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items() if x is not None)
    return f"{v:+.4f}" if isinstance(v, float) else "" if v is None else str(v)


# -- the neuroscope -----------------------------------------------------------------------------
_UNIT_STYLE = """
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word;text-align:left}
.ctx span{border-radius:2px}.ctx .off{opacity:.55}.ctx .here{font-weight:bold;text-decoration:underline}
.effects .tok{margin-left:.6em}.hist rect{fill:currentColor;opacity:.7}.hist text{font-size:10px;fill:currentColor}
"""


def _shade(act: float | None, scale: float) -> str:
    """A token's background: the positive-sign colour at the activation's share of the unit's max (none at or below 0, or uncounted)."""
    if act is None or scale <= 0 or act <= 0:
        return ""
    r, g, b = (int(POSITIVE[i : i + 2], 16) for i in (1, 3, 5))
    return f"background:rgba({r},{g},{b},{0.65 * min(1.0, act / scale):.2f})"


def _window(example: dict, scale: float) -> str:
    """An example's window, each token shaded by the unit's activation (its own token bold and underlined; uncounted ones faded)."""
    own = example["position"] - example["window_start"]
    spans = []
    for i, (token, act) in enumerate(zip(example["tokens"], example["acts"])):
        cls = "here" if i == own else "off" if act is None else ""
        attrs = (f' class="{cls}"' if cls else "") + (f' style="{_shade(act, scale)}"' if _shade(act, scale) else "")
        spans.append(f'<span{attrs} title="{"not counted" if act is None else f"{act:.3f}"}">{escape(token.replace(chr(10), "⏎"))}</span>')
    return "".join(spans)


def _range(lower: float, upper: float | None) -> str:
    return f"{lower:.3g} and up" if upper is None else f"{lower:.3g} to {upper:.3g}"  # the top bin's upper edge is infinite (null in the document)


def _histogram_svg(bins: list[dict], width: int = 640, height: int = 120) -> str:
    """The positive activations' histogram as inline SVG bars (one per stored bin, heights linear in count)."""
    if not bins:
        return "<p>No positive activations in the sample.</p>"
    peak, bar, room = max(b["count"] for b in bins), min(width / len(bins), 40.0), height - 24  # a few bins stay bars, not one block
    width = max(int(bar * len(bins)), 160)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 14 - room * b["count"] / peak:.1f}" width="{max(bar - 1, 0.5):.1f}" height="{room * b["count"] / peak:.1f}">'
        f'<title>{escape(_range(b["lower"], b["upper"]))}: {b["count"]:,}</title></rect>'
        for i, b in enumerate(bins)
    )
    axis = f'<text x="0" y="{height - 2}">{bins[0]["lower"]:.3g}</text><text x="{width}" y="{height - 2}" text-anchor="end">{escape(_range(bins[-1]["lower"], bins[-1]["upper"]))}</text>'
    return f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="histogram of positive activations">{rects}{axis}</svg>'


def unit_page_html(doc: dict) -> str:
    """A unit's neuroscope page (``hexray neuron|head|feature --html``) from its document (:func:`~hexray.render.jsondoc.unit_page_doc`): what the lab's card shows."""
    scale, info, unit = doc["max"] or 0.0, doc["index"], doc["unit"]
    of = f" of {escape(unit['dictionary'])}" if unit.get("dictionary") else ""
    parts = [f"<p>{escape(unit['kind'])}{of} &middot; index {escape(info['path'])} &middot; {escape(info['model'])} &middot; {info['tokens']:,} tokens of {escape(info['corpus'])}</p>"]
    label = doc.get("label")  # an automatic label, when the index has one
    if label:
        source = f", {escape(label['source'])}" if label.get("source") else ""
        score = "not measurable" if label.get("score") is None else f"{label['score']:.2f}"  # None: the unit or its rule never varied on held-out text
        parts.append(f'<p><b>Label</b> {escape(label["text"])} <span class="legend">(score {score}{source})</span></p>')
    parts.append(
        f"<table><tr><th>max</th><th>mean</th><th>fires on</th><th>fired / counted</th></tr><tr><td>{doc['max']:.4f}</td><td>{doc['mean']:.4f}</td>"
        f"<td>{100 * doc['density']:.2f}%</td><td>{doc['fired']:,} / {doc['counted']:,}</td></tr></table>"
    )
    if doc["promoted"] or doc["suppressed"]:
        def effects(xs, cls):
            return " ".join(f'{_tok(x["token"])} <span class="{cls}">{x["value"]:+.3f}</span>' for x in xs)

        parts.append(f'<h2>Logit effects (per unit of activation)</h2><p class="effects"><b>Promotes</b> {effects(doc["promoted"], "pos")}</p>'
                     f'<p class="effects"><b>Suppresses</b> {effects(doc["suppressed"], "neg")}</p>')
    rows = "".join(
        f'<tr><td>{i}</td><td>{e["activation"]:.3f}</td><td class="ctx">{_window(e, scale)}</td><td>{escape(e.get("document") or "")}</td></tr>'
        for i, e in enumerate(doc["top"], 1)
    )
    parts.append(f'<h2>Top {len(doc["top"])} examples</h2><p class="legend">each token shaded by the unit\'s activation (its share of the max); the example\'s own token underlined</p>'
                 f"<table><tr><th>#</th><th>act</th><th>context</th><th>document</th></tr>{rows}</table>")
    if doc["samples"]:
        rows = "".join(
            f'<tr><td>{escape(_range(*e["band"])) if e.get("band") else ""}</td><td>{e["activation"]:.3f}</td><td class="ctx">{_window(e, scale)}</td></tr>'
            for e in doc["samples"]
        )
        parts.append(f"<h2>Samples across the activation range</h2><table><tr><th>band</th><th>act</th><th>context</th></tr>{rows}</table>")
    parts.append(f"<h2>Histogram of positive activations</h2>{_histogram_svg(doc['histogram'])}"
                 f'<p class="legend">{doc["sampled"]:,} sampled positions, {doc["nonpositive"]:,} at or below 0</p>')
    body = "\n".join([f"<h1>{escape(doc['name'])}</h1>", *parts])
    return f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HexRay &mdash; {escape(doc["name"])}</title><style>{_STYLE}{_UNIT_STYLE}</style></head><body>{body}</body></html>'
