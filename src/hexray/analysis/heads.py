"""Head classification from attention patterns: previous-token, duplicate-token, induction, BOS.

Each score is the attention a head pays to the positions its role predicts, averaged over the
query positions where that role has a prediction (so a perfect head scores 1):

- previous token: query q attends to q-1;
- duplicate token: q attends to earlier positions holding the same token;
- induction: q attends to the position *after* an earlier occurrence of its token (Olsson et al.
  2022), measured on repeated random token sequences ``[r_1..r_n, r_1..r_n]``;
- bos: q >= 1 attends to position 0 (the BOS token or attention sink).

TransformerLens's ``detect_head(error_measure="mul")`` divides the same attention mass by *every*
query row instead, so ``tl_score = score * rows_with_a_prediction / seq_len``.

:func:`head_attention` is the head inspector: one head's pattern on a prompt with its entropy,
concentration, value and output norms and strongest (query, key) pairs besides the role scores.
"""

from __future__ import annotations

import numpy as np
import torch

from hexray.analysis.results import HEAD_ROLES, HeadAttention, HeadClassification, HeadRole, PromptRef, TokenPair
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.options import Option, options_class
from hexray.tracing import sites
from hexray.tracing.engine import capture, rows_per_chunk, run_reduced, tokenize_prompt

HEADS_OPTIONS: tuple[Option, ...] = (
    Option("threshold", float, 0.4, "Minimum score for a head to get a role label.", ge=0, le=1),
    Option("seq_len", int, 25, "Length of each random sequence (repeated once) for the induction score (2 to half the context).", api_le=512),
    Option("n_sequences", int, 4, "Random sequences to average the induction score over.", flag="--sequences", api_name="sequences", gt=0, api_le=32),
    Option("seed", int, 0, "Seed for the random sequences.", ge=0, le=2**63 - 1),
    Option("top_k", int, 5, "Heads listed per role.", short="-k", gt=0, api=False),
    Option("prepend_bos", bool | None, None, "Force a BOS token on or off (default: the model's own tokenizer behaviour).", flag="--prepend-bos/--no-prepend-bos"),
)
HeadsOptions = options_class("HeadsOptions", HEADS_OPTIONS, doc="The options of ``hexray heads`` and ``/api/heads`` (and the induction data of ``/api/attention``).")

DEFAULT_TEXT = (
    "The cat sat on the mat. The dog sat on the rug. When the cat saw the dog, the cat ran up the tree, "
    "and the dog barked at the cat until the owner called the dog home."
)


def detection_patterns(tokens: torch.Tensor) -> dict[HeadRole, torch.Tensor]:
    """For token ids [pos], each role's target pattern [q, k] (1 where the role attends)."""
    n = tokens.shape[0]
    same = (tokens[:, None] == tokens[None, :]) & torch.ones(n, n, dtype=torch.bool).tril(-1)  # earlier, same token
    induction = torch.zeros(n, n, dtype=torch.bool)
    induction[:, 1:] = same[:, :-1]  # the token after an earlier copy
    induction &= torch.ones(n, n, dtype=torch.bool).tril()
    previous = torch.zeros(n, n, dtype=torch.bool)
    previous[1:, :-1] = torch.eye(n - 1, dtype=torch.bool)
    bos = torch.zeros(n, n, dtype=torch.bool)
    bos[1:, 0] = True
    return {"previous_token": previous, "duplicate_token": same, "induction": induction, "bos": bos}


