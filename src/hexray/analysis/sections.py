"""The built-in analyses of ``hexray trace`` as registry entries (see :mod:`hexray.analysis.registry`).

Compute functions live in their own modules (attribution, lens, steps, weights, arithmetic);
renderers are referenced lazily, since they sit above the analyses.
"""

from __future__ import annotations

from hexray.analysis.arithmetic import arithmetic_graph, arithmetic_hooks
from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.lens import lens_hooks, logit_lens, next_token_predictions, residual_hooks, residual_trace
from hexray.analysis.registry import Analysis, View, lazy
from hexray.analysis.steps import step_attribution
from hexray.analysis.weights import weight_view
from hexray.options import Option

_console = "hexray.render.console:"
_plots = "hexray.render.plots:"
_doc = "hexray.render.jsondoc:"
_html = "hexray.render.html:"


def _lens_window(position: int, window: int) -> range | None:
    return range(max(0, position - window + 1), position + 1) if window else None


def _head_attribution(model, trace, ctx):
    a = ctx.attribution
    if a.granularity != "layer":
        return a
    return direct_logit_attribution(model, trace, position=a.position, target=a.target.id, contrast=a.contrast.id if a.contrast else None, granularity="head")


def _core_figures(a, ctx) -> dict[str, bytes]:
    out = {"layer_attribution.png": lazy(_plots + "layer_bars")(a, ctx.spec)}
    if a.granularity != "layer" and not ctx.options.logit_debug:
        out["head_attribution.png"] = lazy(_plots + "head_heatmap")(a, ctx.spec)
    return out


def _core_document(a, ctx) -> dict:
    doc = lazy(_doc + "attribution_doc")(a)
    doc["model_info"] = lazy(_doc + "model_info")(ctx.spec)
    attn, mlp = a.layer_totals(ctx.spec.n_layers)
    doc["layer_totals"] = {"attn": lazy(_doc + "_arr")(attn), "mlp": lazy(_doc + "_arr")(mlp)}  # per layer, at any granularity
    return doc


def _tuned_lens(model, trace, ctx):
    """(the tuned lens's LogitLens, its held-out KL per row {"tuned": [...], "logit": [...]} as measured when trained)."""
    from hexray.features.store import load_default_lens

    lens = load_default_lens(model)
    result = logit_lens(model, trace, position=ctx.attribution.position, target=ctx.attribution.target.id, k=ctx.options.lens_k, tuned=lens)
    return result, lens.meta.get("held_out_kl_bits")


def _example_lens(model) -> bool:
    """An untrained (identity) tuned lens in the model's default place, unless one is there."""
    from hexray.features.tuned_lens import default_tuned_lens_path, identity_tuned_lens, save_tuned_lens

    if not default_tuned_lens_path(model).exists():
        save_tuned_lens(identity_tuned_lens(model), default_tuned_lens_path(model))
    return True


def _tuned_view(r) -> View:
    lens, kl = r
    kl = kl or {"tuned": [None] * len(lens.rows), "logit": [None] * len(lens.rows)}
    return View(f"Tuned lens at position {lens.position}", ("after", "top tokens", "target rank", "target p", "KL tuned (bits)", "KL logit (bits)"),
                tuple((row.label, "  ".join(f"{t.token!r} {t.prob:.2f}" for t in row.top), row.target_rank, row.target_prob, kt, kl_)
                      for row, kt, kl_ in zip(lens.rows, kl["tuned"], kl["logit"])),
                note="KL: held-out, to the final distribution, measured when the lens was trained")


def _predictions_view(rows, ctx) -> View:
    return View(
        "Top next tokens at every position",
        ("position", "token", *(f"#{i + 1}" for i in range(len(rows[0]) if rows else 0))),
        tuple((pos, ctx.attribution.tokens[pos], *(f"{t.token!r} {t.prob:.2f}" for t in row)) for pos, row in enumerate(rows)),
    )


