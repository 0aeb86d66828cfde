"""The one JSON schema for ``--json``, the report's ``hexray.json`` and the server's answers."""

from __future__ import annotations

import math

import numpy as np

from hexray.analysis.lens import LayerSnapshot
from hexray.analysis.report import Report
from hexray.generation.results import GenerationResult, ReasoningGraph, TokenRecord
from hexray.intervene.results import AblationResult, Distribution, PatchingResult, PatchScore
from hexray.models.loading import ModelSpec
from hexray.tracing.sites import head as head_component
from hexray.analysis.results import ArithmeticGraph, HeadAttention, HeadClassification, Attribution, ComponentScore, LogitLens, ResidualTrace, StepAttribution, TokenScore, WeightView


def token_doc(t: TokenScore | None) -> dict | None:
    return None if t is None else {"token": t.token, "id": t.id, "logit": _num(t.logit), "prob": _num(t.prob)}


def component_doc(c: ComponentScore) -> dict:
    return {**component_doc_of(c.component), "score": _num(c.score)}


def attribution_doc(a: Attribution, *, top_k: int | None = None) -> dict:
    components = a.components if top_k is None else a.components[:top_k]
    return {
        "model": a.model,
        "prompt": a.prompt,
        "tokens": list(a.tokens),
        "token_ids": list(a.token_ids),
        "position": a.position,
        "target": token_doc(a.target),
        "contrast": token_doc(a.contrast),
        "value": _num(a.value),
        "granularity": a.granularity,
        "reconstruction_error": float(a.reconstruction_error),  # unrounded: it is ~1e-7
        "components": [component_doc(c) for c in components],
    }


def lens_doc(lens: LogitLens) -> dict:
    return {
        "position": lens.position,
        "target": token_doc(lens.target),
        "layers": [
            {"layer": r.label, "target_rank": r.target_rank, "target_prob": _num(r.target_prob), "top": [token_doc(t) for t in r.top]}
            for r in lens.rows
        ],
    }


def residual_doc(r: ResidualTrace) -> dict:
    return {
        "rows": list(r.row_labels),
        "resid_norm": _arr(r.resid_norm),
        "attn_delta_norm": _arr(r.attn_delta_norm),
        "mlp_delta_norm": _arr(r.mlp_delta_norm),
        "lens_top_tokens": [list(row) for row in r.lens_top_tokens],
        "lens_top_probs": _arr(r.lens_top_probs),
        "lens_positions": list(r.lens_positions),
    }


def steps_doc(s: StepAttribution, top_k: int) -> dict:
    return {
        "rule": s.rule,
        "steps": [
            {
                "index": st.index,
                "text": st.text,
                "token_span": list(st.token_span),
                "position": st.attribution.position,
                "target": token_doc(st.attribution.target),
                "value": _num(st.attribution.value),
                "components": [component_doc(c) for c in st.attribution.top(top_k)],
            }
            for st in s.steps
        ],
    }


def weight_doc(w: WeightView) -> dict:
    return {
        "spec": w.spec, "layer": w.layer, "weight": w.weight, "per_head": w.per_head,
        "shape": list(w.matrices.shape), "axes": ["head", w.row_axis, w.col_axis], "norms": _arr(w.norms),
    }


def arithmetic_doc(g: ArithmeticGraph) -> dict:
    return {
        "position": g.position,
        "answer": token_doc(g.answer),
        "operand_positions": list(g.operand_positions),
        "operator_positions": list(g.operator_positions),
        "answer_rank_by_layer": _arr(g.answer_rank),
        "mlp_scores": _arr(g.mlp_scores),
        "head_scores": _arr(g.head_scores),
        "operand_attention": _arr(g.operand_attention),
        "nodes": [{"id": n.id, "label": n.label, "kind": n.kind, "position": n.position, "value": _num(n.value)} for n in g.nodes],
        "edges": [{"source": e.source, "target": e.target, "kind": e.kind, "weight": _num(e.weight)} for e in g.edges],
    }


def report_document(report: Report) -> dict:
    """The whole ``hexray trace --json`` document: each computed analysis's section (registry order)."""
    ctx, doc = report.context, {}
    for analysis, result in report.computed():
        part = analysis.document(result, ctx)
        if analysis.json_key is None:
            doc.update(part)
        else:
            doc[analysis.json_key] = part
        if analysis.table is not None and analysis.lab_panel == "analyses-panel":
            doc.setdefault("views", {})[analysis.name] = view_doc(analysis.table(result, ctx))
    return doc


