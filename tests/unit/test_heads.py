"""Head classification: hand-checked detection patterns and role scores, agreement with TransformerLens's
``detect_head``, the scores classify_heads reports, its labels and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import head_detector as tl
from transformer_lens.head_detector import detect_head

from hexray.analysis.heads import _labels, classify_heads, detection_patterns, repeated_random_tokens, role_scores
from hexray.errors import HexRayError

PROMPT = "The cat sat on the mat. The cat sat on the mat."  # 27 tokens, many repeats
TL_NAMES = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}


def _mask(n: int, cells) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    for q, k in cells:
        m[q, k] = True
    return m


def bridge_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns of the bridge for token ids [batch, pos]: [batch, layers, heads, q, k]."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.spec.n_layers)]
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names], dim=1).float()


def naive_score(pattern: torch.Tensor, tokens: list[int], role: str) -> float:
    """A role score by explicit loops: mean over query rows with a target of the attention on the targets."""
    per_row = []
    for q in range(len(tokens)):
        if role == "previous_token":
            keys = [q - 1] if q >= 1 else []
        elif role == "duplicate_token":
            keys = [k for k in range(q) if tokens[k] == tokens[q]]
        elif role == "induction":
            keys = [k + 1 for k in range(q) if tokens[k] == tokens[q]]
        else:  # bos
            keys = [0] if q >= 1 else []
        if keys:
            per_row.append(float(sum(pattern[q, k] for k in keys)))
    return float(np.mean(per_row)) if per_row else float("nan")


# ---------------------------------------------------------------------------------------------
# detection patterns and role scores on hand-made inputs
# ---------------------------------------------------------------------------------------------


def test_detection_patterns_on_a_repeated_sequence():
    """[5,6,7,5,6,7]: exactly the expected previous/duplicate/induction/bos cells."""
    got = detection_patterns(torch.tensor([5, 6, 7, 5, 6, 7]))
    assert set(got) == {"previous_token", "duplicate_token", "induction", "bos"}
    assert torch.equal(got["previous_token"], _mask(6, [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]))
    assert torch.equal(got["duplicate_token"], _mask(6, [(3, 0), (4, 1), (5, 2)]))
    assert torch.equal(got["induction"], _mask(6, [(3, 1), (4, 2), (5, 3)]))
    assert torch.equal(got["bos"], _mask(6, [(q, 0) for q in range(1, 6)]))
    assert all(m.dtype == torch.bool for m in got.values())


def test_detection_patterns_with_runs_of_one_token():
    """[9,9,9,4]: every earlier copy counts; induction targets the token after each copy, never past the query."""
    got = detection_patterns(torch.tensor([9, 9, 9, 4]))
    assert torch.equal(got["duplicate_token"], _mask(4, [(1, 0), (2, 0), (2, 1)]))
    assert torch.equal(got["induction"], _mask(4, [(1, 1), (2, 1), (2, 2)]))
    # no repeats at all: no duplicate or induction targets
    none = detection_patterns(torch.tensor([1, 2, 3]))
    assert not none["duplicate_token"].any() and not none["induction"].any()


@pytest.mark.parametrize("tokens", [[5, 6, 7, 5, 6, 7], [9, 9, 9, 4], [0, 3, 1, 3, 1, 2, 3, 1, 0, 3]])
def test_detection_patterns_equal_transformer_lens(tokens):
    """Our previous/duplicate/induction patterns are TransformerLens's own detection patterns."""
    t = torch.tensor(tokens)
    got = detection_patterns(t)
    for role, fn in (("previous_token", tl.get_previous_token_head_detection_pattern),
                     ("duplicate_token", tl.get_duplicate_token_head_detection_pattern),
                     ("induction", tl.get_induction_head_detection_pattern)):
        assert torch.equal(got[role], fn(t[None]).bool()), role


def test_role_scores_on_a_hand_made_pattern():
    """Mean attention on the targets over rows that have one; batch dims kept; no targets -> NaN, 0 rows."""
    a = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.2, 0.5, 0.3]])  # [q, k]
    b = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    det = detection_patterns(torch.tensor([1, 2, 3]))
    scores, n_rows = role_scores(torch.stack([a, b]), det["previous_token"])  # [2]
    assert n_rows == 2
    torch.testing.assert_close(scores, torch.tensor([(0.25 + 0.5) / 2, (1.0 + 0.0) / 2]))
    scores, n_rows = role_scores(a, det["bos"])  # [] (no batch dims)
    assert n_rows == 2 and scores.shape == ()
    assert float(scores) == pytest.approx((0.25 + 0.2) / 2)
    scores, n_rows = role_scores(torch.stack([a, b]), det["duplicate_token"])
    assert n_rows == 0 and scores.shape == (2,) and torch.isnan(scores).all()
    # a perfect previous-token head scores exactly 1
    perfect = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    scores, _ = role_scores(perfect, detection_patterns(torch.arange(4))["previous_token"])
    assert float(scores) == 1.0


