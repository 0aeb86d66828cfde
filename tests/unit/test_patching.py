"""Activation patching: batched exact patching against a plain one-at-a-time hook loop, the 1/0 anchors,
attribution patching against finite differences, last-position patching and input errors.

The reference loops here never go through ``hexray.intervene``: they call
``model.bridge.run_with_hooks`` with one hook that copies the clean activation into the corrupt run,
and read the metric from the full logits.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hexray
from hexray.errors import HexRayError
from hexray.tracing.edits import run_variants
from hexray.intervene.patching import (
    _metric,
    activation_patching,
    attribution_scores,
    exact_patching_values,
    metric_gradients,
    parse_sweeps,
    sweep_sites,
)

CLEAN = "John said that Mary"  # 9 tokens with the tiny tokenizer, like CORRUPT
CORRUPT = "Mary said that John"
TARGET, CONTRAST = " Mary", " John"  # single tokens of the tiny tokenizer
EXACT_SWEEPS = ("heads", "heads-pos", "resid", "attn", "mlp")

# Hook names spelled here, independently of hexray.tracing.sites / patching.sweep_hook.
HOOK = {
    "heads": "blocks.{}.attn.hook_z",  # [batch, pos, n_heads, d_head]
    "heads-pos": "blocks.{}.attn.hook_z",
    "resid": "blocks.{}.hook_resid_pre",  # [batch, pos, d_model]
    "attn": "blocks.{}.hook_attn_out",
    "mlp": "blocks.{}.hook_mlp_out",
    "neurons": "blocks.{}.mlp.hook_post",  # [batch, pos, d_mlp]
}
ALL_HOOKS = {"heads", "resid", "attn", "mlp", "neurons"}

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# the independent reference
# ---------------------------------------------------------------------------------------------


def plain_logit_diff(model, ids, fwd_hooks, target: int, contrast: int) -> float:
    """logit(target) - logit(contrast) at the last position of a plain bridge forward with hooks."""
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(torch.tensor([list(ids)]), fwd_hooks=fwd_hooks)  # [1, pos, vocab]
    return float(logits[0, -1, target] - logits[0, -1, contrast])


def copy_hook(source: torch.Tensor, index: tuple):
    """A hook writing ``source[index]`` into ``x[0][index]``; ``source`` is [pos, ...] (no batch)."""

    def fn(x, hook=None):
        x = x.clone()
        x[0][index] = source[index].to(x.dtype)
        return x

    return fn


def site_index(site) -> tuple:
    """The index into a [pos, ...] activation that a patched site covers."""
    c = site.component
    pos = slice(None) if site.position is None else site.position
    if c.kind == "head":
        return (pos, c.head)
    if c.kind == "neuron":
        return (pos, c.neuron)
    return (pos,)


def reference_patch(model, base_ids, source_acts, site, sweep, target, contrast) -> float:
    """The raw metric after copying one site of ``source_acts`` into the base run, one forward pass."""
    hook = HOOK[sweep].format(site.component.layer)
    return plain_logit_diff(model, base_ids, [(hook, copy_hook(source_acts[hook], site_index(site)))], target, contrast)


def by_key(result):
    """{(sweep, site label): PatchScore}."""
    return {(r.sweep, r.site.label): r for r in result.results}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tiny_model):
    """Both prompts' ids, the target/contrast ids, the clean trace at every hook, and plain metric values."""
    model = tiny_model
    clean_ids, corrupt_ids = model.encode(CLEAN), model.encode(CORRUPT)
    assert len(clean_ids) == len(corrupt_ids) == 9
    t, c = model.single_token(TARGET), model.single_token(CONTRAST)
    hooks = {HOOK[s].format(layer) for s in ALL_HOOKS for layer in range(model.spec.n_layers)}
    clean_trace = hexray.run_trace(model, CLEAN, hooks)
    corrupt_trace = hexray.run_trace(model, CORRUPT, hooks)
    clean_value = plain_logit_diff(model, clean_ids, [], t, c)
    corrupt_value = plain_logit_diff(model, corrupt_ids, [], t, c)
    assert abs(clean_value - corrupt_value) > 0.05, "the prompts must give clearly different logit differences"
    return SimpleNamespace(
        model=model, clean_ids=clean_ids, corrupt_ids=corrupt_ids, t=t, c=c,
        clean_acts=clean_trace.acts, corrupt_acts=corrupt_trace.acts,
        clean_value=clean_value, corrupt_value=corrupt_value, span=clean_value - corrupt_value,
    )


