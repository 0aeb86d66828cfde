"""One self-contained HTML page: every figure inlined as base64, every table as HTML. No CDN."""

from __future__ import annotations

import base64
from html import escape

from hexray.analysis.report import Report
from hexray.analysis.results import Attribution

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1d1d1f;background:#fff}
@media (prefers-color-scheme:dark){body{background:#111;color:#e6e6e6}table td,table th{border-color:#333}}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #8884}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right;font-variant-numeric:tabular-nums}
td:first-child,th:first-child{text-align:left}.tok{font-family:ui-monospace,monospace;white-space:pre;background:#8882;border-radius:3px;padding:0 2px}
.pos{color:#2a9d4b}.neg{color:#d1495b}img{max-width:100%;border:1px solid #8883;margin:.5rem 0}
"""


_HIGHLIGHT = ' style="outline:2px solid #2a9d4b"'


def _tok(text: str) -> str:
    return f'<span class="tok">{escape(repr(text))}</span>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _attribution_table(a: Attribution, k: int) -> str:
    top = a.top(k)
    total = sum(abs(c.score) for c in top) or 1.0
    rows = "".join(
        f'<tr><td>{escape(c.component.label)}</td><td class="{"pos" if c.score >= 0 else "neg"}">{c.score:+.4f}</td>'
        f"<td>{100 * abs(c.score) / total:.1f}%</td></tr>"
        for c in top
    )
    return (
        f"<table><tr><th>component</th><th>score</th><th>share of top {len(top)}</th></tr>{rows}</table>"
        f"<p>Sum of all {len(a.components)} components: {sum(c.score for c in a.components):+.4f}; "
        f"explained value {a.value:+.4f} (error {a.reconstruction_error:.1e}).</p>"
    )


def report_html(report: Report, figures: dict[str, bytes]) -> str:
    """The report page for ``report``; ``figures`` maps file names to PNG bytes."""
    a = report.attribution
    k = report.options.top_k
    strip = " ".join(
        f'<span title="position {i}"{_HIGHLIGHT if i == a.position else ""}>{_tok(t)}</span>' for i, t in enumerate(a.tokens)
    )
    explained = f"logit({_tok(a.target.token)})" + (f" &minus; logit({_tok(a.contrast.token)})" if a.contrast else "")
    parts = [
        f"<h1>HexRay report &mdash; {escape(report.spec.name)}</h1>",
        f"<p><b>Prompt</b> {escape(a.prompt)}</p><p><b>Tokens</b> {strip}</p>",
        f"<p><b>Position {a.position}</b> predicts {_tok(a.target.token)} with p={a.target.prob:.3f}; "
        f"explaining {explained} = {a.value:+.4f} at {escape(a.granularity)} granularity.</p>",
        "<h2>Direct logit attribution</h2>",
        _attribution_table(a, k),
    ]
    for name, png in figures.items():
        if name.endswith(".png"):
            parts.append(f"<h2>{escape(name.removesuffix('.png').replace('_', ' '))}</h2>{_img(png, name)}")
    if report.logit_lens is not None:
        rows = "".join(
            f"<tr><td>{escape(r.label)}</td><td style='text-align:left'>{' '.join(_tok(t.token) + f' {t.prob:.2f}' for t in r.top)}</td>"
            f"<td>{r.target_rank}</td><td>{r.target_prob:.3f}</td></tr>"
            for r in report.logit_lens.rows
        )
        parts.append(f"<h2>Logit lens table</h2><table><tr><th>after</th><th>top tokens</th><th>target rank</th><th>target p</th></tr>{rows}</table>")
    if report.steps is not None:
        parts.append(f"<h2>Reasoning steps (split by {escape(report.steps.rule)})</h2>")
        for st in report.steps.steps:
            parts.append(f"<h3>Step {st.index}: {escape(st.text)}</h3>{_attribution_table(st.attribution, k)}")
    for view in report.weights:
        rows = "".join(f"<tr><td>{i}</td><td>{n:.4f}</td></tr>" for i, n in enumerate(view.norms))
        parts.append(f"<h2>{escape(view.spec)} norms</h2><table><tr><th>head</th><th>Frobenius norm</th></tr>{rows}</table>")
    body = "\n".join(parts)
    return f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>HexRay &mdash; {escape(a.prompt[:60])}</title><style>{_STYLE}</style></head><body>{body}</body></html>'
