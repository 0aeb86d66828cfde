"""A corpus tokenized once and packed into fixed-length contexts, cached on disk.

Training a sparse dictionary or a tuned lens, and indexing top activations, all run the model over
the same kind of input: many contexts of ``context_size`` tokens. :func:`token_pack` builds them:

- every context starts with the tokenizer's BOS token (when it has one);
- documents follow one another, each followed by the EOS token as a separator (the BOS token
  when there is no EOS, nothing when there is neither); a document that does not fit continues
  in the next context, which again starts with BOS;
- BOS, separators, padding and any special token (a template's ``<|im_start|>``, a literal
  ``<|endoftext|>`` in a document) are not *counted*: analyses read and train on counted
  positions only, so each real token is seen once and never as scaffolding;
- packing stops once ``max_tokens`` counted tokens are in; the last context is padded (with the
  pad token, else EOS, not counted) rather than dropped, so a pack holds exactly
  ``min(max_tokens, tokens in the corpus)`` counted tokens.

The pack is saved as ``cache_root()/corpus/<key>.safetensors`` (document names in ``<key>.json``
beside it), keyed by the tokenizer, the source's files, and every packing option; a second call
with the same inputs loads it instead of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hexray.corpus.sources import Document, documents, is_default, source_fingerprint
from hexray.errors import HexRayError, first_line
from hexray.models.loading import LoadedModel, cache_root

PACK_VERSION = 1  # bump when packing changes what a key's pack holds
_BATCH_CHARS = 1_000_000  # characters per tokenizer call: fast-tokenizer batches, bounded memory
_PROBES = ("Hello, world!", " The quick brown fox", "def f(x):\n    return x ** 2", "naïve café 東京 🙂")

Progress = Callable[[int, "int | None"], None]  # (counted tokens so far, max_tokens or None)


@dataclass(frozen=True, eq=False)
class TokenPack:
    """Packed contexts of one corpus; row ``i`` is one context the model reads at once."""

    tokens: torch.Tensor  # [n_contexts, context_size] int64
    counted: torch.Tensor  # [n_contexts, context_size] bool: False for BOS, separators, special tokens, padding
    doc: torch.Tensor  # [n_contexts, context_size] int32: index into documents, -1 where not counted
    documents: tuple[str, ...]  # document names
    source: str  # the source as given ("default" for the default corpus)
    key: str  # the cache key (slices add their range: "<key>[0:10]")

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def context_size(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        """Counted tokens."""
        return int(self.counted.sum())

    def __len__(self) -> int:
        return self.n_contexts

    def __getitem__(self, index: int | slice) -> TokenPack:
        """The contexts ``index`` (a slice, or one context as a pack of one)."""
        if isinstance(index, int):
            if not -self.n_contexts <= index < self.n_contexts:
                raise IndexError(f"context {index} out of range for {self.n_contexts} contexts")
            index = index % self.n_contexts
            index = slice(index, index + 1)
        start, stop, step = index.indices(self.n_contexts)
        if step != 1:
            raise ValueError("a TokenPack slice must be contiguous")
        return TokenPack(self.tokens[start:stop], self.counted[start:stop], self.doc[start:stop], self.documents, self.source, f"{self.key}[{start}:{stop}]")

    def split(self, held_out: float | int) -> tuple[TokenPack, TokenPack]:
        """(train, held-out): the last contexts held out, ``held_out`` as a fraction (0 < f < 1) or a count."""
        n = self.n_contexts
        if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
            raise HexRayError(f"{{field}} must be a fraction or a number of contexts, got {held_out!r}", field="held_out")
        if isinstance(held_out, float):
            if not 0 < held_out < 1:
                raise HexRayError(f"{{field}} must be between 0 and 1 as a fraction, got {held_out}", field="held_out")
            count = min(max(round(n * held_out), 1), n - 1)
        else:
            count = held_out
        if n < 2 or not 1 <= count <= n - 1:
            raise HexRayError(f"cannot hold out {count} of {n} contexts (both parts need at least one)", hint="give a larger corpus or more tokens", field="held_out")
        return self[: n - count], self[n - count :]

    def batches(self, size: int) -> Iterator[TokenPack]:
        """Consecutive packs of ``size`` contexts (the last one may be smaller)."""
        if size < 1:
            raise HexRayError(f"{{field}} must be at least 1, got {size}", field="batch_contexts")
        for start in range(0, self.n_contexts, size):
            yield self[start : start + size]

    def document_name(self, context: int, position: int) -> str | None:
        """The name of the document a position belongs to (None for BOS, separators, padding)."""
        i = int(self.doc[context, position])
        return self.documents[i] if i >= 0 else None


def token_pack(model: LoadedModel, source: str | Path | None = None, *, context_size: int = 128, max_tokens: int | None = None,
               chat_template: bool = False, progress: Progress | None = None) -> TokenPack:
    """``source``'s documents (see :func:`hexray.corpus.sources.documents`) tokenized and packed.

    ``chat_template``: format every document as one user message with the tokenizer's chat
    template (JSONL ``messages`` rows always use it when the tokenizer has one).
    """
    tok = model.tokenizer
    if isinstance(context_size, bool) or not isinstance(context_size, int) or not 2 <= context_size <= model.spec.n_ctx:
        raise HexRayError(f"{{field}} must be between 2 and {model.spec.n_ctx} ({model.name}'s context), got {context_size}", field="context_size")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise HexRayError(f"{{field}} must be a positive number of tokens, got {max_tokens}", field="max_tokens")
    if chat_template and not getattr(tok, "chat_template", None):
        raise HexRayError(f"{model.name}'s tokenizer has no chat template", hint="pack the corpus as plain text (no chat template)", field="chat_template")
    label = "default" if is_default(source) else str(source)
    key = pack_key(model, source, context_size=context_size, max_tokens=max_tokens, chat_template=chat_template)
    path = cache_root() / "corpus" / f"{key}.safetensors"
    cached = _load(path, label, key)
    if cached is not None:
        if progress:
            progress(cached.n_tokens, max_tokens)
        return cached
    pack = _build(model, documents(source), label, key, context_size, max_tokens, chat_template, progress)
    _save(pack, path)
    return pack


def pack_key(model: LoadedModel, source: str | Path | None = None, *, context_size: int = 128, max_tokens: int | None = None,
             chat_template: bool = False) -> str:
    """The cache key: a hash of the tokenizer, the source's files and every packing option."""
    parts = [f"pack v{PACK_VERSION}", tokenizer_fingerprint(model.tokenizer), source_fingerprint(source),
             f"context_size {context_size}", f"max_tokens {max_tokens}", f"chat_template {bool(chat_template)}"]
    return hashlib.sha256("\n".join(parts).encode("utf-8", errors="surrogatepass")).hexdigest()[:24]


