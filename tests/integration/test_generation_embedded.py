"""Traced generation on the embedded SmolLM2-135M-Instruct (``hexray.load_model()``).

Runs on CPU in well under a minute: one 16-token generation (shared by two tests), its HF
``generate`` reference, one 23-token teacher-forced text, and one single-token chat run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hexray
import hexray.cli
from hexray.generation.tracer import GenerationOptions, TracedGeneration, plain_greedy

pytestmark = pytest.mark.integration

FRANCE = "The capital of France is"
N_NEW = 16

STEP_PROMPT = "Write two steps."
# Step 2 repeats a made-up name from step 1: copying it can only come from step 1's tokens.
NAME = " Zorbix"
STEP_TEXT = " Step 1: The new pet is called Zorbix. Step 2: Every morning, Zorbix"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module. These are many tiny single-token forward passes: on a
    small, busy machine (2 cores, other test runs alongside) OpenMP's spinning threads made them
    ~10x slower than one thread; on an idle machine one thread costs little here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smol():
    return hexray.load_model()


@pytest.fixture(scope="module")
def untouched(smol):
    """The same weights loaded by plain transformers, never wrapped by the bridge (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol.checkpoint, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def france(smol):
    run = TracedGeneration(smol, FRANCE, GenerationOptions(max_new_tokens=N_NEW, stop_at_eos=False))
    records = list(run)
    return run, records, run.result()


@pytest.fixture(scope="module")
def named_steps(smol):
    run = TracedGeneration(smol, STEP_PROMPT, GenerationOptions(text=STEP_TEXT, graph_threshold=0.0))
    records = list(run)
    return run, records, run.result()


def test_traced_greedy_equals_hf_generate(untouched, france):
    run, records, result = france
    reference = plain_greedy(untouched, run.prompt_ids, N_NEW)
    assert len(reference) == N_NEW  # HF generate did not stop early, so all 16 tokens are compared
    assert list(result.generated_ids) == reference
    assert records[0].token == " Paris"
    assert records[0].prob > 0.3
    assert result.text.startswith(" Paris")


def test_every_token_logit_is_conserved(france):
    _, records, result = france
    heads = [j for j, c in enumerate(result.components) if c.kind == "head"]
    assert len(heads) == 30 * 9
    for i, r in enumerate(records):
        assert float(result.scores[i].sum(dtype=np.float64)) == pytest.approx(r.logit, abs=1e-3)
        assert r.reconstruction_error < 1e-3
        # what the heads moved from each source position adds up to the heads' own attribution
        assert float(r.source_dla.sum(dtype=np.float64)) == pytest.approx(float(result.scores[i, heads].sum(dtype=np.float64)), abs=1e-3)
        assert float(r.source_attention.sum()) == pytest.approx(1.0, abs=1e-4)


def _occurrences(ids, piece):
    return [i for i in range(len(ids) - len(piece) + 1) if ids[i : i + len(piece)] == piece]


def test_a_copied_name_draws_on_the_step_that_introduced_it(smol, named_steps):
    run, records, result = named_steps
    pl = len(run.prompt_ids)
    ids = list(result.generated_ids)
    assert result.rule == "step markers"
    assert [s.text for s in result.steps] == ["Step 1: The new pet is called Zorbix.", "Step 2: Every morning, Zorbix"]
    step1, step2 = result.steps

    name = smol.tokenizer(NAME, add_special_tokens=False)["input_ids"]
    assert len(name) >= 2  # a made-up name, several pieces
    first, second = _occurrences(ids, name)
    assert step1.token_span[0] <= first and first + len(name) <= step1.token_span[1]
    assert step2.token_span[0] <= second and second + len(name) <= step2.token_span[1]

    # Step 2 drew on step 1 more than on the prompt, and positively: the edge step 1 -> step 2 is the strongest
    depends = {d.source: d for d in step2.depends}
    assert list(depends) == ["prompt", "step 1"]
    assert depends["step 1"].dla > 0
    assert depends["step 1"].dla > abs(depends["prompt"].dla)
    strongest = max((e for e in result.graph.edges if e.target == "step 2"), key=lambda e: abs(e.weight))
    assert strongest.source == "step 1"

    # Token by token: each piece of the repeated name, among everything before step 2 (prompt,
    # step 1 and the space between), draws most on the same piece in step 1 (copying and induction).
    step2_start = pl + step2.token_span[0]
    for j in range(len(name)):
        r = records[second + j]
        assert r.id == name[j]
        before = r.source_dla[:step2_start]
        assert int(np.argmax(before)) == pl + first + j, (r.token, np.argsort(-before)[:5])
        assert before.max() > 1.0
    # and the name's first piece draws more on step 1's copy of it than on any other position at all
    r = records[second]
    assert int(np.argmax(r.source_dla)) == pl + first


def test_chat_prompt_starts_with_the_chat_template(smol, monkeypatch, capfd):
    monkeypatch.setattr(hexray.cli, "load_model", lambda name, progress=None, **placement: smol)
    capfd.readouterr()
    code = hexray.cli.main(["generate", "-p", "What is the capital of France?", "--chat", "-n", "1", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    done = lines[-1]
    assert done["chat"] is True
    ids = done["prompt_token_ids"]
    im_start = smol.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start
    expected = smol.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    assert smol.tokenizer.decode(ids) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in expected
    # without --chat the prompt is the bare text
    assert TracedGeneration(smol, "What is the capital of France?", GenerationOptions(max_new_tokens=1)).prompt_ids[0] != im_start
