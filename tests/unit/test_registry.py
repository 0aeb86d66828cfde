"""The drift test: every registered analysis reaches the CLI, the API, the JSON, the report, the console and the lab.

Nothing here names an analysis: a new registry entry is checked the moment it is registered.
"""

from __future__ import annotations

import html
import json
import re

import pytest
import typer.main
from fastapi.testclient import TestClient
from rich.console import Console

from hexray import cli as cli_module
from hexray.analysis.registry import analyses
from hexray.analysis.report import AnalysisOptions, analyze
from hexray.render.console import render_report
from hexray.render.files import figures
from hexray.render.html import report_html
from hexray.render.jsondoc import report_document
from hexray.server import schemas
from hexray.server.app import STATIC, create_app

PROMPT = "12 + 34 = 46. Then 5 + 7 ="
SWITCHED = [a for a in analyses() if a.switch is not None]


def _on(a, model=None):
    """A value that switches ``a`` on (for ``model``, where the analysis needs something made first)."""
    if a.example is not None and model is not None:
        return a.example(model)
    tp = a.switch.type
    return ("attn.L0.W_Q",) if tp == tuple[str, ...] else 3 if tp is int else True


@pytest.fixture(scope="module")
def everything(tiny_llama):
    options = AnalysisOptions(granularity="layer", **{a.switch.name: _on(a, tiny_llama) for a in SWITCHED})
    return analyze(tiny_llama, PROMPT, options)


def _trace_flags() -> set[str]:
    command = typer.main.get_command(cli_module.app).commands["trace"]
    return {opt.split("/")[0] for p in command.params for opt in p.opts}


@pytest.mark.parametrize("analysis", analyses(), ids=lambda a: a.name)
def test_every_option_is_a_cli_flag_and_an_api_field(analysis):
    flags, fields = _trace_flags(), schemas.AnalyzeRequest.model_fields
    for option in analysis.all_options:
        if option.flag != "":
            assert option.cli_flag.split("/")[0] in flags, f"{analysis.name}: {option.cli_flag} missing from hexray trace"
        if option.api:
            assert option.request_field in fields, f"{analysis.name}: {option.request_field} missing from /api/analyze"
            assert fields[option.request_field].default == (list(d) if isinstance(d := option.request_default, tuple) else d)
    assert analysis.enabled(AnalysisOptions(**({analysis.switch.name: _on(analysis)} if analysis.switch else {})))
    if analysis.switch is not None:
        assert not analysis.enabled(AnalysisOptions())


@pytest.mark.parametrize("analysis", analyses(), ids=lambda a: a.name)
def test_every_analysis_reaches_json_report_console_and_lab(everything, analysis):
    report, ctx = everything, everything.context
    assert analysis.switch is None or analysis.name in report.sections
    result = getattr(report, analysis.name)
    doc = json.loads(json.dumps(report_document(report), allow_nan=False))
    if analysis.json_key is not None:
        assert analysis.json_key in doc, f"{analysis.name}: no {analysis.json_key!r} in the document"
    else:
        assert set(analysis.document(result, ctx)) <= set(doc)
    pngs = figures(report)
    if analysis.figures is not None:
        assert set(analysis.figures(result, ctx)) <= set(pngs)
    page = report_html(report, pngs)
    if analysis.html is not None:
        assert analysis.html(result, ctx) in page
    elif analysis.table is not None:
        assert html.escape(analysis.table(result, ctx).title) in page
    assert analysis.console is not None or analysis.table is not None or analysis.figures is not None, f"{analysis.name} renders nowhere on the console or report"
    console = Console(record=True, width=200)
    render_report(report, console)
    if analysis.table is not None and analysis.console is None:
        assert analysis.table(result, ctx).title in console.export_text()
    panels = {re.search(r'\bid: "([a-z]+)",', f.read_text()).group(1) + "-panel" for f in (STATIC / "js" / "panels").glob("*.js") if f.name != "index.js"}
    assert analysis.lab_panel in panels, f"{analysis.name}: the lab has no panel module {analysis.lab_panel}"
    if analysis.lab_panel == "analyses-panel":
        assert analysis.table is not None, f"{analysis.name}: the generic lab panel draws a table"
        assert analysis.name in doc["views"]


def test_the_api_lists_the_registry_and_runs_everything_the_cli_can(tiny_llama):
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as client:
        listed = client.get("/api/analyses").json()["analyses"]
        assert [a["name"] for a in listed] == [a.name for a in analyses()]
        body = {"prompt": PROMPT, "granularity": "layer"}
        for a in SWITCHED:
            value = _on(a, tiny_llama)
            body[a.switch.request_field] = list(value) if isinstance(value, tuple) else value
        r = client.post("/api/analyze", json=body)
        assert r.status_code == 200, r.text
        for a in SWITCHED:
            assert a.json_key in r.json()


def test_one_set_of_defaults():
    """The CLI flag, the API field and the options dataclass share each default (max_new_tokens drifted 32/48/32/24)."""
    from hexray.generation.tracer import GENERATION_OPTIONS, GenerationOptions

    command = typer.main.get_command(cli_module.app).commands["generate"]
    cli_defaults = {p.name: p.default for p in command.params}
    for option in GENERATION_OPTIONS:
        if option.flag != "":
            assert cli_defaults[option.name] == (None if option.type == tuple[str, ...] else option.default), option.name
        if option.api:
            assert schemas.GenerateRequest.model_fields[option.request_field].default == (list(option.default) if isinstance(option.default, tuple) else option.default)
        assert getattr(GenerationOptions(), option.name) == option.default
    assert "max_new_tokens" in (STATIC / "js" / "panels" / "gen.js").read_text()  # the lab reads its default from /api/options
    assert 'value="24"' not in (STATIC / "js" / "panels" / "gen.js").read_text()


def test_errors_name_the_field_the_cli_spells_the_flag_and_the_api_its_request_field(cli, tiny_llama):
    r = cli("no-load", "patch", "--clean", "a", "--corrupt", "b", "--sweep", "heads,bogus")
    assert r.code == 2 and "unknown sweep 'bogus'" in r.err
    r = cli(tiny_llama, "trace", "--prompt", "The cat sat", "--token-index", "9")
    assert r.code == 2 and "--token-index 9 is out of range" in r.err
    with TestClient(create_app(tiny_llama, time_limit=60), base_url="http://127.0.0.1") as client:
        doc = client.post("/api/patch", json={"clean": "The cat sat", "corrupt": "The dog ran", "sweep": ""}).json()
        assert doc["field"] == "sweep" and doc["error"] == "sweep is empty", doc  # the request's name, not the option's (sweeps)
        doc = client.post("/api/analyze", json={"prompt": "The cat sat", "token_index": 9}).json()
        assert doc["error"].startswith("token_index 9 is out of range") and "--" not in doc["error"] + str(doc["hint"])
