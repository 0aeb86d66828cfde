"""The corpus layer: every source format, the default corpus, packing invariants, the cache, and every user error."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from hexray.corpus import packs, sources
from hexray.corpus.packs import TokenPack, token_pack
from hexray.corpus.sources import Document, corpus_genres, documents
from hexray.errors import HexRayError

PARAGRAPHS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris. Paris is the capital of France.",
    "1 + 1 = 2\n2 + 2 = 4",
    "The cat sat on the mat. The dog ran in the park.",
]


def _names(source) -> list[str]:
    return [d.name for d in documents(source)]


def _error(source) -> HexRayError:
    with pytest.raises(HexRayError) as info:
        list(documents(source))
    err = info.value
    assert err.field == "corpus" and "\n" not in err.message
    return err


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _decode(model, ids) -> str:
    return model.tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------
# sources: files
# ---------------------------------------------------------------------------------------------


def test_text_and_markdown_files_are_one_document_each(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    md = tmp_path / "readme.md"
    md.write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    assert list(documents(txt)) == [Document(str(txt), "\n\n".join(PARAGRAPHS))]
    assert list(documents(str(md))) == [Document(str(md), "# Title\n\nSome *markdown* text.\n")]


def test_a_large_text_file_splits_at_blank_lines_into_named_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PART_CHARS", 100)
    paragraphs = [f"Paragraph {i}: " + "word " * (5 + 7 * (i % 3)) for i in range(12)]
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(documents(path))
    assert len(docs) > 2
    lines = text.splitlines()
    seen = []
    for doc in docs[:-1]:
        assert len(doc.text) >= 90  # parts are about PART_CHARS (less the blank lines around them) but the last
    for doc in docs:
        name, line = doc.name.rsplit(":", 1)
        assert name == str(path)
        assert lines[int(line) - 1].strip() == doc.text.splitlines()[0].strip()  # named after the line the part starts on
        seen += doc.text.split("\n\n")
    assert [p.strip() for p in seen] == [p.strip() for p in paragraphs]  # whole paragraphs, all of them, in order


def test_jsonl_rows_give_text_or_chats_named_by_line(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [
        {"text": PARAGRAPHS[0], "id": 7},
        "",
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"text": "   "},  # blank rows are skipped
        {"text": PARAGRAPHS[1]},
    ])
    docs = list(documents(path))
    assert [d.name for d in docs] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert docs[0] == Document(f"{path}:1", PARAGRAPHS[0])
    assert docs[1].messages == (("user", "Hi there"), ("assistant", "Hello!"))
    assert docs[1].text == "user: Hi there\nassistant: Hello!"
    assert docs[2].text == PARAGRAPHS[1] and docs[2].messages is None


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": [PARAGRAPHS[0], None, PARAGRAPHS[2]]}), path)
    docs = list(documents(path))
    assert docs == [Document(f"{path}[0]", PARAGRAPHS[0]), Document(f"{path}[2]", PARAGRAPHS[2])]


def test_saved_hugging_face_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": PARAGRAPHS[:3], "label": [0, 1, 0]}).save_to_disk(str(single))
    assert [d.text for d in documents(single)] == PARAGRAPHS[:3]
    assert _names(single) == [f"{single}[{i}]" for i in range(3)]

    both = tmp_path / "dsd"
    datasets.DatasetDict({
        "test": datasets.Dataset.from_dict({"text": ["held out"]}),
        "train": datasets.Dataset.from_dict({"text": PARAGRAPHS[2:]}),
    }).save_to_disk(str(both))
    assert [d.text for d in documents(both)] == PARAGRAPHS[2:]  # the train split

    only = tmp_path / "dsv"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["just this"]})}).save_to_disk(str(only))
    assert [d.text for d in documents(only)] == ["just this"]  # no train split: the first


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed", encoding="utf-8")
    (tmp_path / "a.md").write_text("alpha", encoding="utf-8")
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "row one"}, {"text": "row two"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "b" / "d.parquet")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")  # skipped inside a folder
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a corpus file
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("never read", encoding="utf-8")
    assert [d.text for d in documents(tmp_path)] == ["alpha", "from parquet", "zed", "row one", "row two"]


# ---------------------------------------------------------------------------------------------
# sources: errors
# ---------------------------------------------------------------------------------------------


def test_missing_path_fails_at_once(tmp_path):
    with pytest.raises(HexRayError, match="no such file or folder") as info:
        documents(tmp_path / "nope.txt")  # before any iteration
    assert "nope.txt" in info.value.message and info.value.field == "corpus"


@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", "  \n\n", "is empty"),
    ("empty.jsonl", "\n\n", "has no text"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n', "line 2 is not valid JSON"),
    ("list.jsonl", '{"text": "fine"}\n\n[1, 2]\n', "line 3 is not a JSON object"),
    ("notext.jsonl", '{"body": "no text field"}\n', "line 1 has no 'text' field"),
    ("number.jsonl", '{"text": 12}\n', "line 1: 'text' is int, not a string"),
    ("chat.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: 'messages' must be a list"),
    ("surrogate.jsonl", '{"text": "bad \\ud800 char"}\n', "line 1 is not valid Unicode text"),
    ("data.csv", "text\nhello\n", "unsupported file type '.csv'"),
])
def test_file_errors_name_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = _error(path)
    assert expected in err.message and name in err.message


def test_undecodable_file_is_an_error(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "cannot be read: it is not UTF-8 text" in _error(path).message


def test_parquet_and_dataset_without_text_column(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), path)
    assert "has no 'text' column (its columns: body, id)" in _error(path).message
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(folder))
    assert "has no 'text' column (its columns: body)" in _error(folder).message
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert "is not a readable Parquet file" in _error(broken).message


def test_empty_folders_are_errors(tmp_path):
    (tmp_path / "nothing").mkdir()
    assert "holds no .txt, .md, .jsonl or .parquet files" in _error(tmp_path / "nothing").message
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n", encoding="utf-8")
    assert "has no text" in _error(tmp_path / "blank").message


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl", ['{"text": "ok"}', "{oops"])
    with pytest.raises(HexRayError, match=r"b\.jsonl line 2 is not valid JSON"):
        list(documents(tmp_path))


# ---------------------------------------------------------------------------------------------
# sources: the default corpus
# ---------------------------------------------------------------------------------------------


def test_default_corpus_interleaves_every_genre_deterministically():
    genres = corpus_genres()
    assert {"python-docs", "python-code"} <= set(genres)
    prefixes = {"bible": "bible-kjv/", "jargon": "jargon/", "python-docs": "python-docs/", "python-code": "python-stdlib/"}
    first = [d for _, d in zip(range(40), documents())]
    assert {g for g in genres if any(d.name.startswith(prefixes[g]) for d in first)} == set(genres)  # a short prefix has them all
    assert [d.name for d in first] == [d.name for _, d in zip(range(40), documents("default"))]
    assert all(d.text.strip() for d in first)
    assert len({d.name for d in first}) == len(first)


def test_default_corpus_falls_back_to_python_material(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "BIBLE_PATHS", (str(tmp_path / "bible.data"),))
    monkeypatch.setattr(sources, "JARGON_PATHS", (str(tmp_path / "jargon.index"),))
    assert corpus_genres() == ("python-docs", "python-code")
    names = [d.name for _, d in zip(range(20), documents(None))]
    assert any(n.startswith("python-docs/") for n in names) and any(n.startswith("python-stdlib/") for n in names)
    assert not any(n.startswith(("bible", "jargon")) for n in names)


def test_default_corpus_has_millions_of_characters():
    total = sum(len(d.text) for d in documents())
    assert total > (8_000_000 if len(corpus_genres()) == 4 else 4_000_000)  # ~3.5 characters a token: 2M+ tokens with the Debian texts


def _lzw9(data: bytes) -> list[int]:
    """compress(1)'s LZW codes for ``data`` (small enough for 9-bit codes throughout)."""
    table = {bytes([i]): i for i in range(256)}
    codes, w = [], b""
    for byte in data:
        c = bytes([byte])
        if w + c in table:
            w += c
            continue
        codes.append(table[w])
        table[w + c] = 257 + len(table) - 256
        w = c
    codes.append(table[w])
    assert len(table) + 1 <= 511
    return codes