def _steps_view(s, ctx) -> View:
    return View(
        f"Reasoning steps (split by {s.rule})", ("step", "text", "position", "predicts", "value", "top components"),
        tuple((st.index, st.text[:60], st.attribution.position, repr(st.attribution.target.token), st.attribution.value,
               "  ".join(f"{c.name} {c.score:+.2f}" for c in st.attribution.top(3))) for st in s.steps),
    )


def _weights_view(views, ctx) -> View:
    return View("Weight matrices (Frobenius norm per head)", ("weight", "head", "shape", "norm"),
                tuple((v.spec, i if v.per_head else "-", "x".join(map(str, v.matrices.shape[1:])), float(n)) for v in views for i, n in enumerate(v.norms)))


def _arithmetic_view(g, ctx) -> View:
    return View(f"Arithmetic graph: answer {g.answer.token!r} at position {g.position}", ("from", "edge", "to", "weight"),
                tuple((e.source, e.kind, e.target, e.weight) for e in g.edges))


ANALYSES = (
    Analysis(
        name="residual",
        title="Residual stream",
        switch=Option("residual", bool, False, "Residual-stream trace (shown by default when no other analysis is asked for).", api_default=True),
        options=(Option("lens_window", int, 0, "> 0: the residual lens only at this many positions up to the explained one.", ge=0, api_le=4096, flag=""),),
        hooks=lambda spec, o: residual_hooks(spec),
        compute=lambda model, trace, ctx: residual_trace(model, trace, lens_positions=_lens_window(ctx.attribution.position, ctx.options.lens_window)),
        json_key="residual",
        document=lambda r, ctx: lazy(_doc + "residual_doc")(r),
        console=lambda r, ctx: lazy(_console + "residual_table")(r, ctx.attribution.position),
        figures=lambda r, ctx: {"residual_stream.png": lazy(_plots + "residual_chart")(r, ctx.attribution.position)},
        lab_panel="resid-panel",
    ),
    Analysis(
        name="logit_lens",
        title="Logit lens",
        switch=Option("logit_lens", bool, False, "Top tokens and the target's rank after every layer.", api_default=True),
        options=(Option("lens_k", int, 5, "Tokens per layer in the logit lens.", gt=0, api_le=50),),
        hooks=lambda spec, o: lens_hooks(spec),
        compute=lambda model, trace, ctx: logit_lens(model, trace, position=ctx.attribution.position, target=ctx.attribution.target.id, k=ctx.options.lens_k),
        json_key="logit_lens",
        document=lambda r, ctx: lazy(_doc + "lens_doc")(r),
        console=lambda r, ctx: lazy(_console + "lens_table")(r),
        figures=lambda r, ctx: {"logit_lens.png": lazy(_plots + "lens_heatmap")(r)},
        html=lambda r, ctx: lazy(_html + "lens_section")(r),
        lab_panel="lens-panel",
    ),
    Analysis(
        name="tuned_lens",
        title="Tuned lens",
        switch=Option("tuned_lens", bool, False, "The logit lens through the model's tuned lens (hexray lens train), beside the logit lens; with its held-out KL per layer."),
        hooks=lambda spec, o: lens_hooks(spec),
        compute=lambda model, trace, ctx: _tuned_lens(model, trace, ctx),
        example=lambda model: _example_lens(model),
        json_key="tuned_lens",
        document=lambda r, ctx: {**lazy(_doc + "lens_doc")(r[0]), "held_out_kl_bits": r[1]},
        console=lambda r, ctx: lazy(_console + "lens_table")(r[0], title="Tuned lens", kl=r[1]),
        table=lambda r, ctx: _tuned_view(r),
    ),
    Analysis(
        name="steps",
        title="Chain-of-thought steps",
        switch=Option("cot", bool, False, "Split the prompt into reasoning steps; attribute each step's last token in full context.", flag="--cot-debug"),
        compute=lambda model, trace, ctx: step_attribution(model, trace, granularity=ctx.options.granularity),
        json_key="cot",
        document=lambda r, ctx: lazy(_doc + "steps_doc")(r, ctx.options.top_k),
        console=lambda r, ctx: lazy(_console + "steps_bars")(r, ctx.options.top_k),
        figures=lambda r, ctx: {"cot_steps.png": lazy(_plots + "steps_chart")(r, ctx.options.top_k)},
        html=lambda r, ctx: lazy(_html + "steps_section")(r, ctx.options.top_k),
        table=_steps_view,
    ),
    Analysis(
        name="attribution",
        title="Direct logit attribution",
        compute=lambda model, trace, ctx: ctx.attribution,
        hooks=lambda spec, o: attribution_hooks(spec, o.granularity),
        document=_core_document,
        console=lambda a, ctx: lazy(_console + "attribution_table")(a, ctx.options.top_k),
        figures=_core_figures,
        html=lambda a, ctx: lazy(_html + "attribution_section")(a, ctx.options.top_k),
        lab_panel="dla-panel",
    ),
    Analysis(
        name="head_attribution",
        title="Per-head attribution",
        switch=Option("logit_debug", bool, False, "Per-head attribution heatmap and per-layer bars (PNG in --report), at any granularity.", api_name="head_scores", api_default=True),
        hooks=lambda spec, o: attribution_hooks(spec, "head"),
        compute=_head_attribution,
        json_key="head_scores",
        document=lambda a, ctx: lazy(_doc + "_arr")(a.head_matrix(ctx.spec.n_layers, ctx.spec.n_heads)),
        console=lambda a, ctx: None if a is ctx.attribution else lazy(_console + "attribution_table")(a, ctx.options.top_k, title="Top heads and MLP layers"),
        figures=lambda a, ctx: {"head_attribution.png": lazy(_plots + "head_heatmap")(a, ctx.spec)},
        lab_panel="dla-panel",
        report_by_default=True,
    ),
    Analysis(
        name="weights",
        title="Weight matrices",
        switch=Option("weight_specs", tuple[str, ...], (), "Weight to plot, e.g. attn.L10.W_Q or mlp.L6.W_in (repeatable).", flag="--weight-heatmap"),
        compute=lambda model, trace, ctx: tuple(weight_view(model, spec) for spec in ctx.options.weight_specs),
        json_key="weights",
        document=lambda views, ctx: [lazy(_doc + "weight_doc")(w) for w in views],
        console=lambda views, ctx: lazy(_console + "weights_tables")(views),
        figures=lambda views, ctx: {f"weights_{v.spec.replace('.', '_')}.png": lazy(_plots + "weight_heatmap")(v) for v in views},
        html=lambda views, ctx: lazy(_html + "weights_section")(views),
        table=_weights_view,
        absent=(),
        report_by_default=True,
    ),
    Analysis(
        name="arithmetic",
        title="Arithmetic graph",
        switch=Option("arithmetic", bool, False, "Graph of how the model computed an arithmetic answer (PNG/SVG in --report).", flag="--arithmetic-graph"),
        hooks=lambda spec, o: arithmetic_hooks(spec),
        compute=lambda model, trace, ctx: arithmetic_graph(model, trace, position=ctx.attribution.position),
        json_key="arithmetic",
        document=lambda g, ctx: lazy(_doc + "arithmetic_doc")(g),
        console=lambda g, ctx: lazy(_console + "arithmetic_summary")(g),
        figures=lambda g, ctx: {"arithmetic_graph.png": lazy(_plots + "arithmetic_chart")(g, "png"), "arithmetic_graph.svg": lazy(_plots + "arithmetic_chart")(g, "svg")},
        table=_arithmetic_view,
        report_by_default=True,
    ),
    Analysis(
        name="predictions",
        title="Next-token predictions",
        switch=Option("predictions_k", int, 0, "> 0: the top K next tokens at every position (the lab's token strip).", flag="--predictions", ge=0, api_le=50),
        compute=lambda model, trace, ctx: next_token_predictions(model, trace, k=ctx.options.predictions_k),
        json_key="predictions",
        document=lambda rows, ctx: [[lazy(_doc + "token_doc")(t) for t in row] for row in rows],
        table=_predictions_view,
        lab_panel="tokens-panel",
    ),
)