def test_role_scores_relate_to_tl_mul_score_on_random_patterns():
    """On random causal patterns, TL's "mul" score == ours * rows_with_a_target / seq_len, for every role."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.tensor([0, 7, 3, 7, 3, 9, 7, 3, 1, 9, 2, 7])  # [12]
    n = tokens.shape[0]
    logits = torch.randn(n, n, generator=gen) * 3
    pattern = torch.softmax(logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)  # [q, k]
    det = detection_patterns(tokens)
    for role, fn in (("previous_token", tl.get_previous_token_head_detection_pattern),
                     ("duplicate_token", tl.get_duplicate_token_head_detection_pattern),
                     ("induction", tl.get_induction_head_detection_pattern)):
        ours, n_rows = role_scores(pattern, det[role])
        theirs = tl.compute_head_attention_similarity_score(
            pattern, fn(tokens[None]), exclude_bos=False, exclude_current_token=False, error_measure="mul"
        )
        assert theirs == pytest.approx(float(ours) * n_rows / n, abs=1e-6), role
        assert float(ours) == pytest.approx(naive_score(pattern, tokens.tolist(), role), abs=1e-6), role


# ---------------------------------------------------------------------------------------------
# agreement with TransformerLens on the real models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["previous_token", "duplicate_token", "induction"])
def test_detect_head_agrees_on_the_bridge(tiny_model, role):
    """detect_head(bridge, seq, name, "mul") == our score * n_rows / seq_len for every head (1e-5)."""
    model = tiny_model
    tokens = model.bridge.to_tokens(PROMPT)  # [1, pos]; TransformerLens prepends BOS
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert tokens.shape[1] == len(model.encode(PROMPT)) + 1
    seq_len = tokens.shape[1]
    theirs = detect_head(model.bridge, PROMPT, TL_NAMES[role], error_measure="mul")  # [layers, heads]
    patterns = bridge_patterns(model, tokens)[0]  # [layers, heads, q, k]
    ours, n_rows = role_scores(patterns, detection_patterns(tokens[0])[role])  # [layers, heads]
    assert n_rows > 0
    torch.testing.assert_close(theirs.float(), ours * n_rows / seq_len, atol=1e-5, rtol=0)
    assert theirs.shape == (model.spec.n_layers, model.spec.n_heads)
    assert (theirs > 0).all()  # a real comparison, not of zeros


# ---------------------------------------------------------------------------------------------
# classify_heads
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classified(tiny_model):
    return classify_heads(tiny_model, PROMPT, seq_len=10, n_sequences=3, seed=1)


def test_classify_heads_scores_are_the_attention_on_targets(tiny_model, classified):
    """Prompt roles come from PROMPT's patterns; induction is the mean over the repeated random sequences."""
    model = tiny_model
    ids = model.encode(PROMPT)
    patterns = bridge_patterns(model, torch.tensor([ids]))[0]  # [layers, heads, q, k]
    spec = model.spec
    for role in ("previous_token", "duplicate_token", "bos"):
        expected = np.array([[naive_score(patterns[layer, h], ids, role) for h in range(spec.n_heads)]
                             for layer in range(spec.n_layers)])
        np.testing.assert_allclose(classified.scores[role], expected, atol=1e-5)
    random_ids = repeated_random_tokens(model, seq_len=10, n_sequences=3, seed=1)  # [3, 20]
    random_patterns = bridge_patterns(model, random_ids)  # [3, layers, heads, q, k]
    expected = np.mean([[[naive_score(random_patterns[i, layer, h], random_ids[i].tolist(), "induction")
                          for h in range(spec.n_heads)] for layer in range(spec.n_layers)] for i in range(3)], axis=0)
    np.testing.assert_allclose(classified.scores["induction"], expected, atol=1e-5)
    assert classified.tokens == tuple(model.token_strs(ids))
    assert (classified.seq_len, classified.n_sequences, classified.seed, classified.threshold) == (10, 3, 1, 0.4)


def test_repeated_random_tokens(tiny_model):
    """[n, 2*seq_len] ordinary tokens, second half a copy of the first, reproducible per seed."""
    a = repeated_random_tokens(tiny_model, seq_len=7, n_sequences=5, seed=3)
    assert a.shape == (5, 14)
    assert torch.equal(a[:, :7], a[:, 7:])
    assert int(a.min()) > max(tiny_model.tokenizer.all_special_ids)  # never BOS
    assert int(a.max()) < tiny_model.spec.d_vocab
    assert torch.equal(a, repeated_random_tokens(tiny_model, seq_len=7, n_sequences=5, seed=3))
    assert not torch.equal(a, repeated_random_tokens(tiny_model, seq_len=7, n_sequences=5, seed=4))