def _pack9(codes: list[int]) -> bytes:
    bits = sum(c << (9 * i) for i, c in enumerate(codes))
    return bits.to_bytes((9 * len(codes) + 7) // 8, "little")


def test_lzw_decoder_undoes_compress():
    text = b"Ge1:1 In the beginning God created the heaven and the earth. aaaaaaaaaaaaaaaa abababababab\n"  # KwKwK cases too
    assert sources._unlzw(_pack9(_lzw9(text))) == text
    # after a CLEAR (256) the table starts over and the rest of the 9-byte code group is skipped
    first = _pack9(_lzw9(text) + [256])
    first += b"\0" * (-len(first) % 9)
    assert sources._unlzw(first + _pack9(_lzw9(b"and again, and again"))) == text + b"and again, and again"


def test_bible_data_file_is_parsed_into_chapters(tmp_path, monkeypatch):
    text = (b"Holy Bible, Authorized (King James) Version.  Textfile 930105.\n"
            b"Ge1:1 In the beginning God created the heaven and the earth.\n"
            b"Ge1:2 And the earth was without form, and void.\n"
            b"Ge2:1 Thus the heavens and the earth were finished.\n"
            b"Exo1:1 Now these are the names of the children of Israel.\n")
    wsize = 64
    windows = [_pack9(_lzw9(text[i : i + wsize])) for i in range(0, len(text), wsize)]
    header = b"EC02" + b"Compressed Data File".ljust(80, b"\0") + struct.pack(">II", wsize, len(windows))
    start = len(header) + 4 * (len(windows) + 1)
    offsets = [start]
    for w in windows:
        offsets.append(offsets[-1] + len(w))
    path = tmp_path / "bible.data"
    path.write_bytes(header + struct.pack(f">{len(offsets)}I", *offsets) + b"".join(windows))
    monkeypatch.setattr(sources, "BIBLE_PATHS", (str(tmp_path / "missing"), str(path)))
    assert "bible" in corpus_genres()
    docs = list(sources._bible_documents())
    assert [d.name for d in docs] == ["bible-kjv/Genesis 1", "bible-kjv/Genesis 2", "bible-kjv/Exodus 1"]
    assert docs[0].text == "Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n2 And the earth was without form, and void.\n"
    path.write_bytes(path.read_bytes()[: start + 10])  # a truncated file is reported, not a traceback
    with pytest.raises(HexRayError, match="is damaged"):
        list(sources._bible_documents())


def test_jargon_dictd_database_is_parsed_into_entries(tmp_path, monkeypatch):
    entries = [
        "00-database-info\nThe Jargon File (version 4.4.7)\n",
        "foo\n /foo/, n.\n\n    [very common] Used very generally as a sample name.\n    See {bar}.\n",
        "kluge\n //\n\n    A clever programming trick.\n",
    ]
    raw, spans = b"", []
    for e in entries:
        spans.append((len(raw), len(e.encode())))
        raw += e.encode()
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n: int) -> str:
        out = ""
        while True:
            out, n = digits[n % 64] + out, n // 64
            if not n:
                return out

    index = ["00-database-info", "foo", "foobar", "kluge"]  # foobar: a second headword for foo's entry
    where = [spans[0], spans[1], spans[1], spans[2]]
    (tmp_path / "jargon.index").write_text("".join(f"{h}\t{b64(s)}\t{b64(n)}\n" for h, (s, n) in zip(index, where)), encoding="utf-8")
    (tmp_path / "jargon.dict.dz").write_bytes(gzip.compress(raw))
    monkeypatch.setattr(sources, "JARGON_PATHS", (str(tmp_path / "jargon.index"),))
    docs = list(sources._jargon_documents())
    assert [d.name for d in docs] == ["jargon/foo", "jargon/kluge"]
    assert docs[0].text == "foo\n/foo/, n.\n\n[very common] Used very generally as a sample name.\nSee {bar}.\n"
    assert docs[1].text == "kluge\nA clever programming trick.\n"


