"""Head inspector metrics: how every attention head attends from the explained position.

Per head, from the attention pattern row of the query position ``q`` (``A[k]``, summing to 1):

- entropy ``-sum_k A[k] log A[k]`` (nats; 0 = one key, ``log(q + 1)`` = uniform);
- the largest weight and the key it falls on;
- the weight on the first token (the BOS / attention sink) and on the previous token;
- the mean distance back, ``sum_k A[k] (q - k)``.

Added as one module plus one registry line: the registry gives it ``hexray trace --head-metrics``,
the API's ``head_metrics`` field, the document's ``head_metrics`` section, a report figure and
table, a console table and a row in the lab's generic panel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hexray.analysis.registry import Analysis, View
from hexray.analysis.results import ComparableResult
from hexray.options import Option
from hexray.tracing import sites


@dataclass(frozen=True, eq=False)
class HeadMetrics(ComparableResult):
    position: int
    key_tokens: tuple[str, ...]  # the keys the position can see: tokens 0..position
    entropy: np.ndarray  # [n_layers, n_heads], nats
    max_weight: np.ndarray  # [n_layers, n_heads]
    argmax_key: np.ndarray  # [n_layers, n_heads] int: the key position of the largest weight
    first_token: np.ndarray  # [n_layers, n_heads]
    previous_token: np.ndarray  # [n_layers, n_heads] (NaN at position 0)
    mean_distance: np.ndarray  # [n_layers, n_heads], positions back


def head_metrics(model, trace, ctx) -> HeadMetrics:
    """The metrics of every head at the explained position (``ctx.attribution.position``)."""
    q = ctx.attribution.position
    rows = torch.stack([trace.acts[sites.attn_pattern(layer)][:, q, : q + 1] for layer in range(model.spec.n_layers)]).double()  # [layers, heads, keys]
    distance = torch.arange(q, -1, -1, dtype=rows.dtype, device=rows.device)  # q - k for k = 0..q
    previous = rows[..., q - 1] if q >= 1 else torch.full(rows.shape[:2], float("nan"), dtype=rows.dtype)
    return HeadMetrics(
        position=q,
        key_tokens=trace.tokens[: q + 1],
        entropy=(-(rows * rows.clamp_min(1e-30).log()).sum(-1)).cpu().numpy(),
        max_weight=rows.max(-1).values.cpu().numpy(),
        argmax_key=rows.argmax(-1).cpu().numpy(),
        first_token=rows[..., 0].cpu().numpy(),
        previous_token=previous.cpu().numpy(),
        mean_distance=(rows * distance).sum(-1).cpu().numpy(),
    )


def document(m: HeadMetrics, ctx) -> dict:
    def grid(a: np.ndarray) -> list:
        return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in a]

    return {
        "position": m.position, "entropy": grid(m.entropy), "max_weight": grid(m.max_weight),
        "argmax_key": m.argmax_key.tolist(), "first_token": grid(m.first_token),
        "previous_token": grid(m.previous_token), "mean_distance": grid(m.mean_distance),
    }


def table(m: HeadMetrics, ctx) -> View:
    """The ``top_k`` most focused heads (lowest entropy) with every metric."""
    order = np.argsort(m.entropy, axis=None)[: ctx.options.top_k]
    rows = []
    for i in order:
        layer, head = np.unravel_index(i, m.entropy.shape)
        key = int(m.argmax_key[layer, head])
        rows.append((
            sites.head(int(layer), int(head)).name, float(m.entropy[layer, head]), float(m.max_weight[layer, head]), f"{key}:{m.key_tokens[key]!r}",
            float(m.first_token[layer, head]), float(m.previous_token[layer, head]), float(m.mean_distance[layer, head]),
        ))
    return View(
        f"Most focused heads at position {m.position} (lowest attention entropy)",
        ("head", "entropy", "max weight", "on key", "first token", "previous token", "mean distance"),
        tuple(rows),
        note=f"entropy in nats; uniform over the {m.position + 1} visible keys would be {np.log(m.position + 1):.2f}",
    )


def figure(m: HeadMetrics, ctx) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * m.entropy.shape[1], 1.0 + 0.28 * m.entropy.shape[0]))
    im = ax.imshow(m.entropy, cmap="viridis_r", aspect="auto", vmin=0)
    ax.set_xticks(range(m.entropy.shape[1]), [f"H{h}" for h in range(m.entropy.shape[1])])
    ax.set_yticks(range(m.entropy.shape[0]), [f"L{layer}" for layer in range(m.entropy.shape[0])])
    ax.set_title(f"Attention entropy at position {m.position} (nats)")
    fig.colorbar(im, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"head_metrics.png": buf.getvalue()}


ANALYSIS = Analysis(
    name="head_metrics",
    title="Head inspector metrics",
    switch=Option("head_metrics", bool, False, "Per head at the explained position: attention entropy, max weight, first/previous-token weight, mean distance."),
    hooks=lambda spec, options: {sites.attn_pattern(layer) for layer in range(spec.n_layers)},
    compute=head_metrics,
    json_key="head_metrics",
    document=document,
    table=table,
    figures=figure,
)