def role_scores(patterns: torch.Tensor, detection: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean attention on ``detection`` over query rows that have a target.

    patterns: [..., q, k]; detection: [q, k] bool. Returns (scores [...], number of such rows).
    """
    rows = detection.any(-1)
    n_rows = int(rows.sum())
    if n_rows == 0:
        return torch.full(patterns.shape[:-2], float("nan")), 0
    mass = (patterns * detection).sum(-1)  # [..., q]
    return mass[..., rows].mean(-1), n_rows


def repeated_random_tokens(model: LoadedModel, *, seq_len: int, n_sequences: int, seed: int) -> torch.Tensor:
    """[n_sequences, 2 * seq_len] ids: random ordinary tokens, each sequence repeated once."""
    special = set(model.tokenizer.all_special_ids or [])
    low = max(special) + 1 if special and max(special) < model.spec.d_vocab // 2 else 0
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(low, model.spec.d_vocab, (n_sequences, seq_len), generator=gen)
    return torch.cat([half, half], dim=1)


def classify_heads(
    model: LoadedModel,
    prompt: str | None = None,
    *,
    threshold: float = 0.4,
    seq_len: int = 25,
    n_sequences: int = 4,
    seed: int = 0,
    prepend_bos: bool | None = None,
) -> HeadClassification:
    """Score every head for each role and label it with its strongest role above ``threshold``.

    Previous-token, duplicate-token and BOS scores come from ``prompt`` (default: a short text with
    repeated words); induction always comes from ``n_sequences`` repeated random sequences.
    """
    HeadsOptions(threshold=threshold, seq_len=seq_len, n_sequences=n_sequences, seed=seed).validate()
    _check_induction_data(model, seq_len, n_sequences)
    text, ids = _scored_text(model, prompt, prepend_bos)
    tokens = torch.tensor(ids)
    scores = _prompt_scores_reduced(model, tokens)
    scores["induction"] = _induction_scores(model, None, seq_len=seq_len, n_sequences=n_sequences, seed=seed)
    labels = _labels(scores, threshold)
    return HeadClassification(
        ref=PromptRef(model.name, text, tuple(model.token_strs(ids)), tuple(ids)),
        threshold=threshold,
        seq_len=seq_len,
        n_sequences=n_sequences,
        seed=seed,
        scores={r: scores[r] for r in HEAD_ROLES},
        labels=labels,
    )


def head_attention(
    model: LoadedModel,
    prompt: str,
    layer: int,
    head: int,
    *,
    seq_len: int = 25,
    n_sequences: int = 4,
    seed: int = 0,
    prepend_bos: bool | None = None,
    exclude_first_key: bool | None = None,
) -> HeadAttention:
    """One head's attention on ``prompt``: its pattern, inspector metrics and role scores (what clicking a head shows).

    Two forward passes: the prompt (``layer``'s pattern and values only, stopping after ``layer``;
    every metric comes from it) and the induction data. Means over queries skip query 0, which can
    only attend to itself. ``top_pairs`` ranks (query, key) pairs with ``k <= q`` by attention
    weight, ``top_moved_pairs`` by weight x ``||v_k||`` (how much of the key's value the pair
    carries); both leave out query 0, and key 0 when it is a special token (BOS or a chat marker,
    where idle heads park their attention: ``sink_excluded``). ``exclude_first_key`` overrides
    that rule: True always leaves key 0 out (trained models use the first token as their sink
    whether or not it is BOS), False never.
    """
    check_layer(model, layer)
    if not 0 <= head < model.spec.n_heads:
        raise HexRayError(f"head {head} is out of range for {model.name}", hint=f"use 0..{model.spec.n_heads - 1}")
    _check_induction_data(model, seq_len, n_sequences)
    ids, _ = tokenize_prompt(model, prompt, prepend_bos=prepend_bos)
    tokens = torch.tensor(ids)
    _, rows = capture(model, [ids], [sites.attn_pattern(layer), sites.head_v(layer)], stop_after_layer=layer)  # nothing past the layer is read
    pattern = rows[0][sites.attn_pattern(layer)][head].cpu()  # [q, k]
    kv_head = head // (model.spec.n_heads // model.spec.n_kv_heads)  # grouped-query attention: heads share a kv head
    values = rows[0][sites.head_v(layer)][:, kv_head].cpu().double()  # [k, d_head]
    W_O = model.block_weight(layer, "attn", "W_O")[head].detach().cpu().double()  # [d_head, d_model]
    scores = {r: float(v) for r, v in _prompt_role_scores(pattern, tokens).items()} if len(ids) >= 2 else {}
    induction = _induction_scores(model, range(layer, layer + 1), seq_len=seq_len, n_sequences=n_sequences, seed=seed)
    scores["induction"] = float(induction[0, head])

    a = pattern.double()  # [q, k]
    entropy = -(a * a.clamp_min(1e-30).log()).sum(-1)  # [q], nats; 0 log 0 = 0
    concentration = a.max(-1).values  # [q]
    value_norm = values.norm(dim=-1)  # [k]
    output_norm = ((a @ values) @ W_O).norm(dim=-1)  # [q]: |z_q W_O[h]|, before any bias or post-attention norm
    token_strs = tuple(model.token_strs(ids))
    sink = first_key_is_sink(model, ids) if exclude_first_key is None else exclude_first_key
    allowed = pair_mask(len(ids), sink, diagonal=True)  # [q, k]
    moved = a * value_norm[None, :]  # [q, k]
    return HeadAttention(
        ref=PromptRef(model.name, prompt, token_strs, tuple(ids)), layer=layer, head=head,
        pattern=pattern.numpy(), scores={r: scores.get(r, float("nan")) for r in HEAD_ROLES},
        entropy=entropy.numpy(), mean_entropy=_mean_after_first(entropy),
        concentration=concentration.numpy(), mean_concentration=_mean_after_first(concentration),
        value_norm=value_norm.numpy(), output_norm=output_norm.numpy(), sink_excluded=sink,
        top_pairs=strongest_pairs(a, allowed, token_strs, TOP_PAIRS, moved=moved),
        top_moved_pairs=strongest_pairs(moved, allowed, token_strs, TOP_PAIRS, weights=a, moved=moved),
    )


TOP_PAIRS = 10  # pairs listed by the head inspector


def check_layer(model: LoadedModel, layer: int) -> None:
    """A HexRayError naming the valid range unless ``layer`` is one of the model's layers."""
    if not 0 <= layer < model.spec.n_layers:
        raise HexRayError(f"layer {layer} is out of range for {model.name}", hint=f"use 0..{model.spec.n_layers - 1}")


def first_key_is_sink(model: LoadedModel, ids: list[int]) -> bool:
    """Whether position 0 holds a special token (BOS, a chat marker): the attention sink pair rankings leave out."""
    return bool(ids) and ids[0] in set(model.tokenizer.all_special_ids or [])


def pair_mask(n: int, exclude_first_key: bool, *, diagonal: bool) -> torch.Tensor:
    """The (query, key) pairs worth ranking for ``n`` tokens: [q, k] bool, causal, without query 0.

    ``diagonal``: keep ``k == q`` (a head reading its own position); without it only ``k < q``.
    """
    allowed = torch.ones(n, n, dtype=torch.bool).tril(0 if diagonal else -1)
    allowed[0] = False  # query 0 has no choice
    if exclude_first_key:
        allowed[:, 0] = False
    return allowed


def strongest_pairs(
    ranking: torch.Tensor, allowed: torch.Tensor, tokens: tuple[str, ...], n: int, *,
    weights: torch.Tensor | None = None, moved: torch.Tensor | None = None,
) -> tuple[TokenPair, ...]:
    """The ``n`` ``allowed`` pairs with the largest ``ranking`` [q, k], strongest first (ties: earlier query, then key).

    Each pair's ``weight`` is read from ``weights`` (default: ``ranking`` itself), ``moved`` from ``moved``.
    """
    weights = ranking if weights is None else weights
    flat = ranking.double().masked_fill(~allowed, float("-inf")).flatten().numpy()  # [q * k]
    order = [int(i) for i in np.argsort(-flat, kind="stable")[: min(n, int(allowed.sum()))]]
    width = ranking.shape[1]
    return tuple(
        TokenPair(
            query=i // width, key=i % width, query_token=tokens[i // width], key_token=tokens[i % width],
            weight=float(weights[i // width, i % width]), moved=None if moved is None else float(moved[i // width, i % width]),
        )
        for i in order
    )


def _mean_after_first(per_query: torch.Tensor) -> float:
    """The mean over queries 1.. (NaN for a one-token prompt)."""
    return float(per_query[1:].mean()) if per_query.shape[0] > 1 else float("nan")


def _check_induction_data(model: LoadedModel, seq_len: int, n_sequences: int) -> None:
    if seq_len < 2 or 2 * seq_len > model.spec.n_ctx:
        raise HexRayError(f"{{field}} must be between 2 and {model.spec.n_ctx // 2}, got {seq_len}", field="seq_len")
    if n_sequences <= 0:
        raise HexRayError(f"{{field}} must be positive, got {n_sequences}", field="n_sequences")


def _scored_text(model: LoadedModel, prompt: str | None, prepend_bos: bool | None) -> tuple[str, list[int]]:
    """The text behind the prompt-based roles and its ids (the built-in text when ``prompt`` is None)."""
    if prompt is None:  # the built-in text, cut to the context of small models
        ids = model.encode(DEFAULT_TEXT, prepend_bos=prepend_bos)[: model.spec.n_ctx]
        text = model.tokenizer.decode(ids)
    else:
        text = prompt
        ids, _ = tokenize_prompt(model, text, prepend_bos=prepend_bos)
    if len(ids) < 2:
        raise HexRayError("{field}: the prompt needs at least 2 tokens to score heads", hint="give a longer {field}", field="prompt")
    return text, ids


def _prompt_role_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and BOS scores of patterns [..., q, k] on token ids [pos]."""
    detection = detection_patterns(tokens)
    return {role: role_scores(patterns, detection[role])[0].cpu().numpy() for role in ("previous_token", "duplicate_token", "bos")}


def _prompt_scores_reduced(model: LoadedModel, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and BOS scores [layers, heads] of every head on token ids [pos], one layer's pattern at a time."""
    roles = ("previous_token", "duplicate_token", "bos")
    detection = detection_patterns(tokens)

    def reduce(patterns: torch.Tensor) -> torch.Tensor:  # [1, heads, q, k] -> [roles, heads]
        return torch.stack([role_scores(patterns[0], detection[r].to(patterns.device))[0] for r in roles])

    layers = range(model.spec.n_layers)
    out = run_reduced(model, tokens[None], {sites.attn_pattern(layer): reduce for layer in layers})
    stacked = torch.stack([out[sites.attn_pattern(layer)] for layer in layers]).cpu()  # [layers, roles, heads]
    return {role: stacked[:, i].numpy() for i, role in enumerate(roles)}


def _induction_scores(model: LoadedModel, layers: range | None, *, seq_len: int, n_sequences: int, seed: int) -> np.ndarray:
    """Induction scores [layers, heads], averaged over repeated random sequences."""
    random_ids = repeated_random_tokens(model, seq_len=seq_len, n_sequences=n_sequences, seed=seed)
    layers = range(model.spec.n_layers) if layers is None else layers
    chunk = rows_per_chunk(model, 2 * seq_len, [sites.attn_pattern(layers[0])])  # one layer's patterns at a time
    sums = torch.zeros(len(layers), model.spec.n_heads, dtype=torch.float64)
    for lo in range(0, n_sequences, chunk):
        rows = random_ids[lo : lo + chunk]
        reducers = {sites.attn_pattern(layer): _per_sequence_induction(rows) for layer in layers}  # [seqs, heads, q, k] -> [seqs, heads]
        scores = run_reduced(model, rows, reducers, stop_after_layer=max(layers))
        sums += torch.stack([scores[sites.attn_pattern(layer)].sum(0).double().cpu() for layer in layers])
    return (sums / n_sequences).numpy()


def _per_sequence_induction(rows: torch.Tensor):
    """A reducer: patterns [seqs, heads, q, k] -> each sequence's induction score per head, [seqs, heads]."""
    detections = [detection_patterns(r)["induction"] for r in rows]

    def reduce(patterns: torch.Tensor) -> torch.Tensor:
        return torch.stack([role_scores(p, d.to(p.device))[0] for p, d in zip(patterns, detections)])

    return reduce


def _labels(scores: dict[str, np.ndarray], threshold: float) -> tuple[tuple[str | None, ...], ...]:
    """Per head, its strongest role reaching ``threshold``.

    BOS attention is where idle heads rest, so ``bos`` labels only heads with no other role.
    """
    specific = [r for r in HEAD_ROLES if r != "bos"]
    stacked = np.stack([np.nan_to_num(scores[r], nan=-1.0) for r in specific])  # [roles, layers, heads]
    best, best_score = stacked.argmax(0), stacked.max(0)
    bos = np.nan_to_num(scores["bos"], nan=-1.0)

    def label(layer: int, head: int) -> str | None:
        if best_score[layer, head] >= threshold:
            return specific[best[layer, head]]
        return "bos" if bos[layer, head] >= threshold else None

    return tuple(tuple(label(layer, head) for head in range(best.shape[1])) for layer in range(best.shape[0]))