@pytest.mark.skipif(not Path("/usr/lib/bible.data").is_file() or not Path("/usr/share/dictd/jargon.index").is_file(),
                    reason="Debian's bible-kjv-text and dict-jargon are not installed (make setup installs them)")
def test_installed_debian_texts_parse_completely():
    bible = list(sources._bible_documents())
    assert len(bible) == 1189 and bible[0].name == "bible-kjv/Genesis 1" and bible[-1].name == "bible-kjv/Revelation 22"
    assert bible[0].text.startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n")
    assert bible[-1].text.rstrip().endswith("21 The grace of our Lord Jesus Christ be with you all. Amen.")
    jargon = list(sources._jargon_documents())
    assert len(jargon) > 2000 and not any("00-database" in d.name for d in jargon)
    assert any(d.name == "jargon//dev/null" and "bit bucket" in d.text for d in jargon)


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


def _corpus(tmp_path: Path, texts: list[str] | None = None) -> Path:
    return _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in (texts or PARAGRAPHS * 3)])


def test_pack_shapes_and_what_is_counted(tiny_model, tmp_path):
    pack = token_pack(tiny_model, _corpus(tmp_path), context_size=16)
    tok = tiny_model.tokenizer
    assert pack.tokens.shape == pack.counted.shape == pack.doc.shape == (pack.n_contexts, 16)
    assert (pack.tokens.dtype, pack.counted.dtype, pack.doc.dtype) == (torch.int64, torch.bool, torch.int32)
    assert pack.context_size == 16 and len(pack) == pack.n_contexts > 1
    assert (pack.tokens[:, 0] == tok.bos_token_id).all() and not pack.counted[:, 0].any()  # every context starts with BOS
    special = torch.tensor(tok.all_special_ids + [tok.eos_token_id])
    assert not torch.isin(pack.tokens[pack.counted], special).any()  # BOS/EOS never counted
    assert ((pack.doc >= 0) == pack.counted).all()
    # separators: every document's last token is followed by EOS
    flat_doc, flat_tok = pack.doc[:, 1:].reshape(-1), pack.tokens[:, 1:].reshape(-1)
    ends = torch.nonzero((flat_doc[:-1] >= 0) & (flat_doc[1:] != flat_doc[:-1])).flatten()
    assert len(ends) >= len(pack.documents) - 1
    assert (flat_tok[ends + 1] == tok.eos_token_id).all()
    assert pack.source == str(tmp_path / "corpus.jsonl") and len(pack.key) == 24