@pytest.fixture(scope="module")
def exact_default(case):
    """Exact patching over every exact sweep with the default batch size."""
    return activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, sweeps=",".join(EXACT_SWEEPS))


# ---------------------------------------------------------------------------------------------
# 1. batched exact patching == one-at-a-time reference
# ---------------------------------------------------------------------------------------------


def test_exact_sites_are_every_expected_site(case, exact_default):
    """The result covers exactly the sites each sweep promises, in sweep order."""
    spec, n = case.model.spec, len(case.corrupt_ids)
    L, H = range(spec.n_layers), range(spec.n_heads)
    expected = (
        [("heads", f"L{layer}H{h}") for layer in L for h in H]
        + [("heads-pos", f"L{layer}H{h}@{p}") for layer in L for h in H for p in range(n)]
        + [(s, f"{name}{layer}@{p}") for s, name in (("resid", "RESID"), ("attn", "ATTN"), ("mlp", "MLP")) for layer in L for p in range(n)]
    )
    assert [(r.sweep, r.site.label) for r in exact_default.results] == expected
    assert exact_default.sweeps == EXACT_SWEEPS
    assert exact_default.correlation is None
    assert all(r.attribution is None for r in exact_default.results)


def test_exact_patching_matches_one_at_a_time_reference(case, exact_default):
    """Every exact score equals (reference - corrupt) / (clean - corrupt) from a plain hook loop (heads-pos: first and last position)."""
    r = exact_default
    assert r.clean_value == pytest.approx(case.clean_value, abs=1e-5)
    assert r.corrupt_value == pytest.approx(case.corrupt_value, abs=1e-5)
    n = len(case.corrupt_ids)
    checked = 0
    for row in r.results:
        if row.sweep == "heads-pos" and row.site.position not in (0, n - 1):
            continue
        raw = reference_patch(case.model, case.corrupt_ids, case.clean_acts, row.site, row.sweep, case.t, case.c)
        expected = (raw - case.corrupt_value) / case.span
        assert row.score == pytest.approx(expected, abs=TOL), f"{row.sweep} {row.site.label}"
        checked += 1
    spec = case.model.spec
    assert checked == len(r.results) - spec.n_layers * spec.n_heads * (n - 2)
    # not a vacuous comparison: some sites move the metric a lot
    assert max(abs(x.score) for x in r.results) > 0.1
    last = len(case.corrupt_ids) - 1
    assert by_key(r)[("resid", f"RESID0@{last}")].score != pytest.approx(0.0, abs=1e-3)


def test_resid_anchors(case, exact_default):
    """The reference is sound (RESID0 at every position at once gives the clean value) and RESID0 at positions
    where both prompts hold the same token scores 0."""
    hook = HOOK["resid"].format(0)
    raw = plain_logit_diff(case.model, case.corrupt_ids, [(hook, copy_hook(case.clean_acts[hook], (slice(None),)))], case.t, case.c)
    assert raw == pytest.approx(case.clean_value, abs=1e-5)
    # and the batched path agrees: RESID0 at positions where the prompts are identical changes nothing
    same = [p for p in range(len(case.clean_ids)) if case.clean_ids[p] == case.corrupt_ids[p]]
    assert same, "the prompts share some tokens"
    for p in same:
        assert by_key(exact_default)[("resid", f"RESID0@{p}")].score == pytest.approx(0.0, abs=TOL)


