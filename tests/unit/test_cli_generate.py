"""``hexray generate`` run in-process through ``hexray.cli.main`` on the tiny models.

``hexray.cli.load_model`` is monkeypatched to hand back an already-loaded tiny model (as in
test_cli.py). Expected tokens come from Hugging Face ``generate`` (``plain_greedy``) of a copy the bridge never wrapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import CliRun, assert_one_line_error, tree

import hexray.cli
import hexray.generation.tracer as tracer
from hexray.generation.tracer import plain_greedy

PROMPT = "The capital of France is"
PLAIN_PROMPT = "The cat sat on the"  # greedy text without "$" (see test_report_with_dollar_signs_in_the_text)
STEP_PROMPT = "Alice met Bob."
STEP_TEXT = " Step 1: Zyx went home. Step 2: Then Zyx slept."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPONENT_KEYS = {"name", "kind", "layer", "head", "neuron", "score"}


def json_lines(r: CliRun) -> list[dict]:
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.endswith("\n")
    lines = r.out.splitlines()
    return [json.loads(line, parse_constant=_reject) for line in lines]


def _reject(name):  # NaN / Infinity are not strict JSON
    raise AssertionError(f"non-strict JSON constant {name}")




# ---------------------------------------------------------------------------------------------
# --json
# ---------------------------------------------------------------------------------------------


def test_json_is_one_line_per_token_then_a_done_line(cli, tiny_model, tiny_hf_model):
    docs = json_lines(cli(tiny_model, "generate", "-p", PROMPT, "-n", "5", "--json"))
    assert len(docs) == 6
    tokens, done = docs[:5], docs[5]
    for i, doc in enumerate(tokens):
        assert {"index", "token", "id", "prob", "top", "watch"} <= set(doc)
        assert "done" not in doc
        assert doc["index"] == i
        assert doc["token"] == tiny_model.token_str(doc["id"])
        assert 0 < doc["prob"] <= 1
        assert len(doc["top"]) == 3  # the default --top-k
        for c in doc["top"]:
            assert set(c) == COMPONENT_KEYS
        assert doc["watch"] == {}
    assert done["done"] is True
    prompt_ids = tiny_model.encode(PROMPT)
    assert done["prompt_token_ids"] == prompt_ids
    assert len(done["generated_ids"]) == 5
    assert done["generated_ids"] == [d["id"] for d in tokens]
    assert done["generated_ids"] == plain_greedy(tiny_hf_model, prompt_ids, 5)
    assert done["text"] == tiny_model.tokenizer.decode(done["generated_ids"])
    assert isinstance(done["steps"], list)
    assert set(done["graph"]) == {"nodes", "edges", "threshold"}
    assert done["stop_reason"] == "max_new_tokens"
    assert done["granularity"] == "head"


def test_json_watch_with_threshold_zero_marks_every_token(cli, tiny_gpt2):
    docs = json_lines(cli(tiny_gpt2, "generate", "-p", PROMPT, "-n", "4", "--watch", "L0N1", "--watch-threshold", "0", "--json"))
    for doc in docs[:-1]:
        assert list(doc["watch"]) == ["L0N1"]
        assert isinstance(doc["watch"]["L0N1"], float)
        assert doc["crossed"] == ["L0N1"]


def test_json_watch_several_components(cli, tiny_llama):
    docs = json_lines(cli(tiny_llama, "generate", "-p", PROMPT, "-n", "3", "--watch", "L0N1, L1H3,MLP0", "--json"))
    for doc in docs[:-1]:
        assert list(doc["watch"]) == ["L0N1", "L1H3", "MLP0"]
        assert doc["crossed"] == []


def test_json_text_steps_and_graph(cli, tiny_gpt2):
    docs = json_lines(cli(tiny_gpt2, "generate", "-p", STEP_PROMPT, "--text", STEP_TEXT, "--graph-threshold", "0", "-k", "2", "--json"))
    done = docs[-1]
    n = len(tiny_gpt2.tokenizer(STEP_TEXT, add_special_tokens=False)["input_ids"])
    assert len(docs) == n + 1
    assert all(len(d["top"]) == 2 for d in docs[:-1])
    assert done["stop_reason"] == "text_end"
    assert done["text"] == STEP_TEXT
    assert done["rule"] == "step markers"
    assert [s["text"] for s in done["steps"]] == ["Step 1: Zyx went home.", "Step 2: Then Zyx slept."]
    assert [d["source"] for d in done["steps"][1]["depends"]] == ["prompt", "step 1"]
    assert done["graph"]["nodes"] == ["prompt", "step 1", "step 2"]
    assert {(e["source"], e["target"]) for e in done["graph"]["edges"]} == {("prompt", "step 1"), ("prompt", "step 2"), ("step 1", "step 2")}


# ---------------------------------------------------------------------------------------------
# console
# ---------------------------------------------------------------------------------------------


def test_console_lists_every_token_and_the_summary(cli, tiny_model, tiny_hf_model):
    r = cli(tiny_model, "generate", "-p", PROMPT, "-n", "4")
    assert r.code == 0, r.err
    assert r.err == ""
    ids = plain_greedy(tiny_hf_model, tiny_model.encode(PROMPT), 4)
    lines = r.out.splitlines()
    assert lines[0].startswith("Prompt ")
    token_lines = [line for line in lines if line[:5].strip().isdigit() and " p=" in line]
    assert len(token_lines) == 4
    for i, (line, token_id) in enumerate(zip(token_lines, ids)):
        assert line.startswith(f"{i:>4} {tiny_model.token_str(token_id)!r}")
    assert "4 tokens (--max-new-tokens reached); steps split by " in r.out
    assert "Chain-of-thought attribution" not in r.out


def test_cot_debug_adds_the_per_step_bars(cli, tiny_gpt2):
    plain = cli(tiny_gpt2, "generate", "-p", STEP_PROMPT, "--text", STEP_TEXT)
    bars = cli(tiny_gpt2, "generate", "-p", STEP_PROMPT, "--text", STEP_TEXT, "--cot-debug")
    for r in (plain, bars):
        assert r.code == 0, r.err
        assert "tokens (end of --text); steps split by step markers" in r.out
        assert "What each step drew on" in r.out
    assert "Chain-of-thought attribution over the generated steps" not in plain.out
    assert "Chain-of-thought attribution over the generated steps" in bars.out
    assert "Step 1: Step 1: Zyx went home." in bars.out
    assert "Step 2: Step 2: Then Zyx slept." in bars.out
    assert "█" in bars.out and "█" not in plain.out


def test_console_marks_crossed_watch_values(cli, tiny_gpt2):
    r = cli(tiny_gpt2, "generate", "-p", PROMPT, "-n", "3", "--watch", "L0N1", "--watch-threshold", "0")
    assert r.code == 0, r.err
    assert r.out.count("L0N1 fired") == 3


# ---------------------------------------------------------------------------------------------
# --report
# ---------------------------------------------------------------------------------------------


def test_report_folder(cli, tiny_gpt2, tmp_path):
    r = cli(tiny_gpt2, "generate", "-p", STEP_PROMPT, "--text", STEP_TEXT, "--report", tmp_path / "rep")
    assert r.code == 0, r.err
    folder = tmp_path / "rep"
    names = {p.name for p in folder.iterdir()}
    assert {"reasoning_graph.png", "reasoning_graph.svg", "index.html", "hexray.json"} <= names
    assert not any(n.startswith(".hexray-partial") for n in names)
    assert (folder / "reasoning_graph.png").read_bytes().startswith(PNG_MAGIC)
    assert b"<svg" in (folder / "reasoning_graph.svg").read_bytes()
    doc = json.loads((folder / "hexray.json").read_text())
    assert doc["done"] is True and doc["stop_reason"] == "text_end" and doc["text"] == STEP_TEXT
    assert "Report written to" in r.out


def test_report_with_json_lists_the_files(cli, tiny_gpt2, tmp_path):
    docs = json_lines(cli(tiny_gpt2, "generate", "-p", PLAIN_PROMPT, "-n", "2", "--report", tmp_path / "rep", "--json"))
    assert len(docs) == 3
    files = docs[-1]["report_files"]
    assert {Path(f).name for f in files} >= {"reasoning_graph.png", "reasoning_graph.svg", "index.html", "hexray.json"}
    assert all(Path(f).is_file() for f in files)


def test_report_with_dollar_signs_in_the_text(cli, tiny_gpt2, tmp_path):
    r = cli(tiny_gpt2, "generate", "-p", STEP_PROMPT, "--text", " Step 1: it costs $$5. Step 2: pay $x^$.", "--report", tmp_path / "rep")
    assert r.code == 0, r.err
    assert "$$5" in json.loads((tmp_path / "rep" / "hexray.json").read_text())["text"]


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def interrupt_on_third_token(monkeypatch):
    """The third token's tracing raises KeyboardInterrupt, as Ctrl-C during generation would."""
    real = tracer.TracedGeneration._record
    calls = []

    def record(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tracer.TracedGeneration, "_record", record)
    return calls