def test_counted_tokens_decode_back_to_the_documents_in_order(tiny_model, tmp_path):
    texts = [" ".join(PARAGRAPHS), PARAGRAPHS[1], "Mary gave John a book, and John gave Mary a pen. " * 3]
    path = _corpus(tmp_path, texts)
    pack = token_pack(tiny_model, path, context_size=12)  # small contexts: documents cross context boundaries
    assert pack.documents == tuple(_names(path))
    order = pack.doc[pack.counted].tolist()  # row-major: the order the model reads them
    assert order == sorted(order)
    for i, text in enumerate(texts):
        assert _decode(tiny_model, pack.tokens[pack.doc == i]) == text
    # a document continued in the next context: that context starts with BOS, then the same document
    crossing = [r for r in range(1, pack.n_contexts) if pack.doc[r, 1] >= 0 and pack.doc[r, 1] == pack.doc[r - 1, -1]]
    assert crossing
    assert pack.document_name(crossing[0], 1) == pack.documents[int(pack.doc[crossing[0], 1])]
    assert pack.document_name(0, 0) is None


def test_max_tokens_is_exact_and_the_last_context_is_padded(tiny_model, tmp_path):
    path = _corpus(tmp_path)
    full = token_pack(tiny_model, path, context_size=16)
    total = full.n_tokens
    assert not full.counted[-1, -1] or total % 15 == 0  # padding at the end is not counted
    cut = token_pack(tiny_model, path, context_size=16, max_tokens=37)
    assert cut.n_tokens == 37 and cut.n_contexts == 3  # 15 counted tokens a context at most
    assert torch.equal(cut.tokens[cut.counted], full.tokens[full.counted][:37])  # a prefix of the corpus
    more = token_pack(tiny_model, path, context_size=16, max_tokens=total + 1000)
    assert more.n_tokens == total