def test_classify_heads_thresholds(tiny_model, classified):
    """Threshold 0 labels every head with a specific role; threshold 1 labels none of these random heads."""
    spec = tiny_model.spec
    everything = classify_heads(tiny_model, PROMPT, threshold=0.0, seq_len=10, n_sequences=3, seed=1)
    nothing = classify_heads(tiny_model, PROMPT, threshold=1.0, seq_len=10, n_sequences=3, seed=1)
    assert len(everything.labels) == spec.n_layers and all(len(row) == spec.n_heads for row in everything.labels)
    specific = ("induction", "duplicate_token", "previous_token")
    for layer in range(spec.n_layers):
        for h in range(spec.n_heads):
            best = max(specific, key=lambda r: classified.scores[r][layer, h])
            assert everything.labels[layer][h] == best
    assert all(label is None for row in nothing.labels for label in row)
    # the default threshold labels exactly the heads whose best specific or bos score reaches it
    for layer, h, scores, label in classified.heads():
        if label is None:
            assert max(scores.values()) < 0.4


def test_classify_heads_is_deterministic_per_seed(tiny_model, classified):
    """The same seed repeats every score; another seed changes the induction scores only."""
    again = classify_heads(tiny_model, PROMPT, seq_len=10, n_sequences=3, seed=1)
    other = classify_heads(tiny_model, PROMPT, seq_len=10, n_sequences=3, seed=2)
    for role in classified.scores:
        np.testing.assert_array_equal(again.scores[role], classified.scores[role])
    assert again.labels == classified.labels
    assert not np.allclose(other.scores["induction"], classified.scores["induction"], atol=1e-7, rtol=0)
    np.testing.assert_array_equal(other.scores["previous_token"], classified.scores["previous_token"])


def test_classify_heads_without_repeats_has_nan_duplicate_scores(tiny_model):
    """A prompt with no repeated token has no duplicate-token targets: NaN scores, never that label."""
    ids = tiny_model.encode("The cat")
    assert len(set(ids)) == len(ids) >= 2
    result = classify_heads(tiny_model, "The cat", threshold=0.0, seq_len=4, n_sequences=1)
    assert np.isnan(result.scores["duplicate_token"]).all()
    assert all(label != "duplicate_token" and label is not None for row in result.labels for label in row)


def test_labels_rules():
    """Strongest specific role wins; bos only when no specific role reaches the threshold; NaN never wins."""
    scores = {
        "induction": np.array([[0.9, 0.1, np.nan, 0.5]]),
        "duplicate_token": np.array([[0.2, 0.1, np.nan, 0.5]]),
        "previous_token": np.array([[0.95, 0.1, np.nan, 0.2]]),
        "bos": np.array([[0.99, 0.8, 0.9, 0.1]]),
    }
    assert _labels(scores, 0.4) == (("previous_token", "bos", "bos", "induction"),)  # ties: HEAD_ROLES order
    assert _labels(scores, 0.95) == (("previous_token", None, None, None),)
    assert _labels(scores, 1.0) == ((None, None, None, None),)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(threshold=-0.01), "threshold must be between 0 and 1"),
        (dict(threshold=1.5), "threshold must be between 0 and 1"),
        (dict(seq_len=1), "seq_len must be between 2 and 32"),
        (dict(seq_len=33), "seq_len must be between 2 and 32"),
        (dict(n_sequences=0), "n_sequences must be positive"),
        (dict(prompt="Mary"), "at least 2 tokens"),
        (dict(prompt="   "), "empty"),
        (dict(prompt="The cat sat on the mat. " * 5), "longer than"),
    ],
)
def test_classify_heads_rejects_bad_input(tiny_model, kwargs, match):
    """Out-of-range settings and unusable prompts raise a HexRayError."""
    args = dict(prompt=PROMPT, seq_len=4, n_sequences=1)
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(HexRayError, match=match):
        classify_heads(tiny_model, prompt, **args)


def test_classify_heads_default_text_fits_the_context(tiny_model):
    """Without a prompt, the built-in text is used, cut to the model's context (64 tokens here)."""
    result = classify_heads(tiny_model, seq_len=4, n_sequences=1)
    assert 2 <= len(result.tokens) <= tiny_model.spec.n_ctx
    assert result.scores["previous_token"].shape == (tiny_model.spec.n_layers, tiny_model.spec.n_heads)
    assert np.isfinite(result.scores["duplicate_token"]).all()  # the text repeats words


def test_classify_heads_accepts_the_edges(tiny_model):
    """threshold 0 and 1, seq_len 2 and n_ctx // 2 are all valid."""
    n_ctx = tiny_model.spec.n_ctx
    result = classify_heads(tiny_model, "The cat", threshold=1.0, seq_len=n_ctx // 2, n_sequences=1)
    assert result.scores["induction"].shape == (tiny_model.spec.n_layers, tiny_model.spec.n_heads)
    result = classify_heads(tiny_model, "The cat", threshold=0.0, seq_len=2, n_sequences=1)
    assert np.isfinite(result.scores["induction"]).all()