def test_ctrl_c_keeps_the_tokens_and_writes_the_report(cli, tiny_model, tiny_hf_model, tmp_path, interrupt_on_third_token):
    r = cli(tiny_model, "generate", "-p", PLAIN_PROMPT, "-n", "10", "--report", tmp_path / "rep")
    assert r.code in (0, 130), (r.out, r.err)  # 130 is the contract: see test_ctrl_c_exits_130
    assert r.err == ""
    doc = json.loads((tmp_path / "rep" / "hexray.json").read_text())
    assert doc["stop_reason"] == "interrupted"
    assert doc["generated_ids"] == plain_greedy(tiny_hf_model, tiny_model.encode(PLAIN_PROMPT), 2)
    assert "2 tokens (interrupted)" in r.out
    assert (tmp_path / "rep" / "index.html").is_file()
    assert (tmp_path / "rep" / "reasoning_graph.png").is_file()


def test_ctrl_c_with_json_still_prints_the_done_line(cli, tiny_gpt2, interrupt_on_third_token):
    r = cli(tiny_gpt2, "generate", "-p", PROMPT, "-n", "10", "--json")
    assert r.code in (0, 130), (r.out, r.err)  # 130 is the contract: see test_ctrl_c_exits_130
    docs = [json.loads(line) for line in r.out.splitlines()]
    assert len(docs) == 3
    assert docs[-1]["done"] is True and docs[-1]["stop_reason"] == "interrupted"
    assert docs[-1]["generated_ids"] == [docs[0]["id"], docs[1]["id"]]


