"""Matplotlib figures (PNG/SVG bytes) for each result type."""

from __future__ import annotations

import io

import numpy as np

from hexray.analysis.results import ArithmeticGraph, Attribution, HeadClassification, LogitLens, ResidualTrace, StepAttribution, WeightView
from hexray.generation.results import GenerationResult
from hexray.intervene.results import AblationResult, PatchingResult
from hexray.models.loading import ModelSpec
from hexray.render.palette import DIVERGING_CMAP, LEGEND, PATCHING_LEGEND, UNSIGNED, WEIGHT_LEGEND, sign_colour


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen at first use, never at import
    import matplotlib.pyplot as plt

    plt.rcParams["text.parse_math"] = False  # token text is text: "$5 and $6" must not become maths

    return plt


def _save(fig, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _caption(fig, text: str) -> None:
    """``text`` in small type under everything drawn so far (rotated tick labels included); the tight save keeps it."""
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    fig.text((box.x0 + box.x1) / 2 / width, (box.y0 - 0.05) / height, text, ha="center", va="top", fontsize=7, color="#444444")


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def head_heatmap(a: Attribution, spec: ModelSpec) -> bytes:
    """Per-head direct attribution, layers x heads, with each layer's MLP as a last column."""
    plt = _plt()
    heads = a.head_matrix(spec.n_layers, spec.n_heads)
    mlp = a.layer_totals(spec.n_layers)[1][:, None]
    grid = np.concatenate([heads, mlp], axis=1)
    lim = _limit(heads) if np.isfinite(heads).any() else _limit(grid)  # MLPs would wash heads out; they get numbers
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * (spec.n_heads + 1), 1.0 + 0.28 * spec.n_layers))
    im = ax.imshow(grid, cmap=DIVERGING_CMAP, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(spec.n_heads + 1), [f"H{h}" for h in range(spec.n_heads)] + ["MLP"])
    ax.set_yticks(range(spec.n_layers), [f"L{layer}" for layer in range(spec.n_layers)])
    ax.axvline(spec.n_heads - 0.5, color="black", lw=1)
    for layer, value in enumerate(mlp[:, 0]):
        ax.text(spec.n_heads, layer, f"{value:+.1f}", ha="center", va="center", fontsize=6)
    ax.set_title(f"Direct attribution to {_label(a)}")
    fig.colorbar(im, ax=ax, label="logit contribution")
    _caption(fig, LEGEND)
    return _save(fig)


def layer_bars(a: Attribution, spec: ModelSpec) -> bytes:
    """Per-layer attention (plain) and MLP (hatched) totals as grouped bars, coloured by sign."""
    plt = _plt()
    from matplotlib.patches import Patch

    attn, mlp = a.layer_totals(spec.n_layers)
    x = np.arange(spec.n_layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * spec.n_layers), 3.4))
    ax.bar(x - 0.2, attn, 0.4, color=[sign_colour(v) for v in attn], edgecolor="black", lw=0.4)
    ax.bar(x + 0.2, mlp, 0.4, color=[sign_colour(v) for v in mlp], edgecolor="black", lw=0.4, hatch="///", alpha=0.75)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("logit contribution")
    ax.set_title(f"Per-layer attribution to {_label(a)}")
    ax.legend(handles=[Patch(fc="white", ec="black", label="attention"), Patch(fc="white", ec="black", hatch="///", label="MLP")])
    _caption(fig, LEGEND)
    return _save(fig)


