"""Prompt presets (``hexray.presets``) and the CLI's ``--preset NAME`` / ``hexray presets``, on the tiny models.

The tiny models cannot do the tasks; these tests check the plumbing: a preset fills the prompt,
target and contrast (and ablate's components), an explicit flag wins, a bad name is one line.
"""

from __future__ import annotations

import json

import pytest

from hexray.errors import HexRayError
from hexray.presets import PRESETS, Preset, preset
from tests.helpers import assert_one_line_error

NAMES = ["ioi", "induction", "factual", "greater-than", "duplicate-token", "arithmetic"]
IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FRANCE = "The capital of France is"


def run_json(cli, model, *args) -> dict:
    r = cli(model, *args, "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.count("\n") == 1, "stdout must be one JSON line"
    return json.loads(r.out)


def expected_of(name: str) -> dict:
    return {"name": name, "expected": preset(name).expected}


# ---------------------------------------------------------------------------------------------
# the table itself
# ---------------------------------------------------------------------------------------------


def test_presets_in_order():
    assert [p.name for p in PRESETS] == NAMES


def test_ioi_preset_values():
    ioi = preset("ioi")
    assert ioi == Preset(
        name="ioi", title=ioi.title, prompt=IOI, target=" Mary", contrast=" John", clean=IOI, corrupt=IOI_CORRUPT,
        components="L23H3, L29H1, L20H0", expected=ioi.expected,
    )


@pytest.mark.parametrize("p", PRESETS, ids=lambda p: p.name)
def test_every_preset_is_complete(p):
    assert p.title and p.prompt and p.clean and p.corrupt
    assert p.prompt == p.clean
    assert p.corrupt != p.clean
    assert p.expected and "\n" not in p.expected, "expected is one line"
    assert p.target is None or p.target != p.contrast


def test_presets_are_frozen():
    with pytest.raises(AttributeError):
        preset("ioi").prompt = "x"


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(HexRayError) as caught:
        preset("iot")
    assert caught.value.message == "unknown preset 'iot'"
    assert caught.value.field == "preset"
    assert caught.value.hint == "use ioi, induction, factual, greater-than, duplicate-token or arithmetic"


# ---------------------------------------------------------------------------------------------
# --preset fills what the user left out
# ---------------------------------------------------------------------------------------------


def test_trace_preset_fills_prompt_target_and_contrast(cli, tiny_model):
    doc = run_json(cli, tiny_model, "trace", "--preset", "ioi")
    assert doc["prompt"] == IOI
    assert doc["tokens"] == tiny_model.token_strs(tiny_model.encode(IOI))
    assert doc["target"]["token"] == " Mary"
    assert doc["contrast"]["token"] == " John"
    assert doc["preset"] == expected_of("ioi")


def test_bare_preset_is_trace(cli, tiny_model):
    """``hexray --preset ioi`` is ``hexray trace --preset ioi``, as with --prompt."""
    doc = run_json(cli, tiny_model, "--preset", "ioi")
    assert (doc["prompt"], doc["target"]["token"]) == (IOI, " Mary")


def test_trace_explicit_flags_win(cli, tiny_model):
    doc = run_json(cli, tiny_model, "trace", "--preset", "ioi", "--prompt", FRANCE, "--target", " the")
    assert doc["prompt"] == FRANCE
    assert doc["target"]["token"] == " the"
    assert doc["contrast"]["token"] == " John", "a field the user left out still comes from the preset"
    assert doc["preset"] == expected_of("ioi")


def test_trace_without_preset_has_no_preset_key(cli, tiny_model):
    doc = run_json(cli, tiny_model, "trace", "--prompt", IOI)
    assert "preset" not in doc
    assert doc["contrast"] is None


def test_trace_console_prints_the_expected_circuit_once(cli, tiny_model):
    r = cli(tiny_model, "trace", "--preset", "ioi")
    assert r.code == 0, r.err
    lines = [line for line in r.out.splitlines() if "Expected for the ioi preset" in line]
    assert lines == [f"Expected for the ioi preset: {preset('ioi').expected}"]


def test_trace_console_without_preset_prints_no_expectation(cli, tiny_model):
    r = cli(tiny_model, "trace", "--prompt", IOI)
    assert r.code == 0, r.err
    assert "Expected for the" not in r.out


def test_patch_preset_fills_clean_corrupt_target_and_contrast(cli, tiny_model):
    doc = run_json(cli, tiny_model, "patch", "--preset", "ioi")
    assert (doc["clean_prompt"], doc["corrupt_prompt"]) == (IOI, IOI_CORRUPT)
    assert (doc["target"]["token"], doc["contrast"]["token"]) == (" Mary", " John")
    assert doc["preset"] == expected_of("ioi")


def test_patch_explicit_flags_win(cli, tiny_model):
    corrupt = "When John and Mary went to the store, Mary gave a drink to"
    doc = run_json(cli, tiny_model, "patch", "--preset", "ioi", "--corrupt", corrupt, "--target", " John", "--contrast", " Mary", "--last-position")
    assert (doc["clean_prompt"], doc["corrupt_prompt"]) == (IOI, corrupt)
    assert (doc["target"]["token"], doc["contrast"]["token"]) == (" John", " Mary")


def test_ablate_preset_fills_the_components(cli, tiny_model):
    """The IOI preset's heads live in layers 20-29: on a 2-layer model the filled-in L23H3 is out of range."""
    r = cli(tiny_model, "ablate", "--preset", "ioi")
    assert_one_line_error(r, "L23H3")


def test_ablate_explicit_components_win(cli, tiny_model):
    doc = run_json(cli, tiny_model, "ablate", "--preset", "ioi", "-c", "L0H1,MLP1")
    assert [c["name"] for c in doc["components"]] == ["L0H1", "MLP1"]
    assert doc["prompt"] == IOI
    assert (doc["before"]["target"]["token"], doc["before"]["contrast"]["token"]) == (" Mary", " John")
    assert doc["preset"] == expected_of("ioi")


def test_ablate_preset_without_components_asks_for_them(cli):
    r = cli("no-load", "ablate", "--preset", "induction")
    assert_one_line_error(r, "missing option --components (the induction preset names none")


def test_ablate_without_components_or_preset(cli):
    assert_one_line_error(cli("no-load", "ablate", "--prompt", IOI), "missing option --components")


def test_heads_preset_fills_the_prompt(cli, tiny_model):
    dup = preset("duplicate-token")
    doc = run_json(cli, tiny_model, "heads", "--preset", "duplicate-token")
    assert doc["prompt"] == dup.prompt
    assert doc["preset"] == expected_of("duplicate-token")
    explicit = run_json(cli, tiny_model, "heads", "--preset", "duplicate-token", "--prompt", FRANCE)
    assert explicit["prompt"] == FRANCE


def test_generate_preset_fills_the_prompt(cli, tiny_model):
    r = cli(tiny_model, "generate", "--preset", "factual", "-n", "2", "--json")
    assert r.code == 0, r.err
    done = json.loads(r.out.splitlines()[-1])
    assert done["done"] is True
    assert done["prompt_token_ids"] == tiny_model.encode(FRANCE)
    assert done["preset"] == expected_of("factual")


def test_generate_console_prints_the_expected_circuit(cli, tiny_model):
    r = cli(tiny_model, "generate", "--preset", "factual", "-n", "2")
    assert r.code == 0, r.err
    assert f"Expected for the factual preset: {preset('factual').expected}" in r.out.splitlines()


def test_generate_needs_a_prompt_or_a_preset(cli):
    assert_one_line_error(cli("no-load", "generate", "-n", "2"), "missing option --prompt (or --preset NAME")


def test_trace_needs_a_prompt_or_a_preset(cli):
    assert_one_line_error(cli("no-load", "trace", "--granularity", "head"), "or --preset NAME")


# ---------------------------------------------------------------------------------------------
# mistakes: one line, exit 2, before any model is loaded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["trace", "patch", "ablate", "heads", "generate"])
def test_unknown_preset_is_one_line(cli, command):
    r = cli("no-load", command, "--preset", "nope")
    assert_one_line_error(r, "unknown preset 'nope' (use ioi, induction, factual, greater-than, duplicate-token or arithmetic)")


def test_unknown_preset_even_with_explicit_fields(cli):
    r = cli("no-load", "trace", "--preset", "nope", "--prompt", IOI, "--target", " Mary")
    assert_one_line_error(r, "unknown preset 'nope'")


@pytest.mark.parametrize("command", ["trace", "patch", "ablate"])
def test_preset_with_a_prompt_file_is_one_line(cli, tmp_path, command):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": IOI, "clean": IOI, "corrupt": IOI_CORRUPT}) + "\n")
    r = cli("no-load", command, "--preset", "ioi", "--prompts", rows, *(["-c", "L0H1"] if command == "ablate" else []))
    assert_one_line_error(r, "give --preset or --prompts, not both")


# ---------------------------------------------------------------------------------------------
# hexray presets
# ---------------------------------------------------------------------------------------------


def test_presets_json_lists_all_six(cli):
    doc = run_json(cli, "no-load", "presets")
    assert [p["name"] for p in doc["presets"]] == NAMES
    ioi = doc["presets"][0]
    assert ioi == {
        "name": "ioi", "title": preset("ioi").title, "prompt": IOI, "target": " Mary", "contrast": " John",
        "clean": IOI, "corrupt": IOI_CORRUPT, "components": "L23H3, L29H1, L20H0", "expected": preset("ioi").expected,
    }
    assert doc["presets"][4]["contrast"] is None


def test_presets_table(cli):
    r = cli("no-load", "presets")
    assert r.code == 0, r.err
    assert r.err == ""
    first_cells = [line.split("│")[1].strip() for line in r.out.splitlines() if line.startswith("│") and line.split("│")[1].strip()]
    assert first_cells == NAMES
    assert "'The capital of France is'" in r.out
