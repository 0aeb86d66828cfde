"""Activation logging: chosen hook points to safetensors plus a JSON manifest, and back."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.engine import Trace

MANIFEST = "manifest.json"
TENSORS = "activations.safetensors"


@dataclass(frozen=True)
class SavedActivations:
    model: str
    prompt: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    hooks: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    tensors: dict[str, torch.Tensor]  # hook name -> [pos, ...]


def select_hooks(model: LoadedModel, patterns: str | None) -> list[str]:
    """Hook names matching comma-separated glob ``patterns``; default: the residual stream per layer."""
    if not patterns:
        return sites.residual_stream(model.spec)
    available = list(model.bridge.hook_dict)
    chosen: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matches = fnmatch.filter(available, pattern)
        if not matches:
            raise HexRayError(
                f"--save-hooks {pattern!r} matches no hook point",
                hint="e.g. 'blocks.*.hook_resid_pre', 'blocks.3.attn.hook_z', 'blocks.*.mlp.hook_post'",
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def check_no_dump(folder: str | Path, *, force: bool = False) -> None:
    """An earlier dump in ``folder`` is replaced only when asked (``--force``): nothing is lost by accident."""
    if not force and (Path(folder) / MANIFEST).is_file():
        raise HexRayError(f"--save-activations {folder} already holds a dump", hint="choose another folder, or pass --force to replace it")


def check_fired(trace: Trace, hooks: list[str]) -> None:
    """Some hook points exist but never fire (``hook_pos_embed`` on rotary models)."""
    missing = [h for h in hooks if h not in trace.acts]
    if missing:
        raise HexRayError(f"hook points did not fire for this model: {', '.join(missing[:5])}", hint="choose other --save-hooks")


def save_activations(trace: Trace, folder: str | Path, hooks: list[str]) -> Path:
    """Write ``hooks`` from ``trace`` into ``folder`` (created; written atomically per file)."""
    folder = Path(folder)
    check_fired(trace, hooks)
    tensors = {h: trace.acts[h].contiguous().clone() for h in hooks}
    manifest = {
        "format": "hexray-activations/1",
        "model": trace.model_name,
        "prompt": trace.prompt,
        "tokens": list(trace.tokens),
        "token_ids": list(trace.token_ids),
        "hooks": hooks,
        "shapes": {h: list(t.shape) for h, t in tensors.items()},
        "dtype": "float32",
        "file": TENSORS,
    }
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / TENSORS, lambda tmp: save_file(tensors, str(tmp), metadata={"model": trace.model_name}))
    _atomic(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return folder


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_activations(folder: str | Path) -> SavedActivations:
    """Read back what :func:`save_activations` (``--save-activations``) wrote."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        tensors = load_file(str(folder / manifest.get("file", TENSORS)))
    except FileNotFoundError as exc:
        raise HexRayError(f"no saved activations in {folder}", hint=f"expected {MANIFEST} and {TENSORS}") from exc
    except (json.JSONDecodeError, OSError, KeyError) as exc:
        raise HexRayError(f"unreadable activations in {folder}: {exc}") from exc
    return SavedActivations(
        model=manifest["model"], prompt=manifest["prompt"], tokens=tuple(manifest["tokens"]),
        token_ids=tuple(manifest["token_ids"]), hooks=tuple(manifest["hooks"]),
        shapes={h: tuple(s) for h, s in manifest["shapes"].items()}, tensors=tensors,
    )