def test_batch_size_does_not_change_scores(case, exact_default):
    """batch_size=1 (no batching), 7 (ragged chunks across start layers) and the default give the same numbers."""
    kw = dict(target=TARGET, contrast=CONTRAST)
    small = activation_patching(case.model, CLEAN, CORRUPT, sweeps="heads,resid", batch_size=1, **kw)  # 26 forward passes
    seven = activation_patching(case.model, CLEAN, CORRUPT, sweeps=",".join(EXACT_SWEEPS), batch_size=7, **kw)
    default = by_key(exact_default)
    assert len(seven.results) == len(exact_default.results)
    for row in seven.results:
        assert row.score == pytest.approx(default[(row.sweep, row.site.label)].score, abs=TOL)
    for row in small.results:
        assert row.score == pytest.approx(default[(row.sweep, row.site.label)].score, abs=TOL)


def test_progress_reports_every_variant(case):
    """The progress callback ends at (n, n) for n patched sites, counting up monotonically."""
    calls = []
    activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, sweeps="heads", batch_size=3,
                        progress=lambda done, total: calls.append((done, total)))
    n = case.model.spec.n_layers * case.model.spec.n_heads
    assert calls[-1] == (n, n)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == math.ceil(n / 3)


# ---------------------------------------------------------------------------------------------
# 2. anchors: clean into clean is 1, patching nothing is 0
# ---------------------------------------------------------------------------------------------


def test_clean_into_clean_scores_one_and_nothing_scores_zero(case, exact_default):
    """Patching the clean run's own activations into it gives 1 at every site; an empty variant gives 0."""
    model, spec = case.model, case.model.spec
    n = len(case.clean_ids)
    site_sweeps = [(site, s) for s in (*EXACT_SWEEPS, "neurons")
                   for site in sweep_sites(spec, s, None if s in ("heads", "neurons") else list(range(n)))]
    raw = exact_patching_values(model, case.clean_ids, case.clean_acts, site_sweeps, target=case.t, contrast=case.c)  # [n_sites]
    assert raw.shape == (len(site_sweeps),)
    scores = (raw - exact_default.corrupt_value) / (exact_default.clean_value - exact_default.corrupt_value)
    torch.testing.assert_close(scores, torch.ones_like(scores), atol=TOL, rtol=0)

    final = run_variants(model, case.corrupt_ids, [()])  # [1, d_model]
    value = float(_metric(model, final, case.t, case.c)[0])
    assert (value - exact_default.corrupt_value) / (exact_default.clean_value - exact_default.corrupt_value) == pytest.approx(0.0, abs=TOL)
    # the unedited row of run_variants is the final residual of a plain forward
    hook = f"blocks.{spec.n_layers - 1}.hook_resid_post"
    _, cache = model.bridge.run_with_cache(torch.tensor([case.corrupt_ids]), names_filter=lambda name: name == hook)
    torch.testing.assert_close(final[0], cache[hook][0, -1].float(), atol=1e-5, rtol=1e-5)


def test_run_variants_read_position_and_mixed_start_layers(case):
    """Variants first editing different layers, in one chunk, each equal their own plain hooked run at read_position 4."""
    from hexray.tracing.edits import Edit

    model, spec = case.model, case.model.spec
    n = len(case.corrupt_ids)
    resid_last, attn0, z1 = HOOK["resid"].format(spec.n_layers - 1), HOOK["attn"].format(0), HOOK["heads"].format(1)

    def rows(*ps):  # [pos, 1] bool, true at positions ps
        m = torch.zeros(n, 1, dtype=torch.bool)
        m[list(ps)] = True
        return m

    head3 = torch.zeros(n, spec.n_heads, 1, dtype=torch.bool)  # [pos, n_heads, 1]
    head3[:, 3] = True
    variants = [
        (Edit(resid_last, rows(2), case.clean_acts[resid_last]),),
        (),
        (Edit(attn0, rows(*range(n)), torch.zeros(1, spec.d_model)),),
        (Edit(z1, head3, case.clean_acts[z1]), Edit(attn0, rows(0), case.clean_acts[attn0])),
    ]
    together = run_variants(model, case.corrupt_ids, variants, read_position=4)  # [4, d_model]
    assert together.shape == (4, spec.d_model)

    final = f"blocks.{spec.n_layers - 1}.hook_resid_post"
    for i, variant in enumerate(variants):
        store = {}

        def edit_hook(edit):
            return lambda x, hook=None: torch.where(edit.mask, edit.values.to(x.dtype), x[0])[None]

        def keep(x, hook=None):
            store["x"] = x.clone()
            return x

        with torch.no_grad():
            model.bridge.run_with_hooks(
                torch.tensor([case.corrupt_ids]), fwd_hooks=[(e.hook, edit_hook(e)) for e in variant] + [(final, keep)]
            )
        torch.testing.assert_close(together[i], store["x"][0, 4].float(), atol=1e-5, rtol=1e-5)
    for i in (0, 2, 3):  # the edits matter
        assert (together[i] - together[1]).abs().max() > 1e-4


