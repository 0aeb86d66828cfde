"""Where training text comes from: the built-in default corpus, or a user's files and datasets.

Sparse autoencoders, the tuned lens and the neuroscope index all need plain text by the million
tokens, offline. :func:`documents` turns a *source* into a stream of :class:`Document` s:

- ``None`` / ``"default"``: the default corpus, built from what this machine already has, in four
  genres: the King James Bible (Debian's ``bible-kjv-text``, one document a chapter), the Jargon
  File (Debian's ``dict-jargon``, one document an entry), Python's own documentation
  (``pydoc_data.topics``, one document a topic) and Python's standard-library source (one document a
  module). The Debian texts are optional (``make setup`` installs them); :func:`corpus_genres` says
  which genres this machine has. Genres are interleaved document by document, always taking the
  next document from the genre that has given the fewest characters so far, so any prefix of the
  corpus mixes every genre in about equal measure while they last. The order is deterministic.
- a ``.txt`` / ``.md`` file: one document; a file over :data:`PART_CHARS` characters is split at
  blank lines into parts of about that size (never inside a paragraph), named ``path:LINE`` after
  the line each part starts on.
- a ``.jsonl`` file: one document a row, from its ``text`` field or its ``messages`` (a chat: a list
  of ``{"role", "content"}``), named ``path:LINE``.
- a ``.parquet`` file: one document a row of its ``text`` column, named ``path[ROW]`` (from 0).
- a Hugging Face dataset saved with ``save_to_disk``: its ``text`` column (a DatasetDict: its
  ``train`` split, else its first), named ``path[ROW]``.
- a folder: every ``.txt``, ``.md``, ``.jsonl`` and ``.parquet`` file in it, recursively, in sorted
  path order (hidden files and folders skipped).

Everything a user can get wrong (a missing path, an empty or unreadable file, a malformed JSONL
line, no ``text`` column) is a :class:`~hexray.errors.HexRayError` naming the file (and line).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hexray.errors import HexRayError, first_line

FIELD = "corpus"
PART_CHARS = 64_000  # a plain-text file larger than this is split at blank lines into parts of about this size
FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_HINT_FORMATS = "give a .txt, .md, .jsonl or .parquet file, a folder of them, or a dataset saved with save_to_disk"

# The default corpus. Bump DEFAULT_VERSION whenever what it yields changes (it is part of cache keys).
DEFAULT_VERSION = 1
GENRES = ("bible", "jargon", "python-docs", "python-code")
BIBLE_PATHS = ("/usr/lib/bible.data", "/usr/share/bible-kjv-text/bible.data", "/usr/share/bible-kjv/bible.data")
JARGON_PATHS = ("/usr/share/dictd/jargon.index",)  # beside it: jargon.dict.dz (or jargon.dict)
CODE_CHARS = 5_000_000  # how much standard-library source the default corpus takes
CODE_FILE_CHARS = 200_000  # larger modules are generated tables or tests, not representative code
_CODE_SKIP = {"test", "tests", "idle_test", "idlelib", "turtledemo", "encodings", "pydoc_data", "site-packages",
              "dist-packages", "__pycache__", "ensurepip", "lib2to3"}


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    ``name`` is a stable id (``bible-kjv/Genesis 1``, ``data.jsonl:12``). A chat row also keeps its
    ``messages`` ((role, content) pairs) so packing can apply the model's chat template; its
    ``text`` is then a plain ``role: content`` rendering, for tokenizers without one.
    """

    name: str
    text: str
    messages: tuple[tuple[str, str], ...] | None = None


