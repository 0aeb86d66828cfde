"""The neuroscope's build on Ray Data: the same pass, split over a pool of actors that each hold the model.

Each actor loads the model once (by name or folder, so every machine of a cluster loads its own
copy), folds one batch-aligned slice of the pack into running statistics exactly as the local
engine does (:func:`hexray.neuroscope.index.fold_pack`), and sends them back. Ray does not keep
order; it need not: every row is keyed by its global token index (context, position), and the
statistics merge under a total order (:mod:`hexray.neuroscope.stream`), so the driver's merge
gives the local engine's index whatever order the slices finish in.

Ray is an optional extra (``pip install 'hexray[scale]'``), imported only here.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Sequence

import numpy as np
import torch

from hexray.corpus.packs import TokenPack
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.neuroscope import stream
from hexray.neuroscope.units import UnitGroup


class _Worker:
    """A Ray Data actor: the model, loaded once, and the pack; each call folds the slices it is given."""

    def __init__(self, model: dict, pack: TokenPack, groups: Sequence[UnitGroup], top_k: int, window: tuple[int, int], rows: int, first_context: int, threads: int):
        from hexray.features.tuned_lens import unembed_hash
        from hexray.models.loading import load_model

        torch.set_num_threads(threads)
        self.model = load_model(model["name"], device=model["device"], dtype=model["dtype"])
        self.weights = unembed_hash(self.model)
        self.pack, self.groups, self.top_k, self.window, self.rows, self.first_context = pack, groups, top_k, window, rows, first_context

    def __call__(self, batch: dict) -> dict:
        from hexray.neuroscope.index import fold_pack

        states = []
        for lo, hi in zip(batch["lo"].tolist(), batch["hi"].tolist()):
            part = self.pack[lo:hi]
            runs = [stream.new_running(g.count, self.top_k, part.context_size, self.window[0], self.window[1], self.model.device) for g in self.groups]
            fold_pack(self.model, part, self.groups, runs, self.rows, self.first_context + lo)
            states.append(pickle.dumps({"weights": self.weights, "tokens": part.n_tokens, "runs": [stream.state_of(r) for r in runs]}))
        return {"state": np.array(states, dtype=object)}


def slices(n_contexts: int, rows: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous slices of the contexts, cut at multiples of ``rows`` (so every forward pass sees the batch the local engine does)."""
    batches = math.ceil(n_contexts / rows)
    per = math.ceil(batches / max(1, min(workers, batches))) * rows
    return [(lo, min(lo + per, n_contexts)) for lo in range(0, n_contexts, per)]


def stream_on_ray(model: LoadedModel, pack: TokenPack, groups: Sequence[UnitGroup], top_k: int, window: tuple[int, int], rows: int, first_context: int,
                  *, workers: int | None, address: str | None, model_name: str | None, progress) -> tuple[list[stream.Running], dict[str, float]]:
    """The pass on Ray: ``workers`` actors (default 2) on the cluster at ``address`` (default: start a local one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise HexRayError("--engine ray needs Ray", hint="pip install 'hexray[scale]'", field="engine") from None
    from hexray.features.tuned_lens import unembed_hash

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise HexRayError(f"{{field}} must be at least 1, got {workers!r}", field="workers")
    workers = workers or 2
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise HexRayError(f"cannot start or reach a Ray cluster{f' at {address}' if address else ''}: {exc}", hint="check --ray-address, or leave it out to start a local one", field="address") from None
    ray.data.DataContext.get_current().enable_progress_bars = False
    parts = slices(pack.n_contexts, rows, workers)
    cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
    recipe = {"name": model_name or model.checkpoint, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    start = time.perf_counter()
    ds = ray.data.from_items([{"lo": lo, "hi": hi} for lo, hi in parts], override_num_blocks=len(parts)).map_batches(
        _Worker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(parts))), num_cpus=cpus,
        fn_constructor_kwargs={"model": recipe, "pack": pack, "groups": tuple(groups), "top_k": top_k, "window": window, "rows": rows,
                               "first_context": first_context, "threads": cpus},
    )
    runs = [stream.new_running(g.count, top_k, pack.context_size, window[0], window[1], model.device) for g in groups]
    expected, done = unembed_hash(model), 0
    if progress is not None:
        progress(0, pack.n_tokens)
    for row in ds.iter_rows():
        part = pickle.loads(row["state"])
        if part["weights"] != expected:
            raise HexRayError(f"a Ray worker loaded another model than {model.name} from {recipe['name']}", hint="give --model a name or folder every machine of the cluster can load", field="engine")
        for run, state in zip(runs, part["runs"]):
            stream.merge(run, stream.from_state(state, model.device))
        done += part["tokens"]
        if progress is not None:
            progress(done, pack.n_tokens)
    return runs, {"forward": time.perf_counter() - start}