def view_doc(v) -> dict:
    """A registry :class:`~hexray.analysis.registry.View` as JSON (what the lab's generic panel draws)."""
    cell = lambda x: _num(x) if isinstance(x, float) else x  # noqa: E731
    return {"title": v.title, "columns": list(v.columns), "rows": [[cell(x) for x in row] for row in v.rows], "note": v.note}


def layer_attribution_docs(report: Report) -> list[dict]:
    """The attribution one layer at a time (what ``/ws/analyze`` streams once the final norm's scale exists).

    Each carries that layer's head scores (the document's ``head_scores`` row, when it has them)
    and its attention and MLP totals.
    """
    spec, a = report.spec, report.attribution
    if report.head_attribution is not None:  # asked for at any granularity: what ``head_scores`` holds
        heads = report.head_attribution.head_matrix(spec.n_layers, spec.n_heads)
    else:
        heads = a.head_matrix(spec.n_layers, spec.n_heads) if a.granularity == "head" else None
    attn, mlp = a.layer_totals(spec.n_layers)
    return [
        {"layer": layer, "n_layers": spec.n_layers, "heads": None if heads is None else _arr(heads[layer]),
         "attn": _num(attn[layer]), "mlp": _num(mlp[layer])}
        for layer in range(spec.n_layers)
    ]


def layer_snapshot_doc(s: LayerSnapshot) -> dict:
    """One block's live reading (``/ws/analyze``'s ``layer`` message, sent during the forward pass)."""
    return {
        "layer": s.layer, "n_layers": s.n_layers, "position": s.position,
        "resid_norm": _arr(s.resid_norm), "attn_norm": None if s.attn_norm is None else _arr(s.attn_norm),
        "mlp_norm": None if s.mlp_norm is None else _arr(s.mlp_norm),
        "lens": [token_doc(t) for t in s.lens], "target_rank": s.target_rank, "target_prob": None if s.target_prob is None else _num(s.target_prob),
    }


def model_info(spec: ModelSpec) -> dict:
    return {
        "name": spec.name, "architecture": spec.architecture, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
        "d_model": spec.d_model, "d_mlp": spec.d_mlp, "d_vocab": spec.d_vocab, "n_ctx": spec.n_ctx, "norm": spec.norm,
        "post_norms": spec.post_norms, "weights": spec.weights or None,
        "logit_softcap": spec.logit_softcap,  # when set, "value" and the components are pre-cap logits
    }


def patch_document(r: PatchingResult, spec: ModelSpec) -> dict:
    """``hexray patch --json``: every patched site with its normalised score."""

    def site(p: PatchScore) -> dict:
        c = p.site.component
        row = {"name": c.name, "kind": c.kind, "layer": c.layer, "head": c.head, "position": p.site.position, "sweep": p.sweep, "score": _num(p.score)}
        if c.neuron is not None:
            row["neuron"] = c.neuron
        if c.feature is not None:
            row |= {"feature": c.feature, "site": c.site}
        if p.attribution is not None:
            row["attribution"] = _num(p.attribution)
        return row

    return {
        "model": r.model,
        "model_info": model_info(spec),
        "metric": r.metric,
        "method": r.method,
        "sweeps": list(r.sweeps),
        "last_position_only": r.last_position_only,
        "clean_prompt": r.clean_prompt,
        "corrupt_prompt": r.corrupt_prompt,
        "clean_tokens": list(r.clean_tokens),
        "corrupt_tokens": list(r.corrupt_tokens),
        "clean_token_ids": list(r.clean_token_ids),
        "corrupt_token_ids": list(r.corrupt_token_ids),
        "target": token_doc(r.target),
        "contrast": token_doc(r.contrast),
        "clean_value": _num(r.clean_value),
        "corrupt_value": _num(r.corrupt_value),
        "correlation": None if r.correlation is None else {k: None if v is None else _num(v) for k, v in r.correlation.items()},
        "results": [site(p) for p in r.results],
    }


def distribution_doc(d: Distribution) -> dict:
    return {"top": [token_doc(t) for t in d.top], "target": token_doc(d.target), "contrast": token_doc(d.contrast), "logit_diff": None if d.logit_diff is None else _num(d.logit_diff)}