def documents(source: str | Path | None = None) -> Iterator[Document]:
    """The documents of ``source`` (see the module docstring), lazily.

    The source itself is checked now (a missing path fails here); problems inside files surface
    while iterating. A source that yields no text at all is an error too.
    """
    if is_default(source):
        genres = _default_genres()
        if not genres:
            raise HexRayError("the default corpus found no text on this machine", hint="install bible-kjv-text and dict-jargon (make setup), or give a corpus file", field=FIELD)
        return _nonempty(_interleave([(g, _GENRE_READERS[g]()) for g in genres]), "the default corpus")
    path = Path(source).expanduser()
    if not path.exists():
        raise HexRayError(f"{{field}} {source}: no such file or folder", hint=_HINT_FORMATS, field=FIELD)
    if path.is_dir():
        return _nonempty(_read_dataset(path) if _is_hf_dataset(path) else _read_folder(path), str(path))
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise HexRayError(f"{{field}} {source}: unsupported file type {path.suffix or '(none)'!r}", hint=_HINT_FORMATS, field=FIELD)
    return _nonempty(_read_file(path), str(path))


def is_default(source: str | Path | None) -> bool:
    """Whether ``source`` names the default corpus (None, "" or "default"; a Path is always a path)."""
    return source is None or (isinstance(source, str) and source.strip().lower() in {"", "default"})


def corpus_genres() -> tuple[str, ...]:
    """The genres the default corpus has on this machine, in :data:`GENRES` order."""
    return _default_genres()


def source_fingerprint(source: str | Path | None = None) -> str:
    """A string that changes whenever the documents of ``source`` may change (for cache keys).

    The default corpus: its version, genres and the files behind them; a path: its resolved path
    and the size and modification time of every file read.
    """
    if is_default(source):
        parts = [f"default v{DEFAULT_VERSION}", f"python {sys.version_info[0]}.{sys.version_info[1]}", *_default_genres()]
        for genre in _default_genres():
            parts += [_stat_line(p) for p in _genre_files(genre)]
        return "\n".join(parts)
    path = Path(source).expanduser()
    if not path.exists():
        raise HexRayError(f"{{field}} {source}: no such file or folder", hint=_HINT_FORMATS, field=FIELD)
    path = path.resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)) if _is_hf_dataset(path) else _folder_files(path)
        return "\n".join([str(path), *(_stat_line(p, path) for p in files)])
    return "\n".join([str(path), _stat_line(path)])


def _stat_line(path: Path, root: Path | None = None) -> str:
    st = path.stat()
    return f"{path.relative_to(root) if root else path} {st.st_size} {st.st_mtime_ns}"


def _nonempty(docs: Iterator[Document], what: str) -> Iterator[Document]:
    """``docs``, failing at the end if there were none: an empty corpus is a mistake, not a no-op."""
    any_text = False
    for doc in docs:
        any_text = True
        yield doc
    if not any_text:
        raise HexRayError(f"{{field}} {what} has no text", hint=_HINT_FORMATS, field=FIELD)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _read_folder(folder: Path) -> Iterator[Document]:
    files = _folder_files(folder)
    if not files:
        raise HexRayError(f"{{field}} {folder} holds no .txt, .md, .jsonl or .parquet files", hint=_HINT_FORMATS, field=FIELD)
    for path in files:
        try:
            yield from _read_file(path)
        except _EmptyFile:
            continue  # one empty file in a folder is fine; a folder without any text is not


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file() and not _hidden(p, folder))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class _EmptyFile(HexRayError):
    """A file with no text (an error on its own, skipped inside a folder)."""


def _read_file(path: Path) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_text(path)