def lens_heatmap(lens: LogitLens) -> bytes:
    """The target's probability and rank after each layer."""
    plt = _plt()
    probs = [r.target_prob for r in lens.rows]
    ranks = [r.target_rank for r in lens.rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(probs)), 3.2))
    ax.plot(range(len(probs)), probs, marker="o", color="#4c72b0")
    ax.set_ylabel("target probability")
    ax.set_xticks(range(len(probs)), [r.label for r in lens.rows], rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(range(len(ranks)), np.log10(np.asarray(ranks) + 1), color="#c44e52", ls="--")
    ax2.set_ylabel("log10(rank + 1)")
    ax.set_title(f"Logit lens for {lens.target.token!r} at position {lens.position}")
    return _save(fig)


def residual_chart(r: ResidualTrace, position: int) -> bytes:
    """Residual norm and per-block write norms at ``position``, across layers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(r.row_labels)), 3.4))
    ax.plot(range(len(r.row_labels)), r.resid_norm[:, position], marker="o", label="|resid|")
    ax.plot(range(1, len(r.row_labels)), r.attn_delta_norm[:, position], label="|attn out|")
    ax.plot(range(1, len(r.row_labels)), r.mlp_delta_norm[:, position], label="|mlp out|")
    ax.set_xticks(range(len(r.row_labels)), r.row_labels, rotation=90, fontsize=7)
    ax.set_title(f"Residual stream at position {position} {r.tokens[position]!r}")
    ax.legend()
    return _save(fig)


def steps_chart(s: StepAttribution, k: int) -> bytes:
    """One horizontal bar chart per reasoning step (top-k components)."""
    plt = _plt()
    n = max(1, len(s.steps))
    fig, axes = plt.subplots(n, 1, figsize=(7, 0.35 * k * n + 0.8 * n), squeeze=False)
    for ax, st in zip(axes[:, 0], s.steps):
        top = st.attribution.top(k)[::-1]
        ax.barh([c.component.label for c in top], [c.score for c in top], color=[sign_colour(c.score) for c in top])
        ax.set_title(f"Step {st.index}: {st.text[:70]}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _caption(fig, LEGEND)
    return _save(fig)


def weight_heatmap(w: WeightView) -> bytes:
    """Each head's matrix (or the one MLP matrix) as a diverging heatmap."""
    plt = _plt()
    n = w.matrices.shape[0]
    cols = min(n, 3)
    rows = -(-n // cols)
    lim = _limit(w.matrices)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        im = ax.imshow(w.matrices[i], cmap=DIVERGING_CMAP, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(f"head {i}" if w.per_head else w.weight, fontsize=9)
        ax.set_xlabel(w.col_axis, fontsize=8)
        ax.set_ylabel(w.row_axis, fontsize=8)
    fig.suptitle(w.spec)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    _caption(fig, WEIGHT_LEGEND)
    return _save(fig)


def arithmetic_chart(g: ArithmeticGraph, fmt: str = "png") -> bytes:
    """The graph (operands -> heads -> answer, MLPs -> answer) beside the answer's rank by layer."""
    plt = _plt()
    fig, (ax, ax_rank) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    columns = {"operand": 0.0, "operator": 0.0, "head": 1.0, "mlp": 1.0, "answer": 2.0}
    placed: dict[str, tuple[float, float]] = {}
    for kind_group in (("operand", "operator"), ("head", "mlp"), ("answer",)):
        group = [n for n in g.nodes if n.kind in kind_group]
        for i, node in enumerate(group):
            placed[node.id] = (columns[node.kind], 1 - (i + 1) / (len(group) + 1))
    # attention weights and logit contributions have different units: scale each kind on its own
    top = {kind: max([abs(e.weight) for e in g.edges if e.kind == kind] or [1.0]) or 1.0 for kind in ("attends", "writes")}
    for e in g.edges:
        (x0, y0), (x1, y1) = placed[e.source], placed[e.target]
        colour = UNSIGNED if e.kind == "attends" else sign_colour(e.weight)
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.5 + 3.5 * abs(e.weight) / top[e.kind], "alpha": 0.8})
    colours = {"operand": "#8172b2", "operator": "#cccccc", "head": "#64b5cd", "mlp": "#dd8452", "answer": "#ffd166"}
    for node in g.nodes:
        x, y = placed[node.id]
        text = {"operand": f"{node.label} @{node.position}", "operator": node.label, "answer": node.label}.get(node.kind, f"{node.label}\n{node.value:+.2f}")
        ax.text(x, y, text, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": colours[node.kind], "ec": "black", "lw": 0.5})
    ax.set_xlim(-0.4, 2.4)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(f"How the model wrote {g.answer.token!r} (grey arrows: attention weight; blue/red arrows: logit written)", fontsize=9)
    ax_rank.plot(range(len(g.answer_rank)), np.log10(g.answer_rank + 1), marker="o")
    ax_rank.set_xlabel("layer (0 = embeddings)")
    ax_rank.set_ylabel("log10(answer rank + 1)")
    ax_rank.set_title("Answer rank through the layers", fontsize=9)
    _caption(fig, LEGEND)
    return _save(fig, fmt)


def _label(a: Attribution) -> str:
    text = repr(a.target.token)
    return text if a.contrast is None else f"{text} - {a.contrast.token!r}"


# -- causal tools -------------------------------------------------------------------------------
MAX_HEAT_ROWS = 40


def patch_heatmap(r: PatchingResult, sweep: str) -> bytes:
    """A sweep's normalised patching scores (1 = restores clean, 0 = corrupt)."""
    plt = _plt()
    if sweep in ("neurons", "features"):
        return _unit_chart(r, sweep)
    values, rows, cols = r.grid(sweep)
    if sweep == "heads-pos" and len(rows) > MAX_HEAT_ROWS:  # keep the heads that matter
        keep = np.sort(np.argsort(-np.nanmax(np.abs(values), axis=1))[:MAX_HEAT_ROWS])
        values, rows = values[keep], [rows[i] for i in keep]
    lim = _limit(values)
    fig, ax = plt.subplots(figsize=(1.6 + 0.5 * len(cols), 1.0 + 0.26 * len(rows)))
    im = ax.imshow(values, cmap=DIVERGING_CMAP, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if sweep != "heads" else 0, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"Activation patching ({sweep}): logit({r.target.token!r}) - logit({r.contrast.token!r}) restored", fontsize=9)
    fig.colorbar(im, ax=ax, label="normalised score")
    _caption(fig, PATCHING_LEGEND)
    return _save(fig)


def _unit_chart(r: PatchingResult, sweep: str) -> bytes:
    """Neurons and features are too many for a heatmap: the top 30 by |score| as bars."""
    plt = _plt()
    top = r.top(30, sweep)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(top) + 1))
    ax.barh([p.site.label for p in top], [p.score for p in top], color=[sign_colour(p.score) for p in top])
    ax.tick_params(labelsize=7)
    how = "Attribution patching" if sweep == "neurons" or r.method == "attribution" else "Activation patching"
    ax.set_title(f"{how}: top {sweep}", fontsize=9)
    _caption(fig, PATCHING_LEGEND)
    return _save(fig)