def ablation_document(r: AblationResult, spec: ModelSpec) -> dict:
    """``hexray ablate --json``: the distribution before and after, and their KL divergence."""
    return {
        "model": r.model,
        "model_info": model_info(spec),
        "prompt": r.prompt,
        "tokens": list(r.tokens),
        "token_ids": list(r.token_ids),
        "position": r.position,
        "components": [
            {"name": s.component.name, "kind": s.component.kind, "layer": s.component.layer, "head": s.component.head,
             "neuron": s.component.neuron, "position": s.position, "label": s.label}
            | ({"feature": s.component.feature, "site": s.component.site, "clamp": _opt(s.value), "steer": _opt(s.steer)} if s.component.kind == "feature" else {})
            for s in r.sites
        ],
        "mode": r.mode,
        "n_reference": r.n_reference,
        "samples": r.samples,
        "before": distribution_doc(r.before),
        "after": distribution_doc(r.after),
        "kl": _num(r.kl),
    }


def heads_document(h: HeadClassification, spec: ModelSpec) -> dict:
    """``hexray heads --json``: every head's role scores and label."""
    return {
        "model": h.model,
        "model_info": model_info(spec),
        "prompt": h.prompt,
        "threshold": h.threshold,
        "induction_data": {"seq_len": h.seq_len, "n_sequences": h.n_sequences, "seed": h.seed},
        "heads": [
            {"name": head_component(layer, head).name, "layer": layer, "head": head, "scores": {k: _num(v) for k, v in scores.items()}, "label": label}
            for layer, head, scores, label in h.heads()
        ],
    }


def head_attention_document(a: HeadAttention) -> dict:
    """One head's attention pattern (rounded to 4 places: it is drawn, not computed on), role scores and inspector metrics."""
    return {
        "model": a.model, "prompt": a.prompt, "tokens": list(a.tokens), "layer": a.layer, "head": a.head,
        "name": a.name, "scores": {k: _num(v) for k, v in a.scores.items()},
        "pattern": _arr(np.round(a.pattern, 4)),
        "entropy": _arr(a.entropy), "mean_entropy": _num(a.mean_entropy),
        "concentration": _arr(a.concentration), "mean_concentration": _num(a.mean_concentration),
        "value_norm": _arr(a.value_norm), "output_norm": _arr(a.output_norm), "sink_excluded": a.sink_excluded,
        "top_pairs": [token_pair_doc(p) for p in a.top_pairs], "top_moved_pairs": [token_pair_doc(p) for p in a.top_moved_pairs],
    }