def test_run_variants_two_edits_at_one_hook_keep_their_own_values(case):
    """Two Edits of one variant at one hook, disjoint masks, different values: each region gets its own values."""
    from hexray.tracing.edits import Edit

    model, spec = case.model, case.model.spec
    n = len(case.corrupt_ids)
    hook = HOOK["resid"].format(0)
    gen = torch.Generator().manual_seed(0)
    va, vb = torch.randn(1, spec.d_model, generator=gen), torch.randn(1, spec.d_model, generator=gen)  # [1, d_model]
    ma, mb = torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, 1, dtype=torch.bool)  # [pos, 1]
    ma[2], mb[5] = True, True
    got = run_variants(model, case.corrupt_ids, [(Edit(hook, ma, va), Edit(hook, mb, vb))])  # [1, d_model]
    store = {}

    def edit(x, hook=None):
        x = x.clone()
        x[0, 2], x[0, 5] = va[0], vb[0]
        return x

    def keep(x, hook=None):
        store["x"] = x.clone()
        return x

    with torch.no_grad():
        model.bridge.run_with_hooks(torch.tensor([case.corrupt_ids]),
                                    fwd_hooks=[(hook, edit), (f"blocks.{spec.n_layers - 1}.hook_resid_post", keep)])
    torch.testing.assert_close(got[0], store["x"][0, -1].float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. attribution patching
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attribution(case):
    """method="attribution" over every sweep, neurons included."""
    return activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method="attribution",
                               sweeps="heads,heads-pos,resid,attn,mlp,neurons")


def test_attribution_matches_finite_differences(case, attribution):
    """Each attribution score is the derivative of the exact patch along corrupt -> clean (forward difference, eps=1e-2)."""
    model = case.model
    eps = 1e-2
    source = {h: case.corrupt_acts[h] + eps * (case.clean_acts[h] - case.corrupt_acts[h]) for h in case.clean_acts}
    site_sweeps = [(r.site, r.sweep) for r in attribution.results]
    f_eps = exact_patching_values(model, case.corrupt_ids, source, site_sweeps, target=case.t, contrast=case.c)  # [n_sites]
    f_0 = exact_patching_values(model, case.corrupt_ids, case.corrupt_acts, site_sweeps, target=case.t, contrast=case.c)
    torch.testing.assert_close(f_0, torch.full_like(f_0, case.corrupt_value), atol=1e-5, rtol=0)
    fd = ((f_eps - f_0) / eps / case.span).double().numpy()
    attr = np.array([r.score for r in attribution.results])
    assert np.all(np.abs(fd - attr) <= 0.05 * np.abs(attr) + 1e-3), (
        f"worst site {site_sweeps[int(np.argmax(np.abs(fd - attr)))][0].label}: fd vs attribution "
        f"{fd[np.argmax(np.abs(fd - attr))]:.5f} vs {attr[np.argmax(np.abs(fd - attr))]:.5f}"
    )
    assert np.abs(attr).max() > 0.05  # not all zero
    assert attribution.correlation is None
    n_neurons = sum(r.sweep == "neurons" for r in attribution.results)
    assert n_neurons == model.spec.n_layers * model.spec.d_mlp


