"""Reading and writing sparse dictionaries on disk: the SAELens 6.x folder (read and written) and
EleutherAI sparsify's folder (read), plus a registry of named dictionaries under the cache root.

HexRay writes SAELens' own layout so a dictionary trained here loads in SAELens (and SAELens' and
sparsify's dictionaries load here) without a converter. What the layouts are, from their sources
(read in the stored copies of ``decoderesearch/SAELens`` 6.49.2 and ``EleutherAI/sparsify``):

- files ``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``: ``sae_lens/constants.py``.
- cfg.json is ``SAEConfig.to_dict``: d_in, d_sae, dtype, device, apply_b_dec_to_input,
  normalize_activations, reshape_activations, metadata, architecture (``sae_lens/saes/sae.py``);
  unknown top-level keys are dropped on load and metadata takes any key (``SAEMetadata``, same file).
- inference architectures registered in ``sae_lens/__init__.py``: standard, gated, topk, jumprelu,
  transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder, temporal,
  matching_pursuit; ``batchtopk`` is training-only.
- topk adds k and rescale_acts_by_decoder_norm; its TopK keeps the k largest pre-activations, then
  ReLU; a rescaled SAE multiplies pre-activations by ||W_dec[f]|| and divides them back in decode
  (``sae_lens/saes/topk_sae.py``), which folds exactly into W_enc, b_enc and W_dec.
- a BatchTopK SAE is saved as a ``jumprelu`` SAE whose ``threshold`` is its learned global
  threshold, with metadata training_architecture "batchtopk" and training_architecture_details
  holding k (``sae_lens/saes/batchtopk_sae.py``, ``TrainingSAEConfig`` in ``sae_lens/saes/sae.py``).
- jumprelu: weights W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold [d_sae];
  acts = relu(pre) * (pre > relu(threshold)) (``sae_lens/saes/jumprelu_sae.py``).
- transcoders add d_out, refuse apply_b_dec_to_input, decode to W_dec [d_sae, d_out]; skip
  transcoders add W_skip [d_out, d_in] as ``x @ W_skip.T`` (``sae_lens/saes/transcoder.py``).
- metadata keys SAELens' runner sets: model_name, hook_name, hook_head_index, context_size,
  prepend_bos, dataset_path, model_class_name, model_from_pretrained_kwargs, seqpos_slice,
  exclude_special_tokens, sae_lens_version, sae_lens_training_version
  (``sae_lens/llm_sae_training_runner.py``, ``sae_lens/saes/sae.py``); transcoders name their output
  hook_name_out / hook_head_index_out (``LLM_METADATA_KEYS``, ``sae_lens/loading/pretrained_sae_loaders.py``).
- transcoder input hooks in SAELens' loaders: ``blocks.L.ln2.hook_normalized`` (Gemma Scope) and
  ``blocks.L.mlp.hook_in`` (circuit-tracer transcoders), output ``blocks.L.hook_mlp_out``
  (``sae_lens/loading/pretrained_sae_loaders.py``).
- pre-6.0 configs (no metadata, hook_point) are converted by ``handle_pre_6_0_config`` (same file).
- sparsity.safetensors holds ``sparsity`` = log10(firing rate + 1e-10)
  (``sae_lens/llm_sae_training_runner.py``, ``_log_feature_sparsity`` in ``sae_lens/training/sae_trainer.py``).
- sparsify: ``cfg.json`` (its SparseCoderConfig plus d_in: activation, expansion_factor,
  normalize_decoder, num_latents, k, multi_topk, skip_connection, transcode, ...) and
  ``sae.safetensors`` with encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in],
  b_dec [d_in], W_skip [d_in, d_in]; encode subtracts b_dec unless transcoding, then
  topk(relu(encoder(x))); decode adds b_dec and ``x @ W_skip.mT`` (``sparsify/sparse_coder.py``,
  ``sparsify/config.py``, ``sparsify/fused_encoder.py``). Folders are named by hookpoint (a module
  of the base model: ``layers.10``, ``layers.10.mlp``), ``hook/seedN`` for several seeds, and the
  run's ``config.json`` names the model (``sparsify/trainer.py``, ``get_sparsify_config_from_disk``
  in SAELens' loaders).

Decisions: HexRay's extras (site, architecture, training record and quality from ``meta``, its
version) go in a separate ``hexray.json``, which SAELens never reads, so cfg.json stays SAELens'
own. A transcoder writes ``blocks.L.mlp.hook_in`` (the normalised MLP input after the norm's weight,
the tensor it was trained on; TransformerLens' ``ln2.hook_normalized`` is before that weight) and
reads both. SAELens has no top-k transcoder: HexRay writes those as ``topk_transcoder`` /
``topk_skip_transcoder``, named like SAELens' own, so SAELens refuses them instead of misreading
them. Only ``normalize_activations: none`` is read: the other modes need a scale that is not in
the folder or normalise each token non-linearly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hexray.errors import HexRayError, first_line
from hexray.features.dictionary import Dictionary, DictSite
from hexray.models.loading import ModelSpec, cache_root
from hexray.tracing import sites

SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
HEXRAY_FILENAME = "hexray.json"
SAELENS_VERSION = "6.49.2"  # the SAELens release whose layout this module writes
HEXRAY_FORMAT = 1
SPARSITY_EPS = 1e-10  # SAELens' log-sparsity epsilon

# SAELens architecture -> (HexRay architecture, transcoder, skip connection)
_SAELENS_ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", True, False),  # HexRay's, SAELens has none
    "topk_skip_transcoder": ("topk", True, True),  # HexRay's
}
_UNSUPPORTED_ARCHITECTURES = {
    "gated": "a gated SAE (separate gate and magnitude paths)",
    "temporal": "a temporal SAE (attention over earlier tokens)",
    "matching_pursuit": "a matching-pursuit SAE (iterative encoding)",
    "batchtopk": "a BatchTopK training checkpoint (SAELens saves it for inference as jumprelu)",
    "matryoshka_batchtopk": "a Matryoshka BatchTopK training checkpoint (SAELens saves it for inference as jumprelu)",
}
_READS = ", ".join(_SAELENS_ARCHITECTURES)
_SAE_HOOKS = ", ".join(str(h(1)) for h in (sites.resid_pre, sites.resid_post, sites.mlp_out, sites.attn_out)).replace("1", "L")  # e.g. blocks.L.hook_resid_pre
_THRESHOLD_ARCHS = ("jumprelu", "batchtopk")
_SPARSIFY_HOOK = re.compile(
    r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h|blocks)[._](?P<layer>\d+)(?:\.(?P<part>mlp|self_attn|attn|attention))?$"
)
_SPARSIFY_HOOKS = "layers.N (block output), layers.N.mlp, layers.N.self_attn (GPT-2: h.N, h.N.mlp, h.N.attn)"


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def dictionaries_root() -> Path:
    """Where named dictionaries live: ``<cache root>/dictionaries``."""
    return cache_root() / "dictionaries"


def list_dictionaries() -> list[tuple[str, Path]]:
    """``(name, folder)`` for every dictionary folder (either layout, or a sparsify run) under the root."""
    root = dictionaries_root()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or not entry.is_dir():  # temp folders of a save in progress
            continue
        if (entry / SAE_CFG_FILENAME).is_file() or _sparsify_hookpoints(entry):
            found.append((entry.name, entry))
    return found


def resolve_dictionary(name_or_path: str | Path) -> Path:
    """A dictionary's folder: an existing folder, else a name under :func:`dictionaries_root`."""
    text = str(name_or_path).strip()
    if not text:
        raise HexRayError("no dictionary given", hint="pass a folder or the name of a saved dictionary")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HexRayError(f"dictionary {text} is a file, not a folder", hint="point at the folder holding cfg.json")
        return path
    root = dictionaries_root()
    if not path.is_absolute() and (root / path).is_dir():
        return root / path
    names = [name for name, _ in list_dictionaries()]
    hint = f"saved dictionaries: {', '.join(names)}" if names else f"no dictionaries are saved under {root}; pass a folder"
    raise HexRayError(f"no dictionary {text!r}: no such folder, and no such name under {root}", hint=hint)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_dictionary(
    path: str | Path,
    *,
    name: str | None = None,
    hookpoint: str | None = None,
    model_name: str | None = None,
) -> Dictionary:
    """The dictionary in ``path`` (a folder or a registered name), float32 on the CPU.

    The layout is detected: SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json +
    sae.safetensors). A sparsify run folder holds one subfolder per hookpoint: pick one with
    ``hookpoint`` (``layers.10``) or point at the subfolder. ``model_name`` fills in a model the
    files do not name (sparsify's often do not).
    """
    folder = resolve_dictionary(path)
    if hookpoint:
        sub = folder / hookpoint
        if not sub.is_dir():
            points = _sparsify_hookpoints(folder)
            raise HexRayError(
                f"dictionary {folder} has no hookpoint {hookpoint!r}",
                hint=f"its hookpoints: {', '.join(points)}" if points else "it holds no sparsify hookpoint folders",
            )
        folder = sub
    has_cfg = (folder / SAE_CFG_FILENAME).is_file()
    if has_cfg and (folder / SAE_WEIGHTS_FILENAME).is_file():
        return _load_saelens(folder, name=name, model_name=model_name)
    if has_cfg and (folder / SPARSIFY_WEIGHTS_FILENAME).is_file():
        return _load_sparsify(folder, name=name, model_name=model_name)
    points = _sparsify_hookpoints(folder)
    if points:
        raise HexRayError(
            f"{folder} is a sparsify run with {len(points)} hookpoint{'s' if len(points) > 1 else ''}; pick one",
            hint=f"pass hookpoint= one of {', '.join(points)}",
        )
    if has_cfg:
        raise HexRayError(
            f"{folder} has cfg.json but no weights",
            hint=f"expected {SAE_WEIGHTS_FILENAME} (SAELens) or {SPARSIFY_WEIGHTS_FILENAME} (sparsify) beside it",
        )
    raise HexRayError(
        f"{folder} holds no dictionary",
        hint=f"expected a SAELens folder ({SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME}) or a sparsify one ({SAE_CFG_FILENAME} + {SPARSIFY_WEIGHTS_FILENAME})",
    )


