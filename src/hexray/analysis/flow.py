"""Token flow: how much attention each token pays each earlier token, summed over heads and layers.

``total[q, k] = sum_l sum_h A[l, h, q, k]`` is a sum, not a mean, so a row of it sums to
``n_layers * n_heads`` (divide by that for the mean head). Each layer's pattern is reduced inside
the one forward pass (:func:`~hexray.tracing.engine.run_reduced`), so memory never holds more
than one layer's pattern and the running [q, k] sum: at 1024 tokens every layer's head-summed
map would be 30 x 4 MB, and every head's over a gigabyte.

Besides ``total``: ``by_layer``, the share of each layer's attention (queries 1..) that goes to
earlier tokens; ``sink_by_layer``, the part of it on key 0; and, for one asked-for layer, its
[q, k] map summed over heads. ``top_pairs`` are the strongest ``k < q`` pairs of the map shown,
leaving out key 0 when it is a special token (BOS or a chat marker: the attention sink, which
would otherwise fill the list); ``exclude_first_key`` makes that always or never.
"""

from __future__ import annotations

import torch

from hexray.analysis.heads import check_layer, first_key_is_sink, pair_mask, strongest_pairs
from hexray.analysis.results import PromptRef, TokenFlow
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import run_reduced, tokenize_prompt

TOP_PAIRS = 20  # the arcs the lab draws


def token_flow(
    model: LoadedModel, prompt: str, *, layer: int | None = None, prepend_bos: bool | None = None, exclude_first_key: bool | None = None,
) -> TokenFlow:
    """Attention between every token pair of ``prompt`` summed over heads and layers; with ``layer``, that layer's map too.

    One forward pass through every layer (``total`` needs them all). ``exclude_first_key``
    overrides the rule for key 0 in ``top_pairs`` (None: left out when it is a special token;
    True: always, as trained models use the first token as their sink even without BOS; False: never).
    """
    if layer is not None:
        check_layer(model, layer)
    ids, _ = tokenize_prompt(model, prompt, prepend_bos=prepend_bos)
    n, n_layers = len(ids), model.spec.n_layers
    kept: dict[str, torch.Tensor] = {}  # the running total and the asked-for layer's map, [q, k] each

    def reducer(at: int):
        def reduce(patterns: torch.Tensor) -> torch.Tensor:  # [1, heads, q, k] -> [2]: (off-diagonal, key-0) share
            summed = patterns[0].sum(0)  # [q, k]
            kept["total"] = summed if "total" not in kept else kept["total"] + summed
            if at == layer:
                kept["layer"] = summed
            rows = max(n - 1, 1) * patterns.shape[1]  # head rows of queries 1..; query 0 can only attend to itself
            off = summed.tril(-1).sum() / rows  # k < q
            sink = summed[1:, 0].sum() / rows
            return torch.stack([off, sink])

        return reduce

    shares = run_reduced(model, torch.tensor([ids]), {sites.attn_pattern(at): reducer(at) for at in range(n_layers)})
    by_layer = torch.stack([shares[sites.attn_pattern(at)] for at in range(n_layers)]).cpu().double()  # [layers, 2]
    if n == 1:
        by_layer.fill_(float("nan"))  # no query can look back
    total = kept["total"].cpu()  # [q, k]
    layer_map = kept["layer"].cpu() if layer is not None else None  # [q, k]
    tokens = tuple(model.token_strs(ids))
    sink = first_key_is_sink(model, ids) if exclude_first_key is None else exclude_first_key
    shown = total if layer_map is None else layer_map
    return TokenFlow(
        ref=PromptRef(model.name, prompt, tokens, tuple(ids)), n_heads=model.spec.n_heads,
        total=total.numpy(), by_layer=by_layer[:, 0].numpy(), sink_by_layer=by_layer[:, 1].numpy(),
        layer=layer, layer_map=None if layer_map is None else layer_map.numpy(), sink_excluded=sink,
        top_pairs=strongest_pairs(shown, pair_mask(n, sink, diagonal=False), tokens, TOP_PAIRS),
    )