def test_attribution_parts_agree(case, attribution):
    """Per-position head scores sum to the all-position head score; resid at layer 0 sums to the total first-order change."""
    rows = by_key(attribution)
    spec, n = case.model.spec, len(case.corrupt_ids)
    for layer in range(spec.n_layers):
        for h in range(spec.n_heads):
            parts = sum(rows[("heads-pos", f"L{layer}H{h}@{p}")].score for p in range(n))
            assert rows[("heads", f"L{layer}H{h}")].score == pytest.approx(parts, abs=1e-5)

    # an independent first-order estimate from metric_gradients and attribution_scores directly
    hooks = {HOOK["resid"].format(0)}
    _, acts, grads = metric_gradients(case.model, case.corrupt_ids, hooks, target=case.t, contrast=case.c)
    h = HOOK["resid"].format(0)
    torch.testing.assert_close(acts[h], case.corrupt_acts[h], atol=1e-6, rtol=1e-6)
    delta_grad = {h: (case.clean_acts[h] - acts[h]) * grads[h]}
    sites = sweep_sites(spec, "resid", list(range(n)))[:n]  # layer 0
    scores = attribution_scores([(s, "resid") for s in sites], delta_grad) / case.span
    for s, v in zip(sites, scores.tolist()):
        assert rows[("resid", s.label)].score == pytest.approx(v, abs=1e-5)


def test_method_both_matches_exact_and_attribution(case, exact_default, attribution):
    """method="both": scores are the exact ones, .attribution the attribution ones, and correlations per sweep + "all"."""
    both = activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method="both",
                               sweeps=",".join(EXACT_SWEEPS))
    exact, attr = by_key(exact_default), by_key(attribution)
    assert len(both.results) == len(exact_default.results)
    for row in both.results:
        key = (row.sweep, row.site.label)
        assert row.score == pytest.approx(exact[key].score, abs=1e-6)
        assert row.attribution == pytest.approx(attr[key].score, abs=1e-6)
    assert set(both.correlation) == {*EXACT_SWEEPS, "all"}
    x = np.array([r.score for r in both.results])
    y = np.array([r.attribution for r in both.results])
    assert both.correlation["all"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-9)
    heads = [r for r in both.results if r.sweep == "heads"]
    assert both.correlation["heads"] == pytest.approx(
        float(np.corrcoef([r.score for r in heads], [r.attribution for r in heads])[0, 1]), abs=1e-9)


@pytest.mark.parametrize("method", ["exact", "both"])
def test_neurons_sweep_is_attribution_only(case, method):
    """The neurons sweep raises a HexRayError for exact and both; "all" quietly leaves it out there."""
    with pytest.raises(HexRayError, match="attribution-only"):
        activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method=method, sweeps="heads,neurons")
    assert "neurons" not in parse_sweeps("all", method)
    assert parse_sweeps("all", "attribution") == ("heads", "heads-pos", "resid", "attn", "mlp", "neurons")


# ---------------------------------------------------------------------------------------------
# 4. last position only
# ---------------------------------------------------------------------------------------------

SHORT_CLEAN, SHORT_CORRUPT = "2 + 3 =", "3 + 4 ="  # 5 and 4 tokens


def test_last_position_only_with_different_lengths(case):
    """Prompts of different lengths patch only the final token, exactly as a reference that patches [-1] only."""
    model = case.model
    clean_ids, corrupt_ids = model.encode(SHORT_CLEAN), model.encode(SHORT_CORRUPT)
    assert (len(clean_ids), len(corrupt_ids)) == (5, 4)
    result = activation_patching(model, SHORT_CLEAN, SHORT_CORRUPT, target=TARGET, contrast=CONTRAST,
                                 sweeps="heads,heads-pos,resid,attn,mlp", last_position_only=True, batch_size=5)
    hooks = {HOOK[s].format(layer) for s in ALL_HOOKS for layer in range(model.spec.n_layers)}
    clean_acts = hexray.run_trace(model, SHORT_CLEAN, hooks).acts
    clean_value = plain_logit_diff(model, clean_ids, [], case.t, case.c)
    corrupt_value = plain_logit_diff(model, corrupt_ids, [], case.t, case.c)
    assert result.clean_value == pytest.approx(clean_value, abs=1e-5)
    assert result.corrupt_value == pytest.approx(corrupt_value, abs=1e-5)
    spec = model.spec
    assert len(result.results) == 2 * spec.n_layers * spec.n_heads + 3 * spec.n_layers
    for row in result.results:
        assert row.site.position == 3  # the corrupt prompt's last position
        c = row.site.component
        hook = HOOK[row.sweep].format(c.layer)
        extra = () if c.kind not in ("head",) else (c.head,)

        def fn(x, hook=None, src=clean_acts[hook], extra=extra):
            x = x.clone()
            x[(0, -1, *extra)] = src[(-1, *extra)]
            return x

        raw = plain_logit_diff(model, corrupt_ids, [(hook, fn)], case.t, case.c)
        assert row.score == pytest.approx((raw - corrupt_value) / (clean_value - corrupt_value), abs=TOL), row.site.label
    # patching the last position of the final residual stream's input layer restores everything
    last_resid = by_key(result)[("resid", f"RESID{spec.n_layers - 1}@3")]
    assert abs(last_resid.score) > 0.01