def _load_saelens(folder: Path, *, name: str | None, model_name: str | None) -> Dictionary:
    cfg = _read_json(folder / SAE_CFG_FILENAME)
    where = f"{folder / SAE_CFG_FILENAME}"
    meta = _llm_metadata(cfg, where)
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    architecture = cfg.get("architecture")
    if architecture is None:
        if version and _version_tuple(str(version)) >= (6,):
            raise HexRayError(f"{where}: missing architecture", hint="the file is not a complete SAELens config")
        # before 6.0 the architecture was implied by the activation function
        architecture = "topk" if (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" else "standard"
        if architecture == "topk" and "k" not in cfg:
            cfg = {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}
    if not isinstance(architecture, str):
        raise HexRayError(f"{where}: architecture is {architecture!r}, not a name", hint=f"HexRay reads {_READS}")
    if architecture in _UNSUPPORTED_ARCHITECTURES:
        raise HexRayError(f"{where}: {_UNSUPPORTED_ARCHITECTURES[architecture]} is not supported", hint=f"HexRay reads {_READS}")
    if architecture not in _SAELENS_ARCHITECTURES:
        raise HexRayError(f"{where}: unknown architecture {architecture!r}", hint=f"HexRay reads {_READS}")
    arch, transcoder, skip = _SAELENS_ARCHITECTURES[architecture]

    normalize = cfg.get("normalize_activations", "none")
    if normalize is False or normalize is None:  # pre-6.0 spellings of "none"
        normalize = "none"
    if normalize != "none":
        raise HexRayError(
            f"{where}: normalize_activations {normalize!r} is not supported",
            hint="fold the scale into the weights (SAELens: fold_activation_norm_scaling_factor) and save with normalize_activations none",
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", None):
        raise HexRayError(f"{where}: reshape_activations {reshape!r} (per-head dictionaries) is not supported", hint="HexRay reads dictionaries over resid, mlp_out, attn_out and MLP input -> output")

    d_in = _positive_int(cfg, "d_in", where)
    d_sae = _positive_int(cfg, "d_sae", where)
    d_out = _positive_int(cfg, "d_out", where) if transcoder else d_in
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # SAELens' default
    if not isinstance(apply_b_dec, bool):
        raise HexRayError(f"{where}: apply_b_dec_to_input is {apply_b_dec!r}, not true or false", hint="set it to true or false in cfg.json")
    if transcoder and apply_b_dec:
        raise HexRayError(f"{where}: a transcoder with apply_b_dec_to_input true is not a valid SAELens config", hint="SAELens' TranscoderConfig refuses it; set it to false")

    extras = _read_hexray_json(folder)
    k: int | None = None
    if arch == "topk":
        k = _positive_int(cfg, "k", where)
    if arch == "jumprelu" and (meta.get("training_architecture") == "batchtopk" or extras.get("architecture") == "batchtopk"):
        arch = "batchtopk"
        k = _optional_k(extras.get("k", (meta.get("training_architecture_details") or {}).get("k")), where)

    tensors = _read_tensors(folder / SAE_WEIGHTS_FILENAME)
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "scaling_factor" in tensors:  # pre-6.0 finetuning scale: harmless only when all ones
        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            raise HexRayError(f"{folder / SAE_WEIGHTS_FILENAME}: a finetuning scaling_factor is not supported", hint="fold it into W_dec and b_dec, then save again")
        del tensors["scaling_factor"]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if arch in _THRESHOLD_ARCHS:
        shapes["threshold"] = (d_sae,)
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    weights = _check_tensors(tensors, shapes, folder / SAE_WEIGHTS_FILENAME, architecture)

    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens scales pre-activations by ||W_dec[f]|| and divides them back out: fold it in
        norm = weights["W_dec"].norm(dim=-1).clamp(min=1e-8)
        weights["W_enc"] = weights["W_enc"] * norm
        weights["b_enc"] = weights["b_enc"] * norm
        weights["W_dec"] = weights["W_dec"] / norm[:, None]
    if "threshold" in weights:
        # SAELens gates relu(pre) by pre > relu(threshold); HexRay gates pre by pre > threshold
        weights["threshold"] = weights["threshold"].clamp(min=0)

    hook_name = meta.get("hook_name")
    if not isinstance(hook_name, str) or not hook_name:
        raise HexRayError(f"{where}: missing metadata.hook_name", hint="HexRay needs the hook the dictionary was trained on")
    site = _site_from_hook(hook_name, transcoder=transcoder, where=where)
    hook_out = meta.get("hook_name_out")
    if transcoder and hook_out is not None:
        out = sites.parse_hook(str(hook_out))
        if out.layer != site.layer or out.point not in ("mlp_out", "mlp.hook_out"):
            raise HexRayError(f"{where}: a transcoder from {hook_name} to {hook_out} is not supported", hint=f"HexRay's transcoders read {sites.mlp_in(site.layer)} and rebuild {sites.mlp_out(site.layer)}")

    if extras:
        out_meta: dict[str, Any] = dict(extras.get("meta") or {})
    else:
        out_meta = {"source": {"format": "saelens", "path": str(folder), "architecture": architecture, "metadata": meta}}
    density = _read_density(folder / SPARSITY_FILENAME, d_sae)
    if density is not None:
        out_meta["density"] = density
    return Dictionary(
        site=site,
        architecture=arch,  # type: ignore[arg-type]
        W_enc=weights["W_enc"],
        b_enc=weights["b_enc"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        model_name=model_name or str(meta.get("model_name") or ""),
        k=k,
        threshold=weights.get("threshold"),
        W_skip=weights.get("W_skip"),
        apply_b_dec_to_input=apply_b_dec,
        name=name or str(extras.get("name") or "") or folder.name,
        context_size=_int_or_zero(meta.get("context_size")),
        prepend_bos=bool(meta.get("prepend_bos", False)),
        meta=out_meta,
    )


def _load_sparsify(folder: Path, *, name: str | None, model_name: str | None) -> Dictionary:
    where = str(folder / SAE_CFG_FILENAME)
    cfg = _read_json(folder / SAE_CFG_FILENAME)
    d_in = _positive_int(cfg, "d_in", where)
    k = _positive_int(cfg, "k", where)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise HexRayError(f"{where}: sparsify activation {activation!r} is not supported", hint="HexRay reads top-k sparse coders")
    for flag, why in (("signed", "signed top-k"), ("embed_skip", "a skip connection from the embeddings"), ("gram_lookup", "an n-gram lookup table")):
        if cfg.get(flag):
            raise HexRayError(f"{where}: a sparse coder with {why} ({flag}) is not supported", hint="HexRay reads plain top-k SAEs and transcoders")
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False))
    d_sae = cfg.get("num_latents") or 0
    if not d_sae:
        d_sae = d_in * _positive_int(cfg, "expansion_factor", where)
    if not isinstance(d_sae, int) or isinstance(d_sae, bool) or d_sae <= 0:
        raise HexRayError(f"{where}: num_latents is {d_sae!r}, not a positive whole number", hint="set num_latents (or expansion_factor) in cfg.json")
    if k > d_sae:
        raise HexRayError(f"{where}: k {k} is more than its {d_sae} latents", hint="the config is not one sparsify trains")

    hookpoint = folder.parent.name if re.fullmatch(r"seed\d+", folder.name) else folder.name
    site = _sparsify_site(hookpoint, transcode, where)
    weights_path = folder / SPARSIFY_WEIGHTS_FILENAME
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    weights = _check_tensors(_read_tensors(weights_path), shapes, weights_path, "sparsify sparse coder")

    run = _sparsify_run_config(folder)
    return Dictionary(
        site=site,
        architecture="topk",
        W_enc=weights["encoder.weight"].T.contiguous(),
        b_enc=weights["encoder.bias"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        model_name=model_name or str(run.get("model") or ""),
        k=k,
        W_skip=weights.get("W_skip"),  # sparsify adds x @ W_skip.mT: HexRay's [d_out, d_in] convention
        apply_b_dec_to_input=not transcode,  # sparsify encodes x - b_dec unless transcoding
        name=name or (f"{hookpoint}/{folder.name}" if folder.name != hookpoint else hookpoint),
        context_size=_int_or_zero(run.get("ctx_len")),
        meta={"source": {"format": "sparsify", "path": str(folder), "hookpoint": hookpoint, "cfg": cfg}},
    )


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def save_dictionary(d: Dictionary, folder: str | Path, *, spec: ModelSpec | None = None, overwrite: bool = False) -> Path:
    """Write ``d`` as a SAELens 6.x folder (plus ``hexray.json``); the folder appears only when complete.

    ``spec`` (the model it belongs to) checks the fit and names the stream after the last block
    ``blocks.{n-1}.hook_resid_post``. An existing non-empty folder is replaced only with ``overwrite``.
    """
    folder = Path(folder).expanduser()
    if spec is not None:
        d.check_model(spec)
    if folder.exists():
        if not folder.is_dir():
            raise HexRayError(f"cannot save dictionary to {folder}: it is a file", hint="pick a folder path")
        if any(folder.iterdir()) and not overwrite:
            raise HexRayError(f"cannot save dictionary to {folder}: the folder exists and is not empty", hint="pick another folder, or overwrite it")
    cfg, tensors, density, extras = _saelens_payload(d, spec)  # everything checked before touching the disk
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        raise HexRayError(f"cannot save dictionary to {folder}: {first_line(exc)}", hint="check the path and its permissions") from None
    try:
        save_file(tensors, str(tmp / SAE_WEIGHTS_FILENAME))
        if density is not None:
            save_file({"sparsity": density}, str(tmp / SPARSITY_FILENAME))
        (tmp / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        (tmp / HEXRAY_FILENAME).write_text(json.dumps(extras, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HexRayError(f"cannot save dictionary to {folder}: {first_line(exc)}", hint="check free space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` onto ``folder``, moving an old one aside until the new one is in."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _saelens_payload(d: Dictionary, spec: ModelSpec | None) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None, dict]:
    transcoder = d.site.transcoder
    skip = d.W_skip is not None
    if skip and not transcoder:
        raise HexRayError(f"dictionary {d.name or d.site.label}: an SAE with a skip connection has no SAELens layout", hint="only transcoders (site mlp.L) carry W_skip")
    if transcoder:
        stem = {"relu": "", "topk": "topk_", "jumprelu": "jumprelu_", "batchtopk": "jumprelu_"}[d.architecture]
        architecture = f"{stem}{'skip_' if skip else ''}transcoder"
    else:
        architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[d.architecture]

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    b_enc = plain(d.b_enc)
    apply_b_dec = d.apply_b_dec_to_input
    if transcoder and apply_b_dec:
        # SAELens transcoders refuse the flag; (x - b_dec) @ W_enc + b_enc folds it into b_enc exactly
        b_enc = b_enc - plain(d.b_dec) @ plain(d.W_enc)
        apply_b_dec = False
    tensors = {"W_enc": plain(d.W_enc), "b_enc": b_enc, "W_dec": plain(d.W_dec), "b_dec": plain(d.b_dec)}
    if d.architecture in _THRESHOLD_ARCHS:
        tensors["threshold"] = plain(d.threshold)  # type: ignore[arg-type]
    if skip:
        tensors["W_skip"] = plain(d.W_skip)  # type: ignore[arg-type]

    hook_in, hook_out = _site_hooks(d.site, spec)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": d.model_name or (spec.name if spec else None),
        "hook_name": hook_in,
        "hook_head_index": None,
        "context_size": d.context_size or None,
        "prepend_bos": bool(d.prepend_bos),
        "dataset_path": _dataset(d.meta),
        "model_class_name": "HookedTransformer",  # TransformerLens hook names; SAELens' load_model knows this class
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        "exclude_special_tokens": False,
    }
    if transcoder:
        metadata["hook_name_out"] = hook_out
        metadata["hook_head_index_out"] = None
    if d.architecture == "batchtopk":
        metadata["training_architecture"] = "batchtopk"
        metadata["training_architecture_details"] = {"k": d.k}
    cfg: dict[str, Any] = {
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(apply_b_dec),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": architecture,
    }
    if d.architecture == "topk":
        cfg["k"] = int(d.k)  # type: ignore[arg-type]
        cfg["rescale_acts_by_decoder_norm"] = False
    if transcoder:
        cfg["d_out"] = d.d_out

    density = d.meta.get("density")
    log_sparsity = None
    if density is not None:
        density = torch.as_tensor(density, dtype=torch.float64).detach().cpu()
        if density.shape != (d.d_sae,):
            raise HexRayError(f"dictionary {d.name or d.site.label}: density has shape {tuple(density.shape)}, expected ({d.d_sae},)", hint="density holds one firing rate per feature")
        log_sparsity = torch.log10(density + SPARSITY_EPS).to(torch.float32).contiguous()
    from hexray import __version__

    extras = {
        "format": HEXRAY_FORMAT,
        "hexray_version": __version__,
        "name": d.name,
        "site": d.site.label,
        "architecture": d.architecture,
        "k": d.k,
        "meta": _json_ready({key: value for key, value in d.meta.items() if key != "density"}, d),
    }
    return cfg, tensors, log_sparsity, extras


def _site_hooks(site: DictSite, spec: ModelSpec | None) -> tuple[str, str | None]:
    """The TransformerLens hooks a site reads (and, for transcoders, rebuilds)."""
    if site.kind == "resid":
        if spec is not None and site.layer >= spec.n_layers:
            return str(sites.resid_post(spec.n_layers - 1)), None
        return str(sites.resid_pre(site.layer)), None
    if site.kind == "mlp":
        return str(sites.mlp_in(site.layer)), str(sites.mlp_out(site.layer))
    return str({"mlp_out": sites.mlp_out, "attn_out": sites.attn_out}[site.kind](site.layer)), None


def _dataset(meta: Mapping[str, Any]) -> str | None:
    """The dataset a training record names, if any (SAELens' metadata.dataset_path)."""
    for holder in (meta, meta.get("training") if isinstance(meta.get("training"), Mapping) else {}):
        for key in ("dataset_path", "dataset"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return None


def _json_ready(value: Any, d: Dictionary) -> Any:
    """``meta`` as JSON values (tensors as lists, paths as text), or a HexRayError naming what is not."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item, d) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, d) for item in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # JSON has no inf/nan
        return value
    raise HexRayError(f"dictionary {d.name or d.site.label}: its meta holds a {type(value).__name__}, which cannot be saved", hint="keep meta to numbers, text, lists and dicts")


# ---------------------------------------------------------------------------------------------
# sites from hook names
# ---------------------------------------------------------------------------------------------


def _site_from_hook(hook_name: str, *, transcoder: bool, where: str) -> DictSite:
    """``blocks.10.hook_resid_pre`` -> resid.10, ``blocks.9.hook_resid_post`` -> resid.10, ...;
    a transcoder's ``blocks.10.mlp.hook_in`` or ``blocks.10.ln2.hook_normalized`` -> mlp.10."""
    hook = sites.parse_hook(hook_name)
    if hook.layer is None:
        raise HexRayError(f"{where}: hook {hook_name} is not inside a block", hint=f"HexRay reads dictionaries over {_SAE_HOOKS} and MLP input -> output")
    layer, point = hook.layer, hook.point
    if point == "hook_mlp_in":
        raise HexRayError(
            f"{where}: hook {hook_name} is the residual stream before the MLP's norm",
            hint=f"HexRay's MLP site reads the normalised input, blocks.{layer}.mlp.hook_in",
        )
    if transcoder:
        if point in ("mlp_in", "ln2.hook_normalized"):
            return DictSite("mlp", layer)
        raise HexRayError(f"{where}: a transcoder reading {hook_name} is not supported", hint=f"HexRay's transcoders read {sites.mlp_in(layer)} and rebuild {sites.mlp_out(layer)}")
    if point == "resid_pre":
        return DictSite("resid", layer)
    if point == "resid_post":
        return DictSite("resid", layer + 1)
    if point in ("mlp_out", "mlp.hook_out"):
        return DictSite("mlp_out", layer)
    if point in ("attn_out", "attn.hook_out"):
        return DictSite("attn_out", layer)
    raise HexRayError(f"{where}: an SAE on hook {hook_name} is not supported", hint=f"HexRay's SAEs read {_SAE_HOOKS}")


def _sparsify_site(hookpoint: str, transcode: bool, where: str) -> DictSite:
    """``layers.10`` (block 10's output) -> resid.11; ``layers.10.mlp`` -> mlp.10 transcoding, else mlp_out.10."""
    m = _SPARSIFY_HOOK.match(hookpoint)
    if m is None:
        raise HexRayError(f"{where}: sparsify hookpoint {hookpoint!r} is not one HexRay reads", hint=f"use {_SPARSIFY_HOOKS}")
    layer, part = int(m.group("layer")), m.group("part")
    if part == "mlp":
        return DictSite("mlp" if transcode else "mlp_out", layer)
    if transcode:
        raise HexRayError(f"{where}: a transcoder over {hookpoint} is not supported", hint="HexRay's transcoders replace an MLP: layers.N.mlp")
    return DictSite("resid", layer + 1) if part is None else DictSite("attn_out", layer)


def _sparsify_hookpoints(folder: Path) -> list[str]:
    """The hookpoint subfolders of a sparsify run (``layers.10``, ``layers.10/seed0``)."""
    if not folder.is_dir():
        return []
    points = []
    for sub in sorted(folder.iterdir(), key=lambda p: p.name):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        if (sub / SAE_CFG_FILENAME).is_file():
            points.append(sub.name)
        else:
            points.extend(f"{sub.name}/{seed.name}" for seed in sorted(sub.glob("seed*")) if (seed / SAE_CFG_FILENAME).is_file())
    return points


def _sparsify_run_config(folder: Path) -> dict:
    """The run's config.json (model, ctx_len) beside the hookpoint folders; {} when absent or unreadable."""
    seeded = re.fullmatch(r"seed\d+", folder.name) is not None
    for parent in (folder.parent.parent,) if seeded else (folder.parent,):
        path = parent / "config.json"
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}  # optional provenance: the weights load without it
            return value if isinstance(value, dict) else {}
    return {}


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HexRayError(f"cannot read {path}: {first_line(exc)}", hint="check the file and its permissions") from None
    except ValueError as exc:
        raise HexRayError(f"{path} is not valid JSON ({first_line(exc)})", hint="the file is corrupt or truncated") from None
    if not isinstance(value, dict):
        raise HexRayError(f"{path} holds a {type(value).__name__}, not a JSON object", hint="the file is not a dictionary config")
    return value


def _read_hexray_json(folder: Path) -> dict:
    path = folder / HEXRAY_FILENAME
    if not path.is_file():
        return {}
    extras = _read_json(path)
    if not isinstance(extras.get("meta", {}), dict):
        raise HexRayError(f"{path}: meta is not a JSON object", hint="delete hexray.json to load the folder as a plain SAELens dictionary")
    return extras


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except OSError as exc:
        raise HexRayError(f"cannot read {path}: {first_line(exc)}", hint="check the file and its permissions") from None
    except Exception as exc:  # safetensors' own error type for a bad header or short file
        raise HexRayError(f"{path} is corrupt or truncated ({first_line(exc)})", hint="download or save the dictionary again") from None


def _check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors ``shapes`` names, as float32, or a HexRayError naming the missing, extra or misshapen one."""
    missing = [key for key in shapes if key not in tensors]
    if missing:
        raise HexRayError(f"{path} lacks {', '.join(missing)}", hint=f"a {what} needs {', '.join(shapes)}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise HexRayError(f"{path} has unexpected tensors {', '.join(extra)}", hint=f"a {what} holds only {', '.join(shapes)}; is it another architecture?")
    out = {}
    for key, shape in shapes.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise HexRayError(f"{path}: {key} is {tuple(tensor.shape)}, expected {shape}", hint="the weights do not match the config")
        if not tensor.is_floating_point():
            raise HexRayError(f"{path}: {key} holds {str(tensor.dtype).removeprefix('torch.')}, not floating-point numbers", hint="the file is not a dictionary's weights")
        out[key] = tensor.to(torch.float32).contiguous()  # float16/bfloat16 files are widened
    return out


def _read_density(path: Path, d_sae: int) -> torch.Tensor | None:
    """Firing rates from SAELens' log10 sparsity file, if there is one."""
    if not path.is_file():
        return None
    tensors = _read_tensors(path)
    log_sparsity = tensors.get("sparsity")
    if log_sparsity is None or tuple(log_sparsity.shape) != (d_sae,):
        shape = None if log_sparsity is None else tuple(log_sparsity.shape)
        raise HexRayError(f"{path}: expected a sparsity tensor of shape ({d_sae},), found {shape}", hint="delete the file to load the dictionary without feature densities")
    return (torch.pow(10.0, log_sparsity.to(torch.float64)) - SPARSITY_EPS).clamp(min=0).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# config fields
# ---------------------------------------------------------------------------------------------


def _llm_metadata(cfg: dict, where: str) -> dict:
    """SAELens' metadata block; pre-6.0 configs kept the same fields at the top level."""
    meta = cfg.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise HexRayError(f"{where}: metadata is not a JSON object", hint="the file is not a SAELens config")
    meta = dict(meta)
    for key in ("model_name", "hook_name", "hook_name_out", "context_size", "prepend_bos", "dataset_path", "sae_lens_version"):
        if key not in meta and key in cfg:
            meta[key] = cfg[key]
    if "hook_name" not in meta and "hook_point" in cfg:
        meta["hook_name"] = cfg["hook_point"]
    return meta


def _positive_int(cfg: dict, key: str, where: str) -> int:
    if key not in cfg:
        raise HexRayError(f"{where}: missing {key}", hint="the file is not a complete dictionary config")
    value = cfg[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HexRayError(f"{where}: {key} is {value!r}, not a positive whole number", hint="the config is corrupt or not a dictionary config")
    return value


def _optional_k(value: Any, where: str) -> int | None:
    """BatchTopK's k (SAELens stores it as a float: the average kept per token), rounded."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HexRayError(f"{where}: BatchTopK k is {value!r}, not a positive number", hint="set metadata.training_architecture_details.k to the average number of latents kept")
    return max(1, round(value))


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"\.", text):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)