def _unreadable(path: Path, exc: BaseException, where: str = "") -> HexRayError:
    why = getattr(exc, "strerror", None) or ("it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else first_line(exc))
    return HexRayError(f"{{field}} {path}{where} cannot be read: {why}", hint="check the file's permissions and encoding (UTF-8)", field=FIELD)


def _read_text(path: Path) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from None
    if not text.strip():
        raise _EmptyFile(f"{{field}} {path} is empty", hint="give a file with some text", field=FIELD)
    if len(text) <= PART_CHARS:
        yield Document(str(path), text)
        return
    for line, part in _parts(text):
        yield Document(f"{path}:{line}", part)


def _parts(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of runs of whole paragraphs, each of at least :data:`PART_CHARS` characters but the last."""
    start = 0
    for cut in [m.start() for m in re.finditer(r"\n[ \t]*\n", text)] + [len(text)]:  # blank lines
        if cut - start >= PART_CHARS or cut == len(text):
            piece = text[start:cut]
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                yield text.count("\n", 0, start + lead) + 1, piece.strip()
            start = cut


def _read_jsonl(path: Path) -> Iterator[Document]:
    any_row = False
    try:
        with path.open(encoding="utf-8") as f:
            number = 0
            while True:
                number += 1
                try:
                    line = f.readline()
                except UnicodeDecodeError as exc:
                    raise _unreadable(path, exc, f" line {number}") from None
                if not line:
                    break
                if not line.strip():
                    continue
                doc = _jsonl_row(path, number, line)
                if doc is not None:
                    any_row = True
                    yield doc
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not any_row:
        raise _EmptyFile(f"{{field}} {path} has no text", hint='write one {"text": ...} (or {"messages": [...]}) a line', field=FIELD)


def _jsonl_row(path: Path, number: int, line: str) -> Document | None:
    where = f"{{field}} {path} line {number}"
    hint = 'write one {"text": ...} or {"messages": [{"role": ..., "content": ...}]} a line'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HexRayError(f"{where} is not valid JSON: {exc.msg}", hint=hint, field=FIELD) from None
    if not isinstance(row, dict):
        raise HexRayError(f"{where} is not a JSON object", hint=hint, field=FIELD)
    name = f"{path}:{number}"
    if "messages" in row and "text" not in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise HexRayError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects", hint=hint, field=FIELD)
        pairs = tuple((m["role"], m["content"]) for m in messages)
        _check_unicode(" ".join(c for _, c in pairs), where, hint)
        if not any(c.strip() for _, c in pairs):
            return None
        return Document(name, "\n".join(f"{role}: {content}" for role, content in pairs), pairs)
    text = row.get("text")
    if text is None:
        raise HexRayError(f"{where} has no 'text' field", hint=hint, field=FIELD)
    if not isinstance(text, str):
        raise HexRayError(f"{where}: 'text' is {type(text).__name__}, not a string", hint=hint, field=FIELD)
    _check_unicode(text, where, hint)
    return Document(name, text) if text.strip() else None


def _check_unicode(text: str, where: str, hint: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HexRayError(f"{where} is not valid Unicode text (a lone surrogate at character {exc.start})", hint=hint, field=FIELD) from None


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError and more for a bad file
        raise HexRayError(f"{{field}} {path} is not a readable Parquet file: {first_line(exc)}", hint=_HINT_FORMATS, field=FIELD) from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise HexRayError(f"{{field}} {path} has no 'text' column (its columns: {', '.join(names) or 'none'})", hint="name the column holding the documents 'text'", field=FIELD)
    row, any_row = 0, False
    try:
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    any_row = True
                    yield Document(f"{path}[{row}]", text)
                elif text is not None and not isinstance(text, str):
                    raise HexRayError(f"{{field}} {path}: column 'text' holds {type(text).__name__}, not strings", hint="store the documents as strings", field=FIELD)
                row += 1
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not any_row:
        raise _EmptyFile(f"{{field}} {path} has no text", hint="fill its 'text' column", field=FIELD)


def _is_hf_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_dataset(folder: Path) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - a damaged dataset surfaces as many kinds of error
        raise HexRayError(f"{{field}} {folder} is not a readable Hugging Face dataset: {first_line(exc)}", hint="save it with Dataset.save_to_disk", field=FIELD) from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise HexRayError(f"{{field}} {folder} holds no splits", field=FIELD)
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise HexRayError(f"{{field}} {folder} has no 'text' column (its columns: {', '.join(ds.column_names) or 'none'})", hint="name the column holding the documents 'text'", field=FIELD)
    row = 0
    for batch in ds.select_columns(["text"]).iter(batch_size=1024):
        for text in batch["text"]:
            if isinstance(text, str) and text.strip():
                yield Document(f"{folder}[{row}]", text)
            row += 1


# ---------------------------------------------------------------------------------------------
# the default corpus
# ---------------------------------------------------------------------------------------------


def _default_genres() -> tuple[str, ...]:
    return tuple(g for g in GENRES if _genre_files(g) or (g == "python-docs" and _pydoc_topics()))


def _genre_files(genre: str) -> list[Path]:
    """The files behind ``genre`` on this machine (empty when it is missing)."""
    if genre == "bible":
        found = next((Path(p) for p in BIBLE_PATHS if _has_magic(Path(p), b"EC02")), None)
        return [found] if found else []
    if genre == "jargon":
        for index in map(Path, JARGON_PATHS):
            data = _jargon_data(index)
            if index.is_file() and data is not None:
                return [index, data]
        return []
    if genre == "python-code":
        return _stdlib_files()
    return []


def _interleave(genres: list[tuple[str, Iterator[Document]]]) -> Iterator[Document]:
    """Documents from every genre, each time from the one that has given the fewest characters so far."""
    given = {name: 0 for name, _ in genres}
    live = dict(genres)
    while live:
        name = min(live, key=lambda g: given[g])  # ties: GENRES order (dicts keep insertion order)
        doc = next(live[name], None)
        if doc is None:
            del live[name]
            continue
        given[name] += len(doc.text)
        yield doc


# -- the King James Bible, from Debian's bible-kjv-text ------------------------------------

# The 66 books in the order the data file holds them (its own abbreviations are terse: Ge, 1Sm).
_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew",
    "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
    "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter",
    "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _has_magic(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _bible_documents() -> Iterator[Document]:
    """One document a chapter: ``Genesis 1`` and its verses, one a line, numbered."""
    path = _genre_files("bible")[0]
    try:
        text = _bible_text(path.read_bytes()).decode("latin-1")
    except (OSError, ValueError, IndexError, struct.error) as exc:
        raise HexRayError(f"the default corpus's Bible text {path} is damaged: {first_line(exc)}", hint="reinstall bible-kjv-text", field=FIELD) from None
    books: dict[str, str] = {}
    chapter: tuple[str, str] | None = None
    verses: list[str] = []
    for line in text.splitlines():
        m = _VERSE.match(line)
        if not m:
            continue  # the file's title line
        abbrev, number, verse, words = m.groups()
        if abbrev not in books:
            books[abbrev] = _BOOKS[len(books)] if len(books) < len(_BOOKS) else abbrev
        if chapter != (abbrev, number):
            if chapter and verses:
                yield _chapter(books[chapter[0]], chapter[1], verses)
            chapter, verses = (abbrev, number), []
        verses.append(f"{verse} {words.strip()}")
    if chapter and verses:
        yield _chapter(books[chapter[0]], chapter[1], verses)


def _chapter(book: str, number: str, verses: list[str]) -> Document:
    title = f"{book} {number}"
    return Document(f"bible-kjv/{title}", f"{title}\n\n" + "\n".join(verses) + "\n")


def _bible_text(raw: bytes) -> bytes:
    """The plain text of a bible-kjv data file: a header, then compress(1)-style LZW windows.

    Layout (Chip Chapin's Bible Retrieval System, tsl.h): magic ``EC02``, an 80-byte description,
    window size and count (big-endian uint32), the count+1 file offsets of the windows, then each
    window of the text compressed on its own.
    """
    wsize, wnum = struct.unpack(">II", raw[84:92])
    offsets = struct.unpack(f">{wnum + 1}I", raw[92 : 92 + 4 * (wnum + 1)])
    out = bytearray()
    for i in range(wnum):
        window = _unlzw(raw[offsets[i] : offsets[i + 1]])
        if len(window) != wsize and i != wnum - 1:
            raise ValueError(f"window {i} decompressed to {len(window)} bytes, not {wsize}")
        out += window
    return bytes(out)


def _unlzw(data: bytes, max_bits: int = 16) -> bytes:
    """Undo Unix compress(1)'s LZW (block mode, no header), as bible-kjv's compresslib.c does.

    Codes are little-endian bit fields read in groups of ``n_bits`` bytes (8 codes); when the code
    width grows, or after a CLEAR (256), the rest of the current group is skipped.
    """
    base = [bytes([i]) for i in range(256)] + [b""]  # 256 is CLEAR, never a string
    table = list(base)
    out = bytearray()
    pos, n_bits, maxcode, maxmax = 0, 9, 511, 1 << max_bits
    group = offset = size = 0
    clear, prev = False, None
    while True:
        if clear or offset >= size or len(table) > maxcode:
            if len(table) > maxcode:
                n_bits += 1
                maxcode = maxmax if n_bits == max_bits else (1 << n_bits) - 1
            if clear:
                n_bits, maxcode, clear = 9, 511, False
            piece = data[pos : pos + n_bits]
            pos += len(piece)
            if not piece:
                break
            group, offset, size = int.from_bytes(piece, "little"), 0, len(piece) * 8 - (n_bits - 1)
        code = (group >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        if prev is None:  # the first code (and the first after a CLEAR) is a plain byte
            prev = table[code]
            out += prev
        elif code == 256:
            table, clear, prev = list(base), True, None
        else:
            entry = table[code] if code < len(table) else prev + prev[:1]  # the KwKwK case
            out += entry
            if len(table) < maxmax:
                table.append(prev + entry[:1])
            prev = entry
    return bytes(out)


# -- the Jargon File, from Debian's dict-jargon (a dictd database) ---------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _jargon_data(index: Path) -> Path | None:
    for name in (index.with_suffix(".dict.dz"), index.with_suffix(".dict")):
        if name.is_file():
            return name
    return None


def _b64(text: str) -> int:
    """dictd's offsets and lengths: base-64 digits, most significant first."""
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def _jargon_documents() -> Iterator[Document]:
    """One document an entry, in the file's order; the database's own ``00-database-*`` entries skipped."""
    index, data = _genre_files("jargon")
    try:
        raw = gzip.decompress(data.read_bytes()) if data.suffix == ".dz" else data.read_bytes()
        spans = set()
        for line in index.read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and not fields[0].startswith("00-database") and not fields[0].startswith("00database"):
                spans.add((_b64(fields[1]), _b64(fields[2])))
    except (OSError, UnicodeDecodeError, KeyError, gzip.BadGzipFile, EOFError) as exc:
        raise HexRayError(f"the default corpus's Jargon File {index} is damaged: {first_line(exc)}", hint="reinstall dict-jargon", field=FIELD) from None
    for start, length in sorted(spans):  # several headwords can share one entry
        entry = raw[start : start + length].decode("utf-8", errors="replace").strip("\n")
        head, _, body = entry.partition("\n")
        if not head.strip() or not body.strip():
            continue
        body = re.sub(r"(?m)^ {1,4}", "", body)  # the file indents everything under the headword
        body = re.sub(r"(?m)^//\n", "", body).strip()  # an empty pronunciation
        yield Document(f"jargon/{head.strip()}", f"{head.strip()}\n{body}\n")


# -- Python's documentation and source -------------------------------------------------------


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data off
        return {}
    return topics


def _pydoc_documents() -> Iterator[Document]:
    for name, text in sorted(_pydoc_topics().items()):
        if text.strip():
            yield Document(f"python-docs/{name}", text.strip() + "\n")


def _stdlib_files() -> list[Path]:
    """A bounded, deterministic selection of the standard library's modules.

    Taken in the order of a hash of each path (so the selection spreads over the whole library,
    not its first letters) until :data:`CODE_CHARS` characters; tests, generated tables and
    bundled third-party code are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _CODE_SKIP and not d.startswith(".")]  # never walk into tests
        for name in names:
            if not name.endswith(".py") or name.startswith(("test_", ".")):
                continue
            path = Path(folder, name)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 0 < size <= CODE_FILE_CHARS:
                candidates.append((hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest(), path, size))
    chosen, total = [], 0
    for _, path, size in sorted(candidates):
        if total >= CODE_CHARS:
            break
        chosen.append(path)
        total += size
    return chosen


def _code_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a module that vanished or is not UTF-8 is simply not part of the corpus
        if text.strip():
            yield Document(f"python-stdlib/{path.relative_to(root).as_posix()}", text)


_GENRE_READERS: dict[str, Callable[[], Iterator[Document]]] = {
    "bible": _bible_documents,
    "jargon": _jargon_documents,
    "python-docs": _pydoc_documents,
    "python-code": _code_documents,
}
