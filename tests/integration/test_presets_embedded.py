"""The prompt presets on the real embedded SmolLM2-135M-Instruct: their tokens, and what the model does with them.

Predictions come from a plain forward pass of the Hugging Face model (no HexRay analysis); the
IOI head check goes through the CLI, as a user would run it.
"""

from __future__ import annotations

import pytest
import torch

from hexray.intervene.ablation import parse_sites
from hexray.presets import PRESETS

pytestmark = pytest.mark.integration

WITH_TARGET = [p for p in PRESETS if p.target is not None]
WITH_CONTRAST = [p for p in PRESETS if p.contrast is not None]


def top_prediction(smol, prompt: str) -> str:
    ids = torch.tensor([smol.encode(prompt)])
    with torch.no_grad():
        logits = smol.bridge.original_model(ids).logits[0, -1].float()
    return smol.tokenizer.decode([int(logits.argmax())])


@pytest.mark.parametrize("p", PRESETS, ids=lambda p: p.name)
def test_target_and_contrast_are_one_token(smol, p):
    for text in (p.target, p.contrast):
        if text is not None:
            assert len(smol.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text


@pytest.mark.parametrize("p", PRESETS, ids=lambda p: p.name)
def test_clean_and_corrupt_have_the_same_length(smol, p):
    """Exact patching (the default) needs the two prompts to line up token by token."""
    assert len(smol.encode(p.clean)) == len(smol.encode(p.corrupt))


@pytest.mark.parametrize("p", WITH_TARGET, ids=lambda p: p.name)
def test_the_model_predicts_the_target(smol, p):
    assert top_prediction(smol, p.prompt) == p.target


@pytest.mark.parametrize("p", WITH_CONTRAST, ids=lambda p: p.name)
def test_the_corrupt_prompt_predicts_the_contrast(smol, p):
    """The corruption flips the answer to the contrast, so logit(target) - logit(contrast) changes sign."""
    assert top_prediction(smol, p.corrupt) == p.contrast


@pytest.mark.parametrize("p", [p for p in PRESETS if p.components], ids=lambda p: p.name)
def test_components_are_sites_of_the_model(smol, p):
    assert [s.component.name for s in parse_sites(p.components, smol.spec)] == [c.strip() for c in p.components.split(",")]


def test_ioi_top_head_is_l23h3(cli_json):
    doc = cli_json("trace", "--preset", "ioi", "--granularity", "head")
    assert (doc["target"]["token"], doc["contrast"]["token"]) == (" Mary", " John")
    heads = [c for c in doc["components"] if c["kind"] == "head"]
    assert max(heads, key=lambda c: c["score"])["name"] == "L23H3"
    assert doc["preset"]["name"] == "ioi"
