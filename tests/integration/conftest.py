"""Fixtures of the integration tests: the embedded SmolLM2 model, and the CLI run in-process on it."""

from __future__ import annotations

import json

import pytest

import hexray
import hexray.cli


@pytest.fixture(scope="module")
def smol():
    return hexray.load_model()


@pytest.fixture
def cli_json(smol, monkeypatch, capfd, tmp_path):
    """``cli_json(*args)``: ``hexray *args --json`` in-process on the embedded model; the parsed document."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hexray.cli, "load_model", lambda name, progress=None, **placement: smol)

    def run(*args) -> dict:
        capfd.readouterr()
        code = hexray.cli.main([str(a) for a in args] + ["--json"])
        out, err = capfd.readouterr()
        assert code == 0, err
        assert err == ""
        assert out.count("\n") == 1 and out.endswith("\n")  # one document, nothing else
        return json.loads(out)

    return run