def test_special_tokens_inside_documents_are_not_counted(tiny_model, tmp_path):
    bos = tiny_model.tokenizer.bos_token  # "<|endoftext|>" written into a document's text
    pack = token_pack(tiny_model, _corpus(tmp_path, [f"Mary went home.{bos}John went home."]), context_size=32)
    assert (pack.tokens == tiny_model.tokenizer.bos_token_id).sum() >= 3  # BOS, the literal one, the separator
    assert _decode(tiny_model, pack.tokens[pack.counted]) == "Mary went home.John went home."


def test_chat_template_and_jsonl_messages(tiny_model, tmp_path, monkeypatch):
    tok = tiny_model.tokenizer
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi Mary"}, {"role": "assistant", "content": "Hi John"}]}])
    plain = token_pack(tiny_model, chat, context_size=32)  # no template: "role: content" lines
    assert _decode(tiny_model, plain.tokens[plain.counted]) == "user: Hi Mary\nassistant: Hi John"
    with pytest.raises(HexRayError, match="has no chat template") as info:
        token_pack(tiny_model, chat, context_size=32, chat_template=True)
    assert info.value.field == "chat_template"

    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}", raising=False)
    templated = token_pack(tiny_model, chat, context_size=32)  # messages always use the template when there is one
    assert _decode(tiny_model, templated.tokens[templated.counted]) == "user\nHi Maryassistant\nHi John"  # markers not counted
    assert _decode(tiny_model, templated.tokens[0]).startswith("<|endoftext|><|endoftext|>user\nHi Mary")
    text = _corpus(tmp_path, ["The cat sat on the mat."])
    as_chat = token_pack(tiny_model, text, context_size=32, chat_template=True)
    assert _decode(tiny_model, as_chat.tokens[as_chat.counted]) == "user\nThe cat sat on the mat."
    assert as_chat.key != token_pack(tiny_model, text, context_size=32).key


def test_progress_reports_counted_tokens(tiny_model, tmp_path):
    calls = []
    pack = token_pack(tiny_model, _corpus(tmp_path), context_size=16, max_tokens=50, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (50, 50) and pack.n_tokens == 50
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_default_corpus_packs_several_genres(tiny_model):
    pack = token_pack(tiny_model, None, context_size=64, max_tokens=6000)
    assert pack.n_tokens == 6000 and pack.source == "default"
    genres = {name.split("/")[0] for name in pack.documents}
    assert len(genres) >= 2 and ("python-docs" in genres or "python-stdlib" in genres)
    assert token_pack(tiny_model, "default", context_size=64, max_tokens=6000).key == pack.key


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def test_second_call_loads_from_the_cache(tiny_model, tmp_path, monkeypatch):
    path = _corpus(tmp_path)
    first = token_pack(tiny_model, path, context_size=16)
    from hexray.models.loading import cache_root

    stored = cache_root() / "corpus" / f"{first.key}.safetensors"
    assert stored.is_file() and stored.with_suffix(".json").is_file()
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".partial-")]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(packs, "_build", refuse)
    second = token_pack(tiny_model, path, context_size=16)
    assert second.key == first.key and second.documents == first.documents
    assert torch.equal(second.tokens, first.tokens) and torch.equal(second.counted, first.counted) and torch.equal(second.doc, first.doc)
    with pytest.raises(AssertionError, match="tokenized again"):  # another option is another pack
        token_pack(tiny_model, path, context_size=17)


