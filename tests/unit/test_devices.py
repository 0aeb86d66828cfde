"""Devices and dtypes: --device / --dtype on every command, half precision that still adds up (with its
error shown), and clear refusals for a device this machine does not have."""

from __future__ import annotations

import pytest
import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.errors import HexRayError
from hexray.models.loading import load_model, resolve_device
from hexray.tracing.engine import run_trace

PROMPT = "John said that Mary"
COMMANDS = [
    ["trace", "-p", PROMPT],
    ["patch", "--clean", PROMPT, "--corrupt", "Mary said that John"],
    ["ablate", "-p", PROMPT, "-c", "L0H1"],
    ["heads"],
    ["generate", "-p", PROMPT],
    ["serve"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_device_this_machine_lacks_before_loading(cli, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("no-load", *command, "--device", "cuda")
    assert r.code == 2
    assert "device cuda is not available" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_an_unknown_dtype_before_loading(cli, command):
    r = cli("no-load", *command, "--dtype", "float8")
    assert r.code == 2
    assert "unknown dtype 'float8'" in r.err and "bfloat16" in r.err


def test_unknown_device_names_the_choices():
    with pytest.raises(HexRayError, match="unknown device 'tpu'") as info:
        resolve_device("tpu")
    assert "cuda:N" in info.value.hint


def test_auto_picks_what_is_there():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == expected


@pytest.fixture(scope="module")
def half(tiny_llama_case):
    return load_model(str(tiny_llama_case.folder), dtype="bfloat16", device="auto" if not torch.cuda.is_available() else "cpu")


def test_a_bfloat16_model_computes_in_bfloat16_and_attributes_in_float32(half, tiny_llama):
    assert half.dtype == torch.bfloat16 and tiny_llama.dtype == torch.float32
    assert half.W_O[0].dtype == torch.float32  # the analysis maths is float32 whatever the model's dtype
    trace = run_trace(half, PROMPT, attribution_hooks(half.spec, "head"))
    assert all(t.dtype == torch.float32 for t in trace.acts.values())
    a = direct_logit_attribution(half, trace, granularity="head")
    exact = direct_logit_attribution(tiny_llama, run_trace(tiny_llama, PROMPT, attribution_hooks(tiny_llama.spec, "head")), target=a.target.id, granularity="head")
    # the parts still add up to the (bfloat16) logit, within the honest, larger error it reports
    assert sum(c.score for c in a.components) == pytest.approx(a.value, abs=a.reconstruction_error + 1e-6)
    assert exact.reconstruction_error < 1e-4
    assert a.reconstruction_error < 0.05 * max(1.0, abs(a.value))
    assert a.value == pytest.approx(exact.value, abs=0.05 * max(1.0, abs(exact.value)))


def test_the_cli_runs_in_bfloat16(cli, tiny_llama_case):
    r = cli(None, "trace", "-p", PROMPT, "--model", str(tiny_llama_case.folder), "--dtype", "bfloat16", "-k", "3")
    assert r.code == 0, r.err
    assert "error" in r.out  # the conservation line, with its error


def test_health_reports_the_device_and_dtype(tiny_llama):
    from fastapi.testclient import TestClient

    from hexray.server.app import create_app

    body = TestClient(create_app(tiny_llama), base_url="http://127.0.0.1").get("/api/health").json()
    assert body["device"] == "cpu" and body["dtype"] == "float32"