def test_last_position_only_on_equal_lengths_matches_full_sweep(case, exact_default):
    """With equal lengths, --last-position scores equal the full sweep's scores at the last position."""
    last = len(case.corrupt_ids) - 1
    result = activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST,
                                 sweeps="heads-pos,resid,attn,mlp", last_position_only=True)
    full = by_key(exact_default)
    assert len(result.results) > 0
    for row in result.results:
        assert row.site.position == last
        assert row.score == pytest.approx(full[(row.sweep, row.site.label)].score, abs=TOL)


def test_different_lengths_without_last_position_raise(case):
    """Unequal prompt lengths without last_position_only raise a HexRayError naming both lengths."""
    with pytest.raises(HexRayError) as info:
        activation_patching(case.model, SHORT_CLEAN, SHORT_CORRUPT, target=TARGET, contrast=CONTRAST)
    assert "5" in info.value.message and "4" in info.value.message
    assert info.value.hint and "last_position" in info.value.hint


def test_last_position_attribution_uses_final_token_only(case):
    """Attribution with last_position_only: a per-position sweep is zero before the final token."""
    result = activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method="attribution",
                                 sweeps="heads,resid", last_position_only=True)
    full = activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method="attribution",
                               sweeps="heads-pos,resid")
    last = len(case.corrupt_ids) - 1
    rows = by_key(full)
    for row in result.results:
        assert row.site.position == last
        key = ("heads-pos" if row.sweep == "heads" else row.sweep, row.site.label)
        assert row.score == pytest.approx(rows[key].score, abs=1e-6)


def test_last_position_attribution_of_neurons_ignores_earlier_positions(case):
    """Neuron sites span every position, so with last_position_only (and unequal lengths) only the final
    token's change may count: per layer, the neuron scores sum to a finite difference that nudges every
    neuron at the last position only, and each equals (clean[-1] - corrupt[-1]) * grad[-1]."""
    model = case.model
    clean_ids, corrupt_ids = model.encode(SHORT_CLEAN), model.encode(SHORT_CORRUPT)  # 5 and 4 tokens
    result = activation_patching(model, SHORT_CLEAN, SHORT_CORRUPT, target=TARGET, contrast=CONTRAST,
                                 method="attribution", sweeps="neurons", last_position_only=True)
    span = result.clean_value - result.corrupt_value
    hooks = [HOOK["neurons"].format(layer) for layer in range(model.spec.n_layers)]
    clean = hexray.run_trace(model, SHORT_CLEAN, hooks).acts
    corrupt = hexray.run_trace(model, SHORT_CORRUPT, hooks).acts
    _, _, grads = metric_gradients(model, corrupt_ids, hooks, target=case.t, contrast=case.c)
    eps = 1e-2
    for layer, hook in enumerate(hooks):
        scores = np.array([r.score for r in result.results if r.site.component.layer == layer])  # [d_mlp]
        expected = ((clean[hook][-1] - corrupt[hook][-1]) * grads[hook][-1] / span).numpy()  # [d_mlp]
        np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=1e-4)

        def nudge(x, hook=None, src=clean[hook][-1]):
            x = x.clone()
            x[0, -1] = x[0, -1] + eps * (src - x[0, -1])
            return x

        fd = (plain_logit_diff(model, corrupt_ids, [(hook, nudge)], case.t, case.c) - result.corrupt_value) / eps / span
        assert scores.sum() == pytest.approx(fd, rel=0.05, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sweeps="heads,bogus"), "unknown sweep 'bogus'"),
        (dict(sweeps=""), "empty"),
        (dict(sweeps=" , "), "empty"),
        (dict(sweeps=[]), "empty"),
        (dict(method="fast"), "unknown method 'fast'"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=-3), "batch_size"),
        (dict(target=" Berlin"), "target ' Berlin' is 5 tokens"),
        (dict(contrast=" Paris"), "contrast ' Paris' is 4 tokens"),
        (dict(target=""), "target is empty"),
        (dict(target=" Mary", contrast=" Mary"), "same token"),
    ],
    ids=["unknown-sweep", "empty-sweep", "blank-sweep", "empty-list", "method", "batch-0", "batch-neg",
         "multi-token-target", "multi-token-contrast", "empty-target", "target-is-contrast"],
)
def test_bad_input_raises_hexray_error(case, kwargs, match):
    """Each bad argument raises a HexRayError (never another exception) with a telling message."""
    base = dict(target=TARGET, contrast=CONTRAST)
    base.update(kwargs)
    with pytest.raises(HexRayError, match=match):
        activation_patching(case.model, CLEAN, CORRUPT, **base)


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_target_equal_to_contrast_raises_for_every_method(case, method):
    """target == contrast is rejected whichever method runs."""
    with pytest.raises(HexRayError, match="same token"):
        activation_patching(case.model, CLEAN, CORRUPT, target=" John", contrast=" John", method=method)