def test_a_changed_file_changes_the_key(tiny_model, tmp_path):
    path = _corpus(tmp_path)
    before = token_pack(tiny_model, path, context_size=16)
    _corpus(tmp_path, PARAGRAPHS[:2])
    os.utime(path, ns=(1, 1))  # mtime too, even where it would not tick
    after = token_pack(tiny_model, path, context_size=16)
    assert after.key != before.key and after.n_tokens < before.n_tokens
    assert _decode(tiny_model, after.tokens[after.doc == 1]) == PARAGRAPHS[1]


def test_a_damaged_cache_file_is_rebuilt(tiny_model, tmp_path):
    path = _corpus(tmp_path)
    first = token_pack(tiny_model, path, context_size=16)
    from hexray.models.loading import cache_root

    stored = cache_root() / "corpus" / f"{first.key}.safetensors"
    stored.write_bytes(b"garbage")
    again = token_pack(tiny_model, path, context_size=16)
    assert torch.equal(again.tokens, first.tokens)
    assert stored.stat().st_size > 100  # written again


# ---------------------------------------------------------------------------------------------
# slicing and splitting
# ---------------------------------------------------------------------------------------------


def test_split_holds_out_the_last_contexts(tiny_model, tmp_path):
    pack = token_pack(tiny_model, _corpus(tmp_path), context_size=8)
    n = pack.n_contexts
    train, held = pack.split(0.25)
    assert held.n_contexts == round(n * 0.25) and train.n_contexts + held.n_contexts == n
    assert torch.equal(torch.cat([train.tokens, held.tokens]), pack.tokens)
    assert torch.equal(held.doc, pack.doc[-held.n_contexts :]) and held.documents == pack.documents
    train2, held2 = pack.split(3)
    assert held2.n_contexts == 3 and torch.equal(held2.tokens, pack.tokens[-3:])
    assert pack.split(0.25)[1].key == held.key  # deterministic
    for bad in (0, n, 1.0, 0.0, -1, "a"):
        with pytest.raises(HexRayError):
            pack.split(bad)


def test_slices_and_batches(tiny_model, tmp_path):
    pack = token_pack(tiny_model, _corpus(tmp_path), context_size=8)
    assert isinstance(pack[2:5], TokenPack) and torch.equal(pack[2:5].tokens, pack.tokens[2:5])
    assert torch.equal(pack[-1].tokens, pack.tokens[-1:])
    batches = list(pack.batches(4))
    assert [b.n_contexts for b in batches] == [4] * (pack.n_contexts // 4) + ([pack.n_contexts % 4] if pack.n_contexts % 4 else [])
    assert torch.equal(torch.cat([b.tokens for b in batches]), pack.tokens)
    assert sum(b.n_tokens for b in batches) == pack.n_tokens
    with pytest.raises(IndexError):
        pack[pack.n_contexts]


# ---------------------------------------------------------------------------------------------
# option errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, field", [
    ({"context_size": 10_000}, "context_size"),
    ({"context_size": 1}, "context_size"),
    ({"context_size": 16, "max_tokens": 0}, "max_tokens"),
])
def test_bad_options_are_errors(tiny_model, tmp_path, options, field):
    with pytest.raises(HexRayError) as info:
        token_pack(tiny_model, _corpus(tmp_path), **options)
    assert info.value.field == field
    if field == "context_size":
        assert str(tiny_model.spec.n_ctx) in info.value.message


def test_pack_source_errors_surface_as_hexray_errors(tiny_model, tmp_path):
    with pytest.raises(HexRayError, match="no such file"):
        token_pack(tiny_model, tmp_path / "missing.jsonl", context_size=16)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(HexRayError, match="line 2 is not valid JSON"):
        token_pack(tiny_model, tmp_path / "bad.jsonl", context_size=16)