@pytest.mark.parametrize("json_out", [False, True], ids=["console", "json"])
def test_ctrl_c_exits_130(cli, tiny_gpt2, tmp_path, interrupt_on_third_token, json_out):
    r = cli(tiny_gpt2, "generate", "-p", PLAIN_PROMPT, "-n", "10", "--report", tmp_path / "rep", *(["--json"] if json_out else []))
    assert (tmp_path / "rep" / "hexray.json").is_file()
    assert r.code == 130


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, nothing on stdout, nothing written
# ---------------------------------------------------------------------------------------------

BAD_INPUT = [
    ("zero-tokens", ["-p", PROMPT, "-n", "0"], "--max-new-tokens must be positive"),
    ("negative-tokens", ["-p", PROMPT, "-n", "-1"], "--max-new-tokens must be positive"),
    ("past-context", ["-p", PROMPT, "-n", "60"], "context of 64"),
    ("watch-layer-out-of-range", ["-p", PROMPT, "--watch", "L99H0"], "layer 99 is out of range"),
    ("watch-nonsense", ["-p", PROMPT, "--watch", "nonsense"], "unknown component 'nonsense'"),
    ("watch-embed", ["-p", PROMPT, "--watch", "embed"], "cannot watch embed"),
    ("empty-text", ["-p", PROMPT, "--text", ""], "--text is empty"),
    ("bad-granularity", ["-p", PROMPT, "--granularity", "bogus"], "unknown granularity 'bogus'"),
    ("negative-temperature", ["-p", PROMPT, "--temperature", "-1"], "--temperature must be >= 0"),
    ("top-k-zero", ["-p", PROMPT, "-k", "0"], "--top-k must be positive"),
    ("graph-threshold", ["-p", PROMPT, "--graph-threshold", "2"], "--graph-threshold must be between 0 and 1"),
    ("chat-without-template", ["-p", PROMPT, "--chat"], "has no chat template"),
    ("empty-prompt", ["-p", ""], "the prompt is empty"),
    ("missing-prompt", ["-n", "3"], "--prompt"),
]




@pytest.mark.parametrize("json_out", [False, True], ids=["console", "json"])
@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input(cli, tiny_gpt2, tmp_path, args, expected, json_out):
    (tmp_path / "a-file").write_text("keep me")
    before = tree(tmp_path)
    extra = ["--json"] if json_out else []
    r = cli(tiny_gpt2, "generate", "--report", tmp_path / "report" / "nested", *extra, *args)
    assert tree(tmp_path) == before, "a failed run must not write anything"
    assert_one_line_error(r, expected)


def test_report_into_a_file_is_an_error(cli, tiny_gpt2, tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    before = tree(tmp_path)
    r = cli(tiny_gpt2, "generate", "-p", PROMPT, "-n", "2", "--report", tmp_path / "a-file")
    assert_one_line_error(r, "is not a folder")
    assert tree(tmp_path) == before