def _num(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _opt(x: float | None) -> float | None:
    return None if x is None else _num(x)


def _arr(a: np.ndarray) -> list:
    """Nested lists with NaN/inf as null, so the document is strict JSON."""
    a = np.round(np.asarray(a, dtype=float), 6)
    if a.ndim == 0:
        return _num(a)  # type: ignore[return-value]
    return [_arr(row) if a.ndim > 1 else _num(v) for row, v in zip(a, a)]


def token_record_doc(r: TokenRecord) -> dict:
    """One line of ``hexray generate --json``."""
    return {
        "index": r.index, "token": r.token, "id": r.id, "prob": _num(r.prob), "logit": _num(r.logit), "position": r.position,
        "top": [component_doc(c) for c in r.top], "watch": {k: _num(v) for k, v in r.watch.items()}, "crossed": list(r.crossed),
        "features": [{"dictionary": f.dictionary, "label": f.label, "feature": f.feature, "activation": _num(f.activation), "attribution": _num(f.attribution)} for f in r.features],
    }


def generation_steps_doc(g: GenerationResult) -> list[dict]:
    return [
        {
            "index": s.index, "text": s.text, "char_span": list(s.char_span), "token_span": list(s.token_span),
            "top": [component_doc(c) for c in s.top], "change": [component_doc(c) for c in s.change],
            "depends": [{"source": d.source, "attention": _num(d.attention), "dla": _num(d.dla)} for d in s.depends],
            "top_prompt_tokens": [{"position": p, "token": t, "dla": _num(v)} for p, t, v in s.top_prompt_tokens],
        }
        for s in g.steps
    ]


def graph_doc(graph: ReasoningGraph | None) -> dict | None:
    if graph is None:
        return None
    return {
        "nodes": list(graph.nodes), "threshold": graph.threshold,
        "edges": [{"source": e.source, "target": e.target, "weight": _num(e.weight), "attention": _num(e.attention)} for e in graph.edges],
    }


def generation_done_doc(g: GenerationResult) -> dict:
    """The last line of ``hexray generate --json``."""
    return {
        "done": True, "model": g.model, "stop_reason": g.stop_reason, "chat": g.chat,
        "prompt_token_ids": list(g.prompt_token_ids), "generated_ids": list(g.generated_ids), "text": g.text,
        "granularity": g.granularity, "rule": g.rule, "steps": generation_steps_doc(g), "graph": graph_doc(g.graph),
    }


# -- dataset-level runs -------------------------------------------------------------------------
def spread_doc(s) -> dict | None:
    return None if s is None else {"mean": _num(s.mean), "std": _num(s.std), "min": _num(s.min), "max": _num(s.max), "n": s.n}


def dataset_attribution_document(d, spec: ModelSpec) -> dict:
    """``hexray trace --prompts FILE --json``: each component's mean and spread over the set."""
    return {
        "model": d.model, "model_info": model_info(spec), "granularity": d.granularity, "token_index": d.token_index,
        "n_prompts": len(d.prompts), "value": spread_doc(d.value),
        "prompts": [{"prompt": p.prompt, "position": p.position, "target": token_doc(p.target), "contrast": token_doc(p.contrast), "value": _num(p.value)} for p in d.prompts],
        "components": [{**{k: v for k, v in component_doc_of(c.component).items()}, "score": spread_doc(c.score)} for c in d.components],
    }


def component_doc_of(comp) -> dict:
    doc = {"name": comp.name, "kind": comp.kind, "layer": comp.layer, "head": comp.head, "neuron": comp.neuron}
    if comp.kind in ("feature", "error", "skip"):  # a dictionary's parts: which latent, at which site
        doc |= {"feature": comp.feature, "site": comp.site}
    return doc


def features_doc(f) -> dict:
    """One dictionary's features per token (:class:`hexray.analysis.features.TokenFeatures`)."""
    return {
        "dictionary": f.dictionary, "site": f.site,
        "tokens": [
            {"position": p, "token": f.tokens[p], "l0": int(f.l0[p]), "relative_error": _num(float(f.relative_error[p])),
             "features": [{"feature": a.feature, "label": a.label, "activation": _num(a.activation)} for a in row]}
            for p, row in enumerate(f.top)
        ],
    }


def dataset_patch_document(d, spec: ModelSpec) -> dict:
    """``hexray patch --prompts FILE --json``: each site's mean and spread of the normalised score."""
    return {
        "model": d.model, "model_info": model_info(spec), "method": d.method, "sweeps": list(d.sweeps), "n_pairs": len(d.pairs),
        "pairs": [{"clean": p.clean, "corrupt": p.corrupt, "target": p.target, "contrast": p.contrast, "clean_value": _num(p.clean_value), "corrupt_value": _num(p.corrupt_value)} for p in d.pairs],
        "results": [{**component_doc_of(s.site.component), "position": s.site.position, "sweep": s.sweep, "score": spread_doc(s.score)} for s in d.sites],
    }


def dataset_ablation_document(d, spec: ModelSpec) -> dict:
    """``hexray ablate --prompts FILE --json``: KL and the target's probability, mean and spread."""
    return {
        "model": d.model, "model_info": model_info(spec), "components": d.components, "mode": d.mode, "n_prompts": len(d.prompts),
        "kl": spread_doc(d.kl), "p_before": spread_doc(d.p_before), "p_after": spread_doc(d.p_after), "logit_diff_change": spread_doc(d.logit_diff_change),
        "prompts": [{"prompt": p.prompt, "target": p.target, "p_before": _num(p.p_before), "p_after": _num(p.p_after), "kl": _num(p.kl),
                     "logit_diff_before": None if p.logit_diff_before is None else _num(p.logit_diff_before),
                     "logit_diff_after": None if p.logit_diff_after is None else _num(p.logit_diff_after)} for p in d.prompts],
    }


def circuit_document(c) -> dict:
    """A :class:`~hexray.analysis.results.Circuit` for the lab's circuit view (layers × heads, plus an MLP column).

    Nodes carry ``layer`` and ``head`` (None for an MLP) to place them on the grid; an edge names its
    ``source`` and ``destination`` (None: the explained logit) by node name.
    """
    return {
        "model": c.model,
        "prompt": c.prompt,
        "tokens": list(c.tokens),
        "token_ids": list(c.token_ids),
        "position": c.position,
        "target": token_doc(c.target),
        "contrast": token_doc(c.contrast),
        "value": _num(c.value),
        "method": c.method,
        "output_norm": _arr(c.head_write_norm), "mlp_norm": _arr(c.mlp_write_norm),  # the view's brightness
        "nodes": [{"name": n.component.name, "kind": n.component.kind, "layer": n.component.layer, "head": n.component.head, "score": _num(n.score)} for n in c.nodes],
        "edges": [
            {"source": e.source.name, "destination": None if e.destination is None else e.destination.name, "score": _num(e.score), "exact": e.exact}
            for e in c.edges
        ],
    }


# -- token flow ---------------------------------------------------------------------------------
from hexray.analysis.results import TokenFlow, TokenPair  # noqa: E402


def token_pair_doc(p: TokenPair) -> dict:
    """A (query, key) pair with its tokens; ``moved`` only where the result has it (the head inspector)."""
    doc = {"query": p.query, "key": p.key, "query_token": p.query_token, "key_token": p.key_token, "weight": _num(p.weight)}
    if p.moved is not None:
        doc["moved"] = _num(p.moved)
    return doc


def token_flow_document(flow: TokenFlow) -> dict:
    """Attention between token pairs summed over heads and layers (maps rounded to 4 places: they are drawn).

    ``row_sum`` is what each row of the map ``top_pairs`` ranks sums to (``n_layers * n_heads`` for
    ``total``, ``n_heads`` for ``layer_map``), to scale the drawing by.
    """
    return {
        "model": flow.model, "prompt": flow.prompt, "tokens": list(flow.tokens), "token_ids": list(flow.token_ids),
        "n_layers": flow.n_layers, "n_heads": flow.n_heads, "layer": flow.layer,
        "total": _arr(np.round(flow.total, 4)),
        "by_layer": _arr(flow.by_layer), "sink_by_layer": _arr(flow.sink_by_layer),
        "layer_map": None if flow.layer_map is None else _arr(np.round(flow.layer_map, 4)),
        "row_sum": flow.n_heads * (flow.n_layers if flow.layer is None else 1),
        "sink_excluded": flow.sink_excluded,
        "top_pairs": [token_pair_doc(p) for p in flow.top_pairs],
    }


# -- the neuroscope --------------------------------------------------------------------------------
def example_doc(e) -> dict:
    """One stored example (:class:`hexray.neuroscope.pages.Example`): what the model saw and the window's activations."""
    return {
        "context": e.context, "position": e.position, "activation": _num(e.activation), "document": e.document,
        "token": e.token, "context_ids": list(e.context_ids), "window_start": e.window_start,
        "tokens": list(e.tokens), "token_ids": list(e.token_ids), "acts": [None if a != a else _num(a) for a in e.acts],
        **({"band": [_num(e.band[0]), _num(e.band[1])]} if e.band else {}),
    }


def unit_page_doc(page, info) -> dict:
    """``hexray neuron|head|feature --json``: a unit's page (:class:`hexray.neuroscope.pages.UnitPage`)."""
    effect = lambda x: {"token": x.token, "id": x.token_id, "value": _num(x.value)}  # noqa: E731
    label = lambda x: {"text": x.text, "rule": x.rule, "tokens": list(x.tokens), "score": _num(x.score), "source": x.source}  # noqa: E731
    return {
        "unit": {**component_doc_of(page.unit), "dictionary": page.dictionary or None}, "name": page.name,
        "index": {"path": str(info.path), "model": info.model, "corpus": info.corpus, "tokens": info.tokens},
        "max": _num(page.max), "mean": _num(page.mean), "density": _num(page.density), "fired": page.fired, "counted": page.counted,
        "top": [example_doc(e) for e in page.top], "samples": [example_doc(e) for e in page.samples],
        "histogram": [{"lower": _num(b.lower), "upper": _num(b.upper), "count": b.count} for b in page.histogram],
        "nonpositive": page.nonpositive, "sampled": page.sampled,
        "promoted": [effect(x) for x in page.promoted], "suppressed": [effect(x) for x in page.suppressed],
        "label": label(page.label) if page.label else None, "labels": [label(x) for x in page.labels],
    }


def unit_hits_doc(hits, *, search: dict) -> dict:
    """``hexray index search --json``: the units found, best first."""
    return {"search": search, "hits": [{"name": h.unit.name, **component_doc_of(h.unit.unit), "dictionary": h.unit.dictionary or None,
                                        "score": _num(h.score), "activation": _num(h.activation), "max": _num(h.max)} for h in hits]}