def patch_scatter(r: PatchingResult) -> bytes:
    """Exact score against the attribution estimate, one point per site (method both)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for sweep in r.sweeps:
        rows = [p for p in r.of(sweep) if p.attribution is not None]
        ax.scatter([p.score for p in rows], [p.attribution for p in rows], s=8, alpha=0.7, label=sweep)
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.6, ls="--")
    ax.set_xlabel("exact patching score")
    ax.set_ylabel("attribution patching estimate")
    ax.set_title("Where the linear approximation holds", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig)


def ablation_chart(r: AblationResult) -> bytes:
    """Probabilities of the top tokens before and after ablation."""
    plt = _plt()
    ids = list(dict.fromkeys([t.id for t in r.before.top] + [t.id for t in r.after.top]))[:12]
    names = {t.id: t.token for t in (*r.before.top, *r.after.top)}
    before = {t.id: t.prob for t in r.before.top}
    after = {t.id: t.prob for t in r.after.top}
    x = np.arange(len(ids))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ids)), 3.4))
    ax.bar(x - 0.2, [before.get(i, 0.0) for i in ids], 0.4, label="before", color="#4c72b0")
    ax.bar(x + 0.2, [after.get(i, 0.0) for i in ids], 0.4, label="after", color="#dd8452")
    ax.set_xticks(x, [repr(names[i]) for i in ids], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("probability (0 = outside that top-k)")
    ax.set_title(f"Ablating {', '.join(s.label for s in r.sites)} ({r.mode}); KL = {r.kl:.3f}", fontsize=9)
    ax.legend()
    return _save(fig)


def heads_map(h: HeadClassification) -> bytes:
    """One layers x heads map per role score."""
    plt = _plt()
    roles = list(h.scores)
    n_layers, n_heads = h.scores[roles[0]].shape
    fig, axes = plt.subplots(1, len(roles), figsize=(1.2 + len(roles) * (0.9 + 0.32 * n_heads), 1.2 + 0.24 * n_layers), squeeze=False)
    for ax, role in zip(axes[0], roles):
        im = ax.imshow(h.scores[role], cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(role.replace("_", " "), fontsize=9)
        ax.set_xticks(range(n_heads), [str(i) for i in range(n_heads)], fontsize=6)
        ax.set_yticks(range(n_layers), [f"L{i}" for i in range(n_layers)], fontsize=6)
        for layer, row in enumerate(h.labels):
            for head, label in enumerate(row):
                if label == role:
                    ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="score (red box: the head's label)")
    return _save(fig)


# -- traced generation --------------------------------------------------------------------------
def reasoning_graph_chart(g: GenerationResult, fmt: str = "png") -> bytes:
    """Prompt and steps left to right; an arc from each source to the step that drew on it."""
    import textwrap

    plt = _plt()
    nodes = list(g.graph.nodes) if g.graph else ["prompt"]
    x = {n: 1.6 * i for i, n in enumerate(nodes)}
    edges = g.graph.edges if g.graph else ()
    fig, ax = plt.subplots(figsize=(max(6, 2.3 * len(nodes)), 4.2))
    top = max([abs(e.weight) for e in edges] or [1.0]) or 1.0
    for e in edges:
        x0, x1 = x[e.source], x[e.target]
        height = 0.25 + 0.18 * (x1 - x0)  # longer reach, higher arc: arcs never cover each other's labels
        t = np.linspace(0, 1, 50)
        colour = sign_colour(e.weight)
        ax.plot(x0 + (x1 - x0) * t, 0.18 + height * 4 * t * (1 - t), color=colour, lw=0.6 + 4 * abs(e.weight) / top, alpha=0.8)
        ax.annotate("", (x1, 0.16), (x1 - 0.02, 0.22), arrowprops={"arrowstyle": "->", "color": colour})
        ax.text((x0 + x1) / 2, 0.2 + height, f"{e.weight:+.1f}", ha="center", fontsize=7, color=colour)
    texts = {s.index: s.text for s in g.steps}
    for n in nodes:
        label = "prompt" if n == "prompt" else n + "\n" + "\n".join(textwrap.wrap(texts[int(n.split()[1])], 22)[:3])
        ax.text(x[n], 0, label, ha="center", va="top", fontsize=7, bbox={"boxstyle": "round", "fc": "#dddddd" if n == "prompt" else "#64b5cd", "ec": "black", "lw": 0.5})
    ax.set_xlim(-0.9, x[nodes[-1]] + 0.9)
    ax.set_ylim(-0.7, 0.5 + 0.18 * x[nodes[-1]] + 0.3)
    ax.axis("off")
    ax.set_title("Reasoning graph: logit moved by attention from each source into each step", fontsize=9)
    _caption(fig, LEGEND)
    return _save(fig, fmt)


def generation_steps_chart(g: GenerationResult, k: int) -> bytes:
    """One horizontal bar chart per generated step (components summed over its tokens)."""
    plt = _plt()
    n = max(1, len(g.steps))
    fig, axes = plt.subplots(n, 1, figsize=(7, 0.35 * k * n + 0.8 * n), squeeze=False)
    for ax, s in zip(axes[:, 0], g.steps):
        top = s.top[:k][::-1]
        ax.barh([c.component.label for c in top], [c.score for c in top], color=[sign_colour(c.score) for c in top])
        ax.set_title(f"Step {s.index}: {s.text[:70]}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _caption(fig, LEGEND)
    return _save(fig)
