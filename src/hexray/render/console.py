"""Rich console rendering of a :class:`~hexray.analysis.report.Report`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hexray.analysis.report import Report
from hexray.generation.results import GenerationResult, TokenRecord
from hexray.intervene.results import AblationResult, Distribution, PatchingResult
from hexray.render.palette import sign_colour
from hexray.tracing.sites import head as head_component
from hexray.analysis.results import ArithmeticGraph, Attribution, HeadClassification, LogitLens, ResidualTrace, StepAttribution, WeightView

BAR_WIDTH = 25
MAX_GRID_POSITIONS = 8


def sign_style(score: float) -> str:
    """The palette's colour for ``score`` (blue positive, red negative). Terminals are mostly dark, and the
    dark-background values stay readable on light ones too."""
    return sign_colour(score, dark=True)


def tok(text: str) -> str:
    """A token shown unambiguously: quoted, with whitespace and control characters escaped."""
    return repr(text)


def render_report(report: Report, console: Console) -> None:
    """The header, then every computed analysis's console view, in registry order."""
    console.print(header(report))
    ctx = report.context
    for analysis, result in report.computed():
        if analysis.console is not None:
            shown = analysis.console(result, ctx)
        elif analysis.table is not None:
            shown = view_table(analysis.table(result, ctx))
        else:
            shown = None
        if shown is not None:
            console.print(shown)


def view_tables(views) -> Group:
    """Several registry Views, one table each."""
    return Group(*(view_table(v) for v in views))


def view_table(v) -> Table:
    """A registry View as a rich table."""
    table = Table(title=escape(v.title), caption=escape(v.note) or None, title_justify="left")
    for i, column in enumerate(v.columns):
        table.add_column(escape(column), justify="left" if i == 0 else "right")
    for row in v.rows:
        table.add_row(*(f"{x:.3f}" if isinstance(x, float) else "-" if x is None else escape(str(x)) for x in row))
    return table