def test_same_prediction_without_target_raises(case):
    """Clean and corrupt prompts that predict the same token need an explicit target/contrast."""
    model = case.model
    candidates = ["John gave Mary a", "Mary gave John a", "1 + 1 =", "2 + 2 =", "5 + 4 =", "6 + 2 =",
                  "The cat sat on the", "The dog ran in the", "John said that Mary", "Mary said that John"]
    by_len: dict[tuple[int, int], str] = {}
    pair = None
    for p in candidates:
        ids = model.encode(p)
        with torch.no_grad():
            top = int(model.bridge(torch.tensor([ids]))[0, -1].argmax())
        key = (len(ids), top)
        if key in by_len:
            pair = (by_len[key], p)
            break
        by_len[key] = p
    if pair is None:
        pytest.skip("no candidate pair of equal length predicts the same token on this model")
    with pytest.raises(HexRayError, match="both predict"):
        activation_patching(model, *pair)


def test_identical_prompts_have_nothing_to_restore(case):
    """Identical prompts give span 0: with explicit tokens, "nothing to restore"; without, "both predict"."""
    with pytest.raises(HexRayError, match="nothing to restore"):
        activation_patching(case.model, CLEAN, CLEAN, target=TARGET, contrast=CONTRAST)
    with pytest.raises(HexRayError, match="nothing to restore"):
        activation_patching(case.model, CLEAN, CLEAN, target=TARGET, contrast=CONTRAST, method="attribution")
    with pytest.raises(HexRayError, match="both predict"):
        activation_patching(case.model, CLEAN, CLEAN)


def test_empty_prompt_raises(case):
    """An empty or blank prompt is a HexRayError, not a tokenizer crash."""
    with pytest.raises(HexRayError, match="empty"):
        activation_patching(case.model, "  ", CORRUPT, target=TARGET, contrast=CONTRAST)