def tokenizer_fingerprint(tok) -> str:
    """What tells tokenizers apart: name, vocabulary size, special ids, template, and a few encodings."""
    probes = [tok(p, add_special_tokens=False)["input_ids"] for p in _PROBES]
    template = getattr(tok, "chat_template", None) or ""
    return json.dumps([getattr(tok, "name_or_path", ""), len(tok), tok.bos_token_id, tok.eos_token_id, sorted(tok.all_special_ids),
                       hashlib.sha256(str(template).encode()).hexdigest(), probes])


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def _build(model: LoadedModel, docs: Iterator[Document], label: str, key: str, context_size: int, max_tokens: int | None,
           chat_template: bool, progress: Progress | None) -> TokenPack:
    tok = model.tokenizer
    bos = tok.bos_token_id
    sep = tok.eos_token_id if tok.eos_token_id is not None else bos
    pad = tok.pad_token_id if tok.pad_token_id is not None else (sep if sep is not None else 0)
    special = torch.tensor(sorted({int(i) for i in tok.all_special_ids} | ({int(sep)} if sep is not None else set())), dtype=torch.int64)
    use_template = bool(getattr(tok, "chat_template", None))

    ids_parts: list[torch.Tensor] = []  # each [len] int64: a document's tokens, then its separator
    doc_parts: list[torch.Tensor] = []  # each [len] int32
    names: list[str] = []
    done = 0

    def flush(batch: list[Document]) -> bool:
        """Tokenize ``batch`` and append it; True once ``max_tokens`` counted tokens are in."""
        nonlocal done
        texts = [_render(tok, d, chat_template, use_template) for d in batch]
        try:
            encoded = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: no over-length warning
        except Exception as exc:  # noqa: BLE001 - tokenizers raise plain exceptions on bad input
            raise HexRayError(f"{model.name}'s tokenizer failed on {batch[0].name}..{batch[-1].name}: {first_line(exc)}", field="corpus") from exc
        for d, ids in zip(batch, encoded):
            t = torch.tensor(ids, dtype=torch.int64)
            counted = ~torch.isin(t, special)
            n = int(counted.sum())
            if n == 0:
                continue
            if max_tokens is not None and done + n >= max_tokens:  # cut right after the last token wanted
                t = t[: int(torch.nonzero(counted.cumsum(0) == max_tokens - done)[0]) + 1]
                n = max_tokens - done
            index = len(names)
            names.append(d.name)
            ids_parts.append(t)
            doc_parts.append(torch.full((len(t),), index, dtype=torch.int32))
            if sep is not None:
                ids_parts.append(torch.tensor([sep], dtype=torch.int64))
                doc_parts.append(torch.tensor([-1], dtype=torch.int32))
            done += n
            if max_tokens is not None and done >= max_tokens:
                return True
        if progress:
            progress(done, max_tokens)
        return False

    batch: list[Document] = []
    chars = 0
    full = False
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= _BATCH_CHARS or (max_tokens is not None and chars >= 8 * (max_tokens - done)):  # ~1-8 chars a token
            full = flush(batch)
            batch, chars = [], 0
            if full:
                break
    if batch and not full:
        full = flush(batch)
    if progress and full:
        progress(done, max_tokens)
    if not names:
        raise HexRayError(f"{{field}} {label} gave no tokens", hint="give a corpus with some text", field="corpus")

    stream = torch.cat(ids_parts)  # [N]
    doc_of = torch.cat(doc_parts)  # [N]
    body = context_size - (1 if bos is not None else 0)  # tokens of documents per context
    n_contexts = -(-len(stream) // body)
    padding = n_contexts * body - len(stream)
    stream = torch.cat([stream, torch.full((padding,), pad, dtype=torch.int64)]).view(n_contexts, body)
    doc_of = torch.cat([doc_of, torch.full((padding,), -1, dtype=torch.int32)]).view(n_contexts, body)
    if bos is not None:
        stream = torch.cat([torch.full((n_contexts, 1), bos, dtype=torch.int64), stream], dim=1)  # [n_contexts, context_size]
        doc_of = torch.cat([torch.full((n_contexts, 1), -1, dtype=torch.int32), doc_of], dim=1)
    counted = doc_of >= 0
    counted &= ~torch.isin(stream, special)  # special tokens inside a document (a template's markers)
    doc_of = torch.where(counted, doc_of, torch.tensor(-1, dtype=torch.int32))
    return TokenPack(stream.contiguous(), counted.contiguous(), doc_of.contiguous(), tuple(names), label, key)


def _render(tok, doc: Document, chat_template: bool, use_template: bool) -> str:
    """The text the tokenizer sees: the document, or its chat through the template."""
    if doc.messages is not None and use_template:
        messages = [{"role": r, "content": c} for r, c in doc.messages]
    elif chat_template:
        messages = [{"role": "user", "content": doc.text}]
    else:
        return doc.text
    try:
        return tok.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template raises whatever its Jinja code raises
        raise HexRayError(f"the chat template cannot format {doc.name}: {first_line(exc)}", hint="check the roles of its messages", field="corpus") from exc


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------


def _load(path: Path, label: str, key: str) -> TokenPack | None:
    """The cached pack, or None when absent or damaged (it is then simply built again)."""
    from safetensors.torch import load_file

    names_path = path.with_suffix(".json")
    if not (path.is_file() and names_path.is_file()):
        return None
    try:
        tensors = load_file(str(path))
        names = tuple(json.loads(names_path.read_text(encoding="utf-8"))["documents"])
        tokens, counted, doc = tensors["tokens"], tensors["counted"], tensors["doc"]
    except Exception:  # noqa: BLE001 - a half-written or foreign file is a cache miss, never an error
        return None
    if not (tokens.dim() == 2 and tokens.shape == counted.shape == doc.shape and tokens.numel() > 0):
        return None
    if tokens.dtype != torch.int64 or counted.dtype != torch.bool or doc.dtype != torch.int32 or int(doc.max()) >= len(names):
        return None
    return TokenPack(tokens, counted, doc, names, label, key)


def _save(pack: TokenPack, path: Path) -> None:
    """Write names then tensors, each atomically (temp file + rename); the tensors file marks a complete pack."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps({"source": pack.source, "documents": list(pack.documents)}), encoding="utf-8"))
        _atomic(path, lambda tmp: save_file({"tokens": pack.tokens, "counted": pack.counted, "doc": pack.doc}, str(tmp), metadata={"source": pack.source, "version": str(PACK_VERSION)}))
    except OSError:
        pass  # an unwritable cache only costs the next call a re-tokenization


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