def weights_tables(views) -> Group:
    return Group(*(weights_table(w) for w in views))


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
    if report.spec.logit_softcap:  # the capped logit is not linear in anything: explain the pre-cap one
        explained = f"pre-cap {explained} (logits soft-capped at {report.spec.logit_softcap:g})"
    lines = [
        Text.assemble(("Model ", "bold"), f"{report.spec.name} ({report.spec.architecture}, {report.spec.n_layers} layers x {report.spec.n_heads} heads{'; ' + report.spec.weights if report.spec.weights else ''})"),
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


def explained_text(a: Attribution) -> str:
    """What an attribution explains: ``logit(' Mary') - logit(' John')``."""
    return f"logit({tok(a.target.token)})" + (f" - logit({tok(a.contrast.token)})" if a.contrast is not None else "")


def _share(score: float, value: float) -> str:
    """A component's signed share of the explained value (independent of how many rows are shown)."""
    return "—" if abs(value) < 1e-9 else f"{100 * score / value:+.1f}%"


def attribution_table(a: Attribution, k: int, *, title: str | None = None) -> Table:
    top = a.top(k)
    covered = sum(c.score for c in top)
    table = Table(
        title=title or f"Top {len(top)} contributors to {explained_text(a)} at position {a.position} ({a.granularity})",
        caption=f"sum of all {len(a.components)} components = {sum(c.score for c in a.components):+.4f} "
        f"(value {a.value:+.4f}, error {a.reconstruction_error:.1e}); top {len(top)} cover {covered:+.4f}; share = score / value",
        title_justify="left",
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("component")
    table.add_column("score", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for i, c in enumerate(top, 1):
        colour = sign_style(c.score)
        table.add_row(str(i), c.component.label, Text(f"{c.score:+.3f}", style=colour), _share(c.score, a.value), Text(_bar(c.score, top), style=colour))
    return table


def _bar(score: float, top) -> str:
    """A bar as long as |score| relative to the largest shown."""
    biggest = max(abs(c.score) for c in top) or 1.0
    return "█" * max(1, round(BAR_WIDTH * abs(score) / biggest))


def lens_table(lens: LogitLens, *, title: str = "Logit lens", kl: dict | None = None) -> Table:
    """``kl``: held-out KL per row in bits ({"tuned": [...], "logit": [...]}), shown beside a tuned lens."""
    table = Table(title=f"{title} at position {lens.position} (target {tok(lens.target.token)})", title_justify="left",
                  caption="KL: held-out, to the final distribution (bits), tuned vs logit lens" if kl else None)
    table.add_column("after")
    table.add_column("top tokens")
    table.add_column("target rank", justify="right")
    table.add_column("target p", justify="right")
    if kl:
        table.add_column("KL tuned", justify="right")
        table.add_column("KL logit", justify="right")
    for i, row in enumerate(lens.rows):
        tops = "  ".join(f"{tok(t.token)} {t.prob:.2f}" for t in row.top)
        extra = (f"{kl['tuned'][i]:.2f}", f"{kl['logit'][i]:.2f}") if kl else ()
        table.add_row(row.label, tops, str(row.target_rank), f"{row.target_prob:.3f}", *extra)
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
        for c in top:
            parts.append(Text(f"{c.component.label:<9}{_bar(c.score, top):<{BAR_WIDTH + 1}} {c.score:+.2f} ({_share(c.score, a.value)} of {a.value:+.2f})"))
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


# -- causal tools -------------------------------------------------------------------------------
_ROLE_MARK = {"induction": ("I", "bold magenta"), "duplicate_token": ("D", "bold yellow"), "previous_token": ("P", "bold cyan"), "bos": ("b", "dim"), None: ("·", "dim")}


def render_patching(r: PatchingResult, console: Console, k: int) -> None:
    lines = [
        Text.assemble(("Clean   ", "bold"), " ".join(tok(t) for t in r.clean_tokens)),
        Text.assemble(("Corrupt ", "bold"), " ".join(tok(t) for t in r.corrupt_tokens)),
        Text(
            f"Metric logit({tok(r.target.token)}) - logit({tok(r.contrast.token)}): clean {r.clean_value:+.3f}, "
            f"corrupt {r.corrupt_value:+.3f}; scores are (patched - corrupt) / (clean - corrupt)"
        ),
        Text(f"Method {r.method}" + ("; only the final position is patched" if r.last_position_only else "")),
    ]
    if r.correlation:
        corr = ", ".join(f"{s} {v:+.3f}" if v is not None else f"{s} n/a" for s, v in r.correlation.items())
        lines.append(Text(f"Exact vs attribution (Pearson r): {corr}"))
    console.print(Group(*lines, Text("")))
    for sweep in r.sweeps:
        top = r.top(k, sweep)
        n_sites = len(r.of(sweep))
        table = Table(title=f"Top {len(top)} of {n_sites} sites: {sweep}", title_justify="left")
        table.add_column("#", justify="right", style="dim")
        table.add_column("site")
        table.add_column("token")
        table.add_column("score" if r.method != "both" else "exact", justify="right")
        if r.method == "both":
            table.add_column("attribution", justify="right")
        for i, p in enumerate(top, 1):
            pos = p.site.position
            cells = [str(i), p.site.label, "" if pos is None else tok(r.corrupt_tokens[pos]), Text(f"{p.score:+.3f}", style=sign_style(p.score))]
            if r.method == "both":
                cells.append(f"{p.attribution:+.3f}")
            table.add_row(*cells)
        console.print(table)


def _distribution_table(before: Distribution, after: Distribution, k: int) -> Table:
    table = Table(title="Next-token distribution", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("before")
    table.add_column("p", justify="right")
    table.add_column("after")
    table.add_column("p", justify="right")
    for i in range(min(k, len(before.top), len(after.top))):
        b, a = before.top[i], after.top[i]
        table.add_row(str(i + 1), tok(b.token), f"{b.prob:.3f}", tok(a.token), f"{a.prob:.3f}")
    return table


def render_ablation(r: AblationResult, console: Console, k: int) -> None:
    b, a = r.before, r.after
    how = {"zero": "zeroed", "mean": f"set to their mean over {r.n_reference} reference prompts",
           "resample": f"resampled from {r.n_reference} reference prompts ({r.samples} draws averaged)"}[r.mode]
    lines = [
        Text.assemble(("Tokens ", "bold"), " ".join(f"{i}:{tok(t)}" for i, t in enumerate(r.tokens))),
        Text.assemble(("Ablated ", "bold"), ", ".join(s.label for s in r.sites), f" ({how})"),
        Text(f"Position {r.position} {tok(r.tokens[r.position])}: target {tok(b.target.token)} "
             f"logit {b.target.logit:.3f} -> {a.target.logit:.3f}, p {b.target.prob:.3f} -> {a.target.prob:.3f}"),
    ]
    if b.contrast is not None and a.contrast is not None:
        lines.append(Text(f"logit({tok(b.target.token)}) - logit({tok(b.contrast.token)}): {b.logit_diff:+.3f} -> {a.logit_diff:+.3f}"))
    lines.append(Text(f"KL(before || after) = {r.kl:.4f} nats"))
    console.print(Group(*lines, Text("")))
    console.print(_distribution_table(b, a, k))


def render_heads(h: HeadClassification, console: Console, k: int = 5) -> None:
    n_heads = len(h.labels[0]) if h.labels else 0
    grid = Table(title=f"Head roles (score >= {h.threshold}): I induction, D duplicate token, P previous token, b BOS/sink only", title_justify="left")
    grid.add_column("layer", justify="right")
    for head in range(n_heads):
        grid.add_column(f"H{head}", justify="center")
    for layer, row in enumerate(h.labels):
        grid.add_row(str(layer), *(Text(*_ROLE_MARK[label]) for label in row))
    console.print(grid)
    top = Table(title=f"Top {k} heads per role", title_justify="left")
    top.add_column("role")
    top.add_column("heads (score)")
    for role in h.scores:
        best = h.top(k, role)
        top.add_row(role, "  ".join(f"{head_component(layer, h).name} {score:.2f}" for layer, h, score in best) or "n/a (the prompt has no such positions)")
    console.print(top)
    console.print(Text(f"previous/duplicate/BOS measured on {len(h.tokens)} prompt tokens; induction on {h.n_sequences} repeated random sequences of {h.seq_len} tokens (seed {h.seed})", style="dim"))


# -- traced generation --------------------------------------------------------------------------
def token_line(r: TokenRecord, k: int) -> Text:
    """One streamed token: index, token, probability, top components, watched values."""
    line = Text(f"{r.index:>4} ", style="dim")
    line.append(f"{tok(r.token):<14}", style="bold")
    line.append(f" p={r.prob:.3f}  ")
    for c in r.top[:k]:
        line.append(f"{c.component.label.replace('  ', ' ')} ", style="dim")
        line.append(f"{c.score:+.2f}  ", style=sign_style(c.score))
    for name, value in r.watch.items():
        line.append(f" {name}={value:.3g}", style="bold yellow" if name in r.crossed else "cyan")
    if r.crossed:
        line.append("  ◀ " + ", ".join(r.crossed) + " fired", style="bold yellow")
    if r.features:
        line.append("  | ", style="dim")
        for f in r.features:
            line.append(f"{f.label} {f.activation:.1f}", style="magenta")
            line.append(f" ({f.attribution:+.2f})  ", style=sign_style(f.attribution))
    return line


def render_generation_summary(g: GenerationResult, console: Console, k: int, *, bars: bool) -> None:
    stop = {"eos": "end of text", "max_new_tokens": "--max-new-tokens reached", "interrupted": "interrupted", "text_end": "end of --text"}[g.stop_reason]
    console.print(Text(f"\n{len(g.generated_ids)} tokens ({stop}); steps split by {g.rule}", style="bold"))
    console.print(Text(g.text))
    if g.steps:
        table = Table(title="What each step drew on (attention mass; logit moved by heads)", title_justify="left")
        table.add_column("step")
        for source in ("prompt", *(f"step {s.index}" for s in g.steps[:-1])):
            table.add_column(source, justify="right")
        table.add_column("top components (summed over the step)")
        for s in g.steps:
            cells = [f"{s.index}: {s.text[:40]}"]
            by_source = {d.source: d for d in s.depends}
            for source in ("prompt", *(f"step {x.index}" for x in g.steps[:-1])):
                d = by_source.get(source)
                cells.append("" if d is None else f"{d.attention:.2f}; {d.dla:+.1f}")
            cells.append("  ".join(f"{c.component.name} {c.score:+.1f}" for c in s.top[:k]))
            table.add_row(*cells)
        console.print(table)
    if bars and g.steps:
        parts: list = [Text(f"Chain-of-thought attribution over the generated steps (summed direct attribution of each token to its own logit)", style="bold")]
        for s in g.steps:
            parts.append(Text(f"\nStep {s.index}: {s.text}", style="bold"))
            total = sum(abs(c.score) for c in s.top) or 1.0
            biggest = max((abs(c.score) for c in s.top), default=1.0) or 1.0
            for c in s.top:
                share = abs(c.score) / total
                parts.append(Text(f"{c.component.label:<9}{'█' * max(1, round(BAR_WIDTH * abs(c.score) / biggest)):<{BAR_WIDTH + 1}} {'+' if c.score >= 0 else '-'}{100 * share:4.1f}%"))
            if s.change:
                parts.append(Text("  changed most since the previous step: " + ", ".join(f"{c.component.name} {c.score:+.1f}" for c in s.change[:3]), style="dim"))
        console.print(Group(*parts))
    if g.graph is not None and g.graph.edges:
        console.print(Text("Reasoning graph: " + "; ".join(f"{e.source} -> {e.target} {e.weight:+.1f}" for e in g.graph.edges), style="dim"))


# -- dataset-level runs -------------------------------------------------------------------------
def _pm(s) -> str:
    return f"{s.mean:+.3f} ± {s.std:.3f}"


def render_dataset_attribution(d, console: Console, k: int) -> None:
    console.print(Text(f"{len(d.prompts)} prompts; explained value {_pm(d.value)} (mean ± sample std; {d.granularity} granularity, token index {d.token_index})", style="bold"))
    table = Table(title=f"Top {min(k, len(d.components))} components by mean score over the set", title_justify="left")
    for name, justify in [("#", "right"), ("component", "left"), ("mean", "right"), ("std", "right"), ("min", "right"), ("max", "right"), ("share of mean value", "right")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, c in enumerate(d.top(k), 1):
        s = c.score
        table.add_row(str(i), c.component.label, Text(f"{s.mean:+.3f}", style=sign_style(s.mean)), f"{s.std:.3f}", f"{s.min:+.3f}", f"{s.max:+.3f}", _share(s.mean, d.value.mean))
    console.print(table)


def render_dataset_patching(d, console: Console, k: int) -> None:
    console.print(Text(f"{len(d.pairs)} prompt pairs; method {d.method}; scores are (patched - corrupt) / (clean - corrupt), mean ± sample std over pairs", style="bold"))
    for sweep in d.sweeps:
        table = Table(title=f"Top {k} sites: {sweep}", title_justify="left")
        for name in ("#", "site", "mean", "std", "min", "max"):
            table.add_column(name, justify="left" if name == "site" else "right")
        for i, s in enumerate(d.top(k, sweep), 1):
            table.add_row(str(i), s.site.label, Text(f"{s.score.mean:+.3f}", style=sign_style(s.score.mean)), f"{s.score.std:.3f}", f"{s.score.min:+.3f}", f"{s.score.max:+.3f}")
        console.print(table)


def render_dataset_ablation(d, console: Console) -> None:
    lines = [
        Text(f"Ablated {d.components} ({d.mode}) in {len(d.prompts)} prompts", style="bold"),
        Text(f"KL(before || after) {_pm(d.kl)} nats; target p {d.p_before.mean:.3f} -> {d.p_after.mean:.3f} (mean)"),
    ]
    if d.logit_diff_change is not None:
        lines.append(Text(f"logit difference change {_pm(d.logit_diff_change)}"))
    console.print(Group(*lines))
    table = Table(title="Per prompt", title_justify="left")
    for name in ("prompt", "target", "p before", "p after", "KL"):
        table.add_column(name, justify="left" if name in ("prompt", "target") else "right")
    for p in d.prompts:
        table.add_row(escape(p.prompt[:50]), tok(p.target), f"{p.p_before:.3f}", f"{p.p_after:.3f}", f"{p.kl:.4f}")
    console.print(table)


# -- the neuroscope --------------------------------------------------------------------------------
def _shaded(e, scale: float) -> Text:
    """An example's window, each token shaded by the unit's activation there (the example's token underlined)."""
    out = Text()
    for i, (token, act) in enumerate(zip(e.tokens, e.acts)):
        shown = token.replace("\n", "⏎")
        strength = 0.0 if act != act or scale <= 0 else max(0.0, min(1.0, act / scale))
        style = f"on rgb({255 - int(200 * strength)},{255 - int(120 * strength)},255)" if strength > 0.05 else ""
        if e.window_start + i == e.position:
            style = (style + " bold underline").strip()
        out.append(shown, style=style or None)
    return out


def render_unit_page(page, info, console: Console, *, examples: int = 10) -> None:
    """A unit's card: statistics, top examples shaded by activation, quantile samples, histogram, logit effects."""
    console.print(Text(f"{page.name}" + (f" ({page.dictionary})" if page.dictionary else ""), style="bold"))
    console.print(Text(f"index {info.path} · {info.model} · {info.tokens:,} tokens of {info.corpus}", style="dim"))
    for label in page.labels[:3]:
        score = "not measurable" if label.score != label.score else f"{label.score:.2f}"
        console.print(Text("label      ") + Text(label.text, style="bold") + Text(f"  (score {score}, {label.source}: correlation with held-out activations)", style="dim"))
    console.print(f"max {page.max:.3f} · mean {page.mean:.4f} · fires on {100 * page.density:.2f}% of tokens ({page.fired:,} of {page.counted:,})")
    if page.promoted:
        console.print(Text("promotes   ") + Text("  ".join(f"{x.token!r} {x.value:+.2f}" for x in page.promoted[:8])))
        console.print(Text("suppresses ") + Text("  ".join(f"{x.token!r} {x.value:+.2f}" for x in page.suppressed[:8])))
    table = Table(title=f"Top {min(examples, len(page.top))} of {len(page.top)} examples", title_justify="left")
    for column, justify in (("#", "right"), ("act", "right"), ("context (shaded by activation; the token underlined)", "left"), ("document", "left")):
        table.add_column(column, justify=justify)
    for i, e in enumerate(page.top[:examples], 1):
        table.add_row(str(i), f"{e.activation:.3f}", _shaded(e, page.max), escape(e.document or ""))
    console.print(table)
    if page.samples:
        samples = Table(title="Samples across the activation range", title_justify="left")
        for column in ("band", "act", "context"):
            samples.add_column(column)
        for e in page.samples[:examples]:
            band = f"{e.band[0]:.3g}-{e.band[1]:.3g}" if e.band else ""
            samples.add_row(band, f"{e.activation:.3f}", _shaded(e, page.max))
        console.print(samples)
    if page.histogram:
        per = -(-len(page.histogram) // 12)  # at most 12 rows: neighbouring bins merged
        rows = [(chunk[0].lower, chunk[-1].upper, sum(b.count for b in chunk)) for chunk in (page.histogram[i : i + per] for i in range(0, len(page.histogram), per))]
        peak = max(count for _, _, count in rows)
        lines = [f"{lower:>9.3g} - {upper:<9.3g} {'█' * max(1, round(30 * count / peak))} {count}" for lower, upper, count in rows]
        console.print(Text(f"Histogram of positive activations ({page.sampled:,} sampled positions, {page.nonpositive:,} at or below 0)\n" + "\n".join(lines)))


def render_unit_hits(hits, console: Console, *, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column, justify in (("#", "right"), ("unit", "left"), ("score", "right"), ("activation", "right"), ("max", "right")):
        table.add_column(column, justify=justify)
    for i, h in enumerate(hits, 1):
        table.add_row(str(i), h.unit.name, f"{h.score:.3f}", f"{h.activation:.3f}", f"{h.max:.3f}")
    console.print(table if hits else Text("no unit found", style="dim"))