def test_default_target_and_contrast_are_the_predictions(case):
    """Without target/contrast, the target is the clean prediction and the contrast the corrupt one."""
    model = case.model
    with torch.no_grad():
        clean_top = int(model.bridge(torch.tensor([case.clean_ids]))[0, -1].argmax())
        corrupt_top = int(model.bridge(torch.tensor([case.corrupt_ids]))[0, -1].argmax())
    assert clean_top != corrupt_top
    result = activation_patching(model, CLEAN, CORRUPT, sweeps="resid")
    assert (result.target.id, result.contrast.id) == (clean_top, corrupt_top)
    assert result.clean_value == pytest.approx(plain_logit_diff(model, case.clean_ids, [], clean_top, corrupt_top), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. features as patched sites (a dictionary at resid.1)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_dictionary(case, tmp_path_factory):
    """A random topk dictionary at the residual stream before block 1, saved as a folder."""
    from hexray.features.dictionary import DictSite, Dictionary
    from hexray.features.formats import save_dictionary

    d_model = case.model.spec.d_model
    g = torch.Generator().manual_seed(3)
    W_enc = torch.randn(d_model, 24, generator=g) / d_model**0.5
    W_dec = torch.randn(24, d_model, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    d = Dictionary(DictSite("resid", 1), "topk", W_enc, 0.1 * torch.randn(24, generator=g), W_dec, 0.1 * torch.randn(d_model, generator=g), case.model.name, k=6,
                   apply_b_dec_to_input=True)
    folder = tmp_path_factory.mktemp("patch-dict") / "resid.1"
    save_dictionary(d, folder, spec=case.model.spec)
    return SimpleNamespace(folder=str(folder), W_enc=W_enc, b_enc=d.b_enc, W_dec=W_dec, b_dec=d.b_dec, k=6)


def hand_latents(fd, x: torch.Tensor) -> torch.Tensor:
    """TopK of ReLU((x - b_dec) W_enc + b_enc), written out here: [pos, d_sae]."""
    pre = torch.relu((x - fd.b_dec) @ fd.W_enc + fd.b_enc)
    top = pre.topk(fd.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def test_feature_patching_exact_and_attribution(case, feature_dictionary):
    """Patching feature f adds (clean_f - corrupt_f) W_dec[f] at every position; the estimate is its first-order term."""
    model, fd = case.model, feature_dictionary
    hook = "blocks.1.hook_resid_pre"
    result = activation_patching(model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, method="both", dict=fd.folder)
    assert result.sweeps == ("heads", "resid", "features")
    rows = [r for r in result.results if r.sweep == "features"]
    assert [r.site.component.feature for r in rows] == list(range(24))
    assert rows[0].site.label == "L1F0"
    delta = hand_latents(fd, case.clean_acts[hook]) - hand_latents(fd, case.corrupt_acts[hook])  # [pos, 24]
    assert delta.abs().sum() > 0
    moved = [f for f in range(24) if delta[:, f].abs().sum() > 0]
    for f in moved[:6]:
        add = delta[:, f : f + 1] * fd.W_dec[f]

        def steer(x, hook=None, add=add):
            return x + add.to(x.dtype)

        want = (plain_logit_diff(model, case.corrupt_ids, [(hook, steer)], case.t, case.c) - case.corrupt_value) / case.span
        assert rows[f].score == pytest.approx(want, abs=TOL)
    # the attribution estimate: d metric / d resid (autograd here) . sum_pos delta_f W_dec[f]
    resid = case.corrupt_acts[hook].clone().requires_grad_(True)

    def replace(x, hook=None):
        return resid[None].to(x.dtype)

    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(torch.tensor([case.corrupt_ids]), fwd_hooks=[(hook, replace)])
        (grad,) = torch.autograd.grad(logits[0, -1, case.t] - logits[0, -1, case.c], resid)
    want = (delta * (grad @ fd.W_dec.T)).sum(0) / case.span
    got = torch.tensor([r.attribution for r in rows])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-3)
    untouched = [f for f in range(24) if f not in moved]
    assert all(rows[f].score == pytest.approx(0, abs=1e-6) for f in untouched)


def test_feature_sweep_needs_a_dictionary(case, feature_dictionary):
    """sweep features without --dict is a one-line error; all includes features only with a dictionary."""
    with pytest.raises(HexRayError, match="needs dictionaries"):
        activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, sweeps="features")
    assert "features" not in parse_sweeps("all", "exact")
    assert parse_sweeps("all", "attribution", features=True)[-1] == "features"
    only = activation_patching(case.model, CLEAN, CORRUPT, target=TARGET, contrast=CONTRAST, sweeps="features", method="attribution",
                               dict=feature_dictionary.folder, last_position_only=True)
    assert {r.sweep for r in only.results} == {"features"} and len(only.results) == 24
