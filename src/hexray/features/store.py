"""Dictionaries by name: ``--dict resid.12`` (a default of the loaded model), a name under the cache, or a folder.

Loaded dictionaries are kept per (folder, modification time), so the server and the debugger
read a dictionary's weights once, and a retrained one is picked up.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary, model_key
from hexray.models.loading import ModelSpec

_LOADED: dict[tuple[str, float], Dictionary] = {}


def split_names(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def dictionary_folder(name: str, spec: ModelSpec) -> Path:
    """The folder ``name`` means for ``spec``'s model: a path, a model default, or a name under the cache."""
    from hexray.features import formats

    path = Path(name).expanduser()
    if path.exists():
        return path
    model_default = formats.dictionaries_root() / model_key(spec.name) / name
    if model_default.exists():
        return model_default
    return formats.resolve_dictionary(name)


def model_dictionaries_root(spec: ModelSpec) -> Path:
    """Where ``hexray dict train`` puts a model's dictionaries by default: ``<cache>/dictionaries/<model>/<site>``."""
    from hexray.features import formats

    return formats.dictionaries_root() / model_key(spec.name)


def load_named(text: str | None, spec: ModelSpec, *, field: str = "dict") -> tuple[Dictionary, ...]:
    """The dictionaries ``text`` names (comma-separated), each checked against ``spec``'s model."""
    from hexray.features import formats

    out = []
    for name in split_names(text):
        try:
            folder = dictionary_folder(name, spec)
        except HexRayError as exc:
            raise HexRayError(exc.message, hint=exc.hint, field=field) from None
        key = (str(folder.resolve()), _mtime(folder))
        d = _LOADED.get(key)
        if d is None:
            d = formats.load_dictionary(folder, name=name)
            _LOADED[key] = d
        elif d.name != name:  # the same folder asked for by another name: labelled as asked, weights shared
            d = dataclasses.replace(d, name=name)
        d.check_model(spec)
        out.append(d)
    if not out:
        raise HexRayError("{field}: no dictionary named", hint="give a name such as resid.12, or a folder", field=field)
    return tuple(out)


def _mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=folder.stat().st_mtime)


def saved_dictionaries() -> list[dict]:
    """Every dictionary under the cache (the models' defaults and named ones): name, model, site, kind, size, quality."""
    from hexray.features import formats

    root = formats.dictionaries_root()
    rows = []
    for cfg in sorted(root.rglob(formats.SAE_CFG_FILENAME)) if root.is_dir() else []:
        folder = cfg.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):  # a save or a run in progress
            continue
        name = str(folder.relative_to(root))
        try:
            d = formats.load_dictionary(folder, name=name)
        except HexRayError as exc:
            rows.append({"name": name, "model": "", "site": "", "kind": "unreadable", "latents": 0, "k": None, "error": exc.message})
            continue
        quality = d.meta.get("quality") if isinstance(d.meta.get("quality"), dict) else None
        rows.append({"name": name, "model": d.model_name, "site": d.site.label, "kind": f"{d.kind} ({d.architecture})", "latents": d.d_sae, "k": d.k, "quality": quality})
    return rows


_LENSES: dict[tuple[str, float], object] = {}


def load_default_lens(model):
    """The model's tuned lens from the cache (``hexray lens train``), read once per file version."""
    from hexray.features.tuned_lens import default_tuned_lens_path, load_tuned_lens

    folder = default_tuned_lens_path(model)
    if not folder.exists():
        raise HexRayError(f"{model.name} has no tuned lens yet", hint="train one: hexray lens train (the embedded model: hexray dict defaults)", field="tuned_lens")
    key = (str(folder), _mtime(folder))
    if key not in _LENSES:
        _LENSES[key] = load_tuned_lens(folder, model)
    return _LENSES[key]
