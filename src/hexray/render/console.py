"""Rich console rendering of a :class:`~hexray.analysis.report.Report`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hexray.analysis.report import Report
from hexray.analysis.results import ArithmeticGraph, Attribution, ComponentScore, LogitLens, ResidualTrace, StepAttribution, WeightView

BAR_WIDTH = 25
MAX_GRID_POSITIONS = 8


def tok(text: str) -> str:
    """A token shown unambiguously: quoted, with whitespace and control characters escaped."""
    return repr(text)


def render_report(report: Report, console: Console) -> None:
    a = report.attribution
    console.print(header(report))
    if report.residual is not None:
        console.print(residual_table(report.residual, a.position))
    if report.logit_lens is not None:
        console.print(lens_table(report.logit_lens))
    if report.steps is not None:
        console.print(steps_bars(report.steps, report.options.top_k))
    console.print(attribution_table(a, report.options.top_k))
    if report.head_attribution is not None and report.head_attribution is not a:
        console.print(attribution_table(report.head_attribution, report.options.top_k, title="Top heads and MLP layers"))
    for view in report.weights:
        console.print(weights_table(view))
    if report.arithmetic is not None:
        console.print(arithmetic_summary(report.arithmetic))


def header(report: Report) -> Group:
    a = report.attribution
    strip = Text()
    for i, t in enumerate(a.tokens):
        style = "bold reverse" if i == a.position else "dim"
        strip.append(f"{i}:", style="dim")
        strip.append(tok(t), style=style)
        strip.append(" ")
    explained = f"logit({tok(a.target.token)})"
    if a.contrast is not None:
        explained += f" - logit({tok(a.contrast.token)})"
    lines = [
        Text.assemble(("Model ", "bold"), f"{report.spec.name} ({report.spec.architecture}, {report.spec.n_layers} layers x {report.spec.n_heads} heads)"),
        Text.assemble(("Tokens ", "bold"), strip),
        Text.assemble(
            ("Position ", "bold"), f"{a.position} {tok(a.tokens[a.position])} -> ",
            (tok(a.target.token), "bold green"), f"  p={a.target.prob:.3f}  logit={a.target.logit:.3f}",
        ),
    ]
    if a.contrast is not None:
        lines.append(Text(f"Contrast {tok(a.contrast.token)}  p={a.contrast.prob:.3f}  logit={a.contrast.logit:.3f}"))
    lines.append(Text(f"Explaining {explained} = {a.value:+.4f}"))
    return Group(*lines, Text(""))


def attribution_table(a: Attribution, k: int, *, title: str | None = None) -> Table:
    top = a.top(k)
    total = sum(abs(c.score) for c in top) or 1.0
    covered = sum(c.score for c in top)
    table = Table(
        title=title or f"Top {len(top)} contributors to {tok(a.target.token)} at position {a.position} ({a.granularity})",
        caption=f"sum of all {len(a.components)} components = {sum(c.score for c in a.components):+.4f} "
        f"(value {a.value:+.4f}, error {a.reconstruction_error:.1e}); top {len(top)} cover {covered:+.4f}",
        title_justify="left",
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("component")
    table.add_column("score", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for i, c in enumerate(top, 1):
        share = abs(c.score) / total
        colour = "green" if c.score >= 0 else "red"
        table.add_row(str(i), c.component.label, Text(f"{c.score:+.3f}", style=colour), f"{100 * share:.1f}%", Text(_bar(share, top), style=colour))
    return table


def _bar(share: float, top: tuple[ComponentScore, ...]) -> str:
    biggest = max(abs(c.score) for c in top) / (sum(abs(c.score) for c in top) or 1.0)
    return "█" * max(1, round(BAR_WIDTH * share / (biggest or 1.0)))


def lens_table(lens: LogitLens) -> Table:
    table = Table(title=f"Logit lens at position {lens.position} (target {tok(lens.target.token)})", title_justify="left")
    table.add_column("after")
    table.add_column("top tokens")
    table.add_column("target rank", justify="right")
    table.add_column("target p", justify="right")
    for row in lens.rows:
        tops = "  ".join(f"{tok(t.token)} {t.prob:.2f}" for t in row.top)
        table.add_row(row.label, tops, str(row.target_rank), f"{row.target_prob:.3f}")
    return table


def residual_table(r: ResidualTrace, position: int) -> Group:
    per_layer = Table(title=f"Residual stream at position {position} {tok(r.tokens[position])}", title_justify="left")
    for name, justify in [("after", "left"), ("|resid|", "right"), ("|attn out|", "right"), ("|mlp out|", "right"), ("lens top-1", "left")]:
        per_layer.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row, label in enumerate(r.row_labels):
        attn = f"{r.attn_delta_norm[row - 1, position]:.2f}" if row else ""
        mlp = f"{r.mlp_delta_norm[row - 1, position]:.2f}" if row else ""
        lens = f"{tok(r.lens_top_tokens[row][position])} {r.lens_top_probs[row, position]:.2f}"
        per_layer.add_row(label, f"{r.resid_norm[row, position]:.2f}", attn, mlp, lens)
    first = max(0, len(r.tokens) - MAX_GRID_POSITIONS)
    grid = Table(title=f"Logit-lens top-1 by layer and position (last {len(r.tokens) - first} positions)", title_justify="left")
    grid.add_column("after")
    for p in range(first, len(r.tokens)):
        grid.add_column(f"{p}:{tok(r.tokens[p])}", overflow="fold")
    for row, label in enumerate(r.row_labels):
        grid.add_row(label, *(tok(r.lens_top_tokens[row][p]) for p in range(first, len(r.tokens))))
    return Group(per_layer, grid)


def steps_bars(s: StepAttribution, k: int) -> Group:
    parts: list = [Text(f"Chain-of-thought attribution ({len(s.steps)} steps, split by {s.rule}; each in full context)", style="bold")]
    for st in s.steps:
        a = st.attribution
        parts.append(Text(f"\nStep {st.index}: {st.text}", style="bold"))
        parts.append(Text(f"  at position {a.position} {tok(a.tokens[a.position])} -> {tok(a.target.token)} (p={a.target.prob:.2f})", style="dim"))
        top = a.top(k)
        total = sum(abs(c.score) for c in top) or 1.0
        for c in top:
            share = abs(c.score) / total
            sign = "+" if c.score >= 0 else "-"
            parts.append(Text(f"{c.component.label:<9}{_bar(share, top):<{BAR_WIDTH + 1}} {sign}{100 * share:4.1f}%"))
    return Group(*parts, Text(""))


def weights_table(w: WeightView) -> Table:
    shape = "x".join(str(n) for n in w.matrices.shape[1:])
    title = f"{w.spec}: {'per head, ' if w.per_head else ''}({w.row_axis} x {w.col_axis}) = {shape}"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("head" if w.per_head else "matrix")
    for col in ("frobenius", "mean", "std", "min", "max"):
        table.add_column(col, justify="right")
    for i, m in enumerate(w.matrices):
        table.add_row(str(i) if w.per_head else w.weight, f"{w.norms[i]:.3f}", f"{m.mean():+.4f}", f"{m.std():.4f}", f"{m.min():+.3f}", f"{m.max():+.3f}")
    return table


def arithmetic_summary(g: ArithmeticGraph) -> Group:
    operands = [n for n in g.nodes if n.kind == "operand"]
    lines = [
        Text(f"Arithmetic graph: answer {tok(g.answer.token)} (p={g.answer.prob:.2f}) at position {g.position}", style="bold"),
        Text("operands: " + ", ".join(f"{n.label}@{n.position}" for n in operands)),
        Text("answer rank by layer: " + " ".join(str(int(r)) for r in g.answer_rank)),
    ]
    label = {n.id: f"{n.label}@{n.position}" if n.kind == "operand" else n.label for n in g.nodes}
    for e in g.edges:
        verb = "attends to" if e.kind == "attends" else "writes"
        src, dst = (e.target, e.source) if e.kind == "attends" else (e.source, e.target)
        lines.append(Text(f"  {label[src]} {verb} {label[dst]}: {e.weight:+.3f}"))
    return Group(*lines)
