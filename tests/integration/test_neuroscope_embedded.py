"""The neuroscope on the embedded SmolLM2 model: a small index of the default corpus, checked
against the plain Hugging Face model (raw PyTorch hooks on modules the bridge never touched)."""

from __future__ import annotations

import pytest
import torch

from hexray.corpus.packs import token_pack
from hexray.neuroscope import build_index, open_index, search_token, unit_page
from hexray.neuroscope.index import split_held_out


@pytest.fixture(scope="module")
def index(smol, tmp_path_factory):
    both = token_pack(smol, None, context_size=64, max_tokens=3_000)
    pack, held_out = split_held_out(both, 2_500)
    out = tmp_path_factory.mktemp("ns-embedded") / "index.duckdb"
    info = build_index(smol, pack, "neurons,heads", out, top_k=8, held_out=held_out)
    assert info.tokens == 2_500 and info.units == {"neuron": 30 * 1536, "head": 30 * 9}
    return out


def hf_neuron(smol, ids: list[int], layer: int) -> torch.Tensor:
    """[pos, d_mlp] the MLP's post-activation (what down_proj reads) from the HF model itself."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smol.checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    seen = {}
    def keep(module, args, out) -> None:  # returns None: the module's output is left as it is
        seen["x"] = args[0][0].detach()

    handle = hf.model.layers[layer].mlp.down_proj.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            hf(torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["x"]


def test_top_examples_recompute_on_the_plain_hf_model_and_rank_first(smol, index):
    with open_index(index, smol.spec) as opened:
        page = unit_page(opened, "L20N100")
        score = page.label.score  # nan when the held-out text never holds the rule's tokens
        assert page.top and page.label is not None and (score != score or -1 <= score <= 1)
        acts = [e.activation for e in page.top]
        assert acts == sorted(acts, reverse=True)
        best = page.top[0]
        recomputed = hf_neuron(smol, list(best.context_ids), 20)[best.position, 100].item()
        assert recomputed == pytest.approx(best.activation, rel=2e-3, abs=2e-3)
        assert page.promoted and page.promoted[0].value >= page.promoted[-1].value


def test_a_token_look_up_finds_units_whose_examples_centre_on_it(smol, index):
    the = smol.single_token(" the", role="token")
    with open_index(index, smol.spec) as opened:
        hits = search_token(opened, the, limit=5)
        assert hits and all(0 < h.score <= 1 for h in hits)
        page = unit_page(opened, hits[0].unit)
        assert sum(e.token_ids[e.position - e.window_start] == the for e in page.top) == round(hits[0].score * opened.info.top_k)
