"""The web lab in a real browser: Debian's chromium, driven by Playwright, against `hexray serve`.

One real server (the embedded model, on 127.0.0.1) and one page serve the whole module; the tests
run in file order, like a researcher's session: IOI preset → attribution map → a head's pattern →
patching → ablation → generation → exports → a shared URL → a hostile prompt.
Screenshots of each panel go to ``$HEXRAY_SCREENSHOTS`` (the README's come from docs/lab/).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
# the machine has no network: without these, chromium keeps dialling out and waits on the failures
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PANELS = ["prompt", "tokens", "dla", "head", "lens", "resid", "patch", "ablate", "gen"]

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (make test installs it)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts():
    """A dictionary (random, at resid.1), an identity tuned lens and a small neuroscope index of the heads in the session's cache, for the lab to offer."""
    import hexray
    from hexray.analysis.features import example_dictionary
    from hexray.corpus.packs import token_pack
    from hexray.features.tuned_lens import default_tuned_lens_path, identity_tuned_lens, save_tuned_lens
    from hexray.neuroscope import build_index, default_index_path

    model = hexray.load_model()
    folder = example_dictionary(model)
    save_tuned_lens(identity_tuned_lens(model), default_tuned_lens_path(model))
    # heads only: a few seconds (every neuron's logit effects would take minutes on two cores)
    build_index(model, token_pack(model, context_size=64, max_tokens=1024), "heads", default_index_path(model.spec), top_k=5)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifacts):
    """A real `hexray serve` on the embedded model; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hexray", "serve", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"hexray serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hexray serve did not answer in 240 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("HEXRAY_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A page with its console errors and dialogs recorded (a dialog would mean injected script ran)."""

    def __init__(self, browser, url: str, theme: str = "dark"):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []  # every URL the page asked for, to prove none leaves the machine
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url)

    def wait(self, js: str, timeout: float = 60_000) -> None:
        self.page.wait_for_function(js, timeout=timeout)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def analysed(self, previous: int = 0) -> None:
        self.wait(f"window.hexrayLab && window.hexrayLab.analyses > {previous}")

    def click_cell(self, canvas: str, r: int, c: int, **kw) -> None:
        x, y = self.page.evaluate(f"document.getElementById('{canvas}').cellCenter({r}, {c})")
        self.page.locator(f"#{canvas}").click(position={"x": x, "y": y}, **kw)


@pytest.fixture(scope="module")
def lab(server, browser):
    page = Page(browser, server)
    yield page
    page.page.close()
    assert not page.errors, page.errors
    outside = [u for u in page.requests if not (u.startswith(server) or u.startswith(server.replace("http", "ws", 1)) or u.startswith(("blob:", "data:")))]
    assert not outside, outside  # no CDN, no font, no telemetry: the lab is self-contained


def test_ioi_preset_draws_the_attribution_map(lab, shots):
    lab.page.select_option("#preset", "ioi")
    lab.analysed()
    assert lab.page.locator("#tokens .tok").count() == 14
    assert lab.page.locator("#tokens .tok.sel").inner_text() == " to"
    check = lab.text("#sumcheck")
    assert check.startswith("✓") and "6.1196" in check  # the parts add up to the logit difference
    top = lab.page.locator("#dla-top li").all_inner_texts()
    assert top[0].startswith("L23H3")
    assert "prompt=When+Mary" in lab.page.url and "target=+Mary" in lab.page.url
    assert lab.page.evaluate("window.hexrayLab.layerMessages") == 30
    assert "name-mover" in lab.text("#preset-expected")  # the preset says which circuit to expect
    # one colour convention (ColorBrewer RdBu): L23H3 raises " Mary", so its cell is blue, not red
    r, g, b = lab.page.evaluate("""(() => { const c = document.getElementById('dla-map'); const [x, y] = c.cellCenter(23, 3);
        const d = window.devicePixelRatio || 1; return Array.from(c.getContext('2d').getImageData(x * d, y * d, 1, 1).data.slice(0, 3)); })()""")
    assert b > r + 40, (r, g, b)
    assert "blue: raises" in lab.text("#dla-panel .legend")


def test_layers_are_drawn_while_the_forward_pass_runs(lab):
    """Each block's message is drawn as it arrives (once per frame): the first layers are on the page before the attribution exists."""
    timeline = lab.page.evaluate("window.hexrayLab.timeline")
    sent = max(i for i, e in enumerate(timeline) if e["event"] == "sent")  # the last analysis
    events = timeline[sent:]
    layers = [e["t"] for e in events if e["event"] == "layer"]
    drawn = [e for e in events if e["event"] == "layer-drawn"]
    attribution = [e["t"] for e in events if e["event"] == "attribution"]
    done = next(e["t"] for e in events if e["event"] == "done")
    assert len(layers) == 30 and len(attribution) == 30 and layers[-1] <= attribution[0]  # blocks during the pass, attribution after it
    assert drawn and drawn[0]["t"] < attribution[0] <= done  # the first layers were drawn from the pass's own messages
    assert "prompt" in drawn[0]["panels"]  # the layer strip under the prompt, on screen
    assert done - drawn[0]["t"] > 50  # and visible well before the document arrived (ms)
    cells = lab.page.locator("#live-layers span")
    assert cells.count() == 30 and cells.nth(29).inner_text().strip() == "Mary"  # the last block's lens is the prediction
    assert "after L29:" in cells.nth(29).get_attribute("title")


def test_hovering_a_token_shows_the_next_token_distribution(lab):
    lab.page.locator("#tokens .tok").nth(13).hover()
    tip = lab.text("#tip")
    assert "next token" in tip and " Mary" in tip and "0.92" in tip


def test_clicking_a_head_shows_its_attention_pattern(lab, shots):
    lab.click_cell("dla-map", 23, 3)
    lab.wait("document.getElementById('head-name').textContent.startsWith('L23H3 ·')")
    head = lab.page.evaluate("window.hexrayLab.docs['head-panel']")
    assert head["name"] == "L23H3" and len(head["pattern"]) == 14
    last = head["pattern"][-1]
    assert head["tokens"][last.index(max(last))] == " John"  # it reads the repeated name
    cells = lab.page.locator("#role-scores td").all_inner_texts()
    assert len(cells) == 4 and all(re.fullmatch(r"\d\.\d{3}", c) for c in cells)
    assert "head=L23H3" in lab.page.url
    for name in ("prompt", "tokens", "dla", "head", "lens", "resid"):
        lab.page.locator(f"#{name}-panel").screenshot(path=str(shots / f"{name}.png"))


def test_the_head_inspector_says_what_the_head_does(lab):
    """Entropy, concentration, the key it reads and that key's value norm, its write, its pairs, its DLA."""
    head = lab.page.evaluate("window.hexrayLab.docs['head-panel']")
    analysis = lab.page.evaluate("window.hexrayLab.analysis")
    cells = lab.page.locator("#head-summary td").all_inner_texts()
    assert len(cells) == 7
    assert cells[0] == f"{analysis['head_scores'][23][3]:+.3f}"  # its direct attribution in this analysis
    assert float(cells[1]) == pytest.approx(head["mean_entropy"], abs=1e-3) and float(cells[3]) == pytest.approx(head["mean_concentration"], abs=1e-3)
    last = head["pattern"][13]
    key = last.index(max(last))
    assert "John" in cells[4] and f"({key})" in cells[4] and float(cells[5]) == pytest.approx(head["value_norm"][key], abs=1e-3)
    assert float(cells[6]) == pytest.approx(head["output_norm"][13], abs=1e-3)
    pairs = lab.page.locator("#head-pairs li").all_inner_texts()
    moved = lab.page.locator("#head-moved li").all_inner_texts()
    assert len(pairs) == len(moved) == 5 and all("←" in p for p in pairs + moved)
    assert pairs[0].endswith(f"{head['top_pairs'][0]['weight']:.3f}") and moved[0].endswith(f"{head['top_moved_pairs'][0]['moved']:.3f}")
    assert all(p["query"] > 0 for p in head["top_pairs"])  # query 0 can only attend to itself


def test_the_circuit_view_draws_edges_back_from_the_prediction(lab, shots):
    lab.page.click("#circuit-run")
    lab.wait("document.querySelectorAll('#circuit-edges li').length > 0", timeout=120_000)
    doc = lab.page.evaluate("window.hexrayLab.docs['circuit-panel']")
    names = {n["name"] for n in doc["nodes"]}
    assert "L23H3" in names and any(e["destination"] is None and e["source"] == "L23H3" for e in doc["edges"])
    into_logit = [e for e in doc["edges"] if e["destination"] is None]
    assert all(e["exact"] for e in into_logit) and not any(e["exact"] for e in doc["edges"] if e["destination"] is not None)
    layer = {n["name"]: n["layer"] for n in doc["nodes"]}
    assert all(layer[e["source"]] <= layer[e["destination"]] for e in doc["edges"] if e["destination"])  # edges run forward
    assert "solid: exact" in lab.text("#circuit-summary")
    lab.page.locator("#circuit-panel").screenshot(path=str(shots / "circuit.png"))


def test_token_flow_draws_arcs_and_one_layer_on_demand(lab, shots):
    lab.page.click("#flow-run")
    lab.wait("window.hexrayLab.docs['flow-panel'] !== undefined", timeout=60_000)
    doc = lab.page.evaluate("window.hexrayLab.docs['flow-panel']")
    assert doc["layer"] is None and len(doc["total"]) == 14 and doc["top_pairs"]
    assert all(p["query"] > p["key"] for p in doc["top_pairs"])
    x, y = lab.page.evaluate("document.getElementById('flow-arcs').tokenCenter(13)")
    lab.page.locator("#flow-arcs").hover(position={"x": x, "y": y})
    assert lab.text("#tip").startswith("13:")
    lab.page.locator("#flow-panel").screenshot(path=str(shots / "flow.png"))
    lab.page.select_option("#flow-layer", "23")
    lab.wait("window.hexrayLab.docs['flow-panel'].layer === 23", timeout=60_000)
    doc = lab.page.evaluate("window.hexrayLab.docs['flow-panel']")
    assert len(doc["layer_map"]) == 14 and "flow_layer=23" in lab.page.url
    lab.page.select_option("#flow-layer", "")


def test_shift_click_adds_a_head_to_the_ablation_set(lab):
    lab.click_cell("dla-map", 20, 0, modifiers=["Shift"])
    assert "L20H0" in lab.page.input_value("#components")


def test_patching_sweep_shows_progress_and_heatmap(lab, shots):
    lab.page.select_option("#sweep", "heads")
    lab.page.click("#patch-run")
    lab.wait("document.querySelectorAll('#patch-top li').length > 0", timeout=120_000)
    bar = lab.page.locator("#patch-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max")
    assert lab.page.locator("#patch-top li").first.inner_text().startswith("L23H3")
    assert "clean 6.120" in lab.text("#patch-summary")
    lab.page.locator("#patch-panel").screenshot(path=str(shots / "patch.png"))


def test_ablation_shows_the_distribution_before_and_after(lab, shots):
    lab.page.fill("#components", "L23H3, L29H1, L20H0")
    lab.page.click("#ablate-run")
    lab.wait("document.getElementById('ablate-summary').textContent.includes('KL')")
    summary = lab.text("#ablate-summary")
    before, after = map(float, re.search(r"logit diff (-?[\d.]+) → (-?[\d.]+)", summary).groups())
    assert before == pytest.approx(6.12, abs=0.01) and after < before - 3
    lab.page.locator("#ablate-panel").screenshot(path=str(shots / "ablate.png"))


def test_generation_streams_tokens_live(lab, shots):
    lab.page.fill("#max-new", "12")
    lab.page.fill("#watch", "L23H3")
    lab.page.click("#gen-run")
    # tokens appear while the stop button is still live: they stream, not arrive at the end
    lab.wait("document.querySelectorAll('#gen-text .gtok').length >= 1 && !document.getElementById('gen-stop').disabled")
    lab.wait("document.getElementById('gen-run').disabled === false", timeout=120_000)
    assert lab.page.locator("#gen-text .gtok").count() == 12
    assert lab.page.locator("#gen-text .gtok").first.inner_text() == " Mary"
    assert "watched: L23H3" in lab.text("#gen-detail")
    lab.page.locator("#gen-panel").screenshot(path=str(shots / "gen.png"))


@pytest.mark.parametrize("panel", ["dla", "patch", "gen"])
def test_every_panel_exports_png_and_json(lab, panel, tmp_path):
    with lab.page.expect_download() as png:
        lab.page.click(f"#{panel}-panel button[data-export=png]")
    path = tmp_path / png.value.suggested_filename
    png.value.save_as(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    with lab.page.expect_download() as js:
        lab.page.click(f"#{panel}-panel button[data-export=json]")
    doc = json.loads(Path(js.value.path()).read_text())
    assert {"dla": "components", "patch": "results", "gen": "tokens"}[panel] in doc


def test_the_url_restores_the_view(lab, browser, shots):
    lab.page.click("#theme")
    assert lab.page.evaluate("document.documentElement.dataset.theme") == "light" and "theme=light" in lab.page.url
    shared = Page(browser, lab.page.url)
    try:
        shared.analysed()
        shared.wait("document.getElementById('head-name').textContent.startsWith('L23H3 ·')")
        shared.wait("document.querySelectorAll('#patch-top li').length > 0", timeout=120_000)
        assert shared.page.input_value("#prompt") == lab.page.input_value("#prompt")
        assert shared.page.evaluate("document.documentElement.dataset.theme") == "light"
        shared.wait("document.getElementById('gen-run').disabled === false && document.querySelectorAll('#gen-text .gtok').length === 12", timeout=120_000)
        shared.page.screenshot(path=str(shots / "lab-light.png"), full_page=True)
        assert not shared.errors
    finally:
        shared.page.close()
    lab.page.click("#theme")
    lab.page.screenshot(path=str(shots / "lab.png"), full_page=True)


def test_a_hostile_prompt_renders_as_text(lab):
    n = lab.page.evaluate("window.hexrayLab.analyses")
    lab.page.fill("#prompt", "<img src=x onerror=alert(1)><script>alert(2)</script> hi")
    lab.page.fill("#target", "")
    lab.page.fill("#contrast", "")
    lab.page.click("#run")
    lab.analysed(n)
    strip = "".join(lab.page.locator("#tokens .tok").all_inner_texts())
    assert strip.startswith("<img src=x onerror=alert(1)><script>")
    assert lab.page.locator("img, #tokens script").count() == 0 and lab.dialogs == []


def test_a_bad_request_shows_one_line_and_keeps_the_page(lab):
    tokens_before = lab.page.locator("#tokens .tok").count()
    lab.page.fill("#target", " Mary had a little lamb")
    lab.page.click("#run")
    lab.wait("!document.getElementById('error').hidden")
    error = lab.text("#error")
    assert error.startswith("error: ") and "\n" not in error and "target" in error
    assert lab.page.locator("#tokens .tok").count() == tokens_before  # the last good view stays


def test_the_registry_panel_runs_an_analysis_without_a_panel_of_its_own(lab, shots):
    """Every registry analysis without its own panel gets a checkbox; ticking one adds its table to the next analysis."""
    registry = lab.page.evaluate("fetch('/api/analyses').then(r => r.json())")["analyses"]
    generic = [a for a in registry if a["lab_panel"] == "analyses-panel"]
    lab.wait(f"document.querySelectorAll('#analyses-options input').length === {len(generic)}")
    n = lab.page.evaluate("window.hexrayLab.analyses")
    lab.page.fill("#prompt", "When Mary and John went to the store, John gave a drink to")
    lab.page.fill("#target", "")
    lab.page.fill("#contrast", "")
    lab.page.check("#analyses-options input[data-name=head_metrics]")
    lab.page.click("#run")
    lab.analysed(n)
    table = lab.page.locator("#analyses-views table[data-analysis=head_metrics]")
    assert table.locator("tr").count() == 1 + 20  # a header and the lab's top_k rows
    assert "Most focused heads at position 13" in lab.text("#analyses-views")
    assert lab.page.locator("#analyses-views table").count() == 1  # only what was ticked
    lab.page.locator("#analyses-panel").screenshot(path=str(shots / "registry.png"))


def test_every_preset_fills_the_prompt_and_names_its_circuit(lab):
    presets = lab.page.evaluate("fetch('/api/presets').then(r => r.json())")["presets"]
    assert {"ioi", "induction", "factual", "greater-than", "duplicate-token"} <= {p["name"] for p in presets}
    for preset in presets:
        n = lab.page.evaluate("window.hexrayLab.analyses")
        lab.page.select_option("#preset", preset["name"])
        lab.analysed(n)
        assert lab.page.input_value("#prompt") == preset["prompt"]
        assert lab.page.input_value("#target") == (preset["target"] or "")
        assert lab.text("#preset-expected") == f"expected circuit: {preset['expected']}"
        assert lab.page.input_value("#corrupt") == (preset["corrupt"] or "")
        assert f"preset={preset['name']}" in lab.page.url


LONG = " ".join(["When Mary and John went to the store, John gave a drink to Mary."] * 14)  # ~220 tokens: seconds of work


def _outcomes(lab, panel: str) -> list[str]:
    return [r["outcome"] for r in lab.page.evaluate("window.hexrayLab.requests") if r["panel"] == panel]


def _idle(lab) -> None:
    """The server has let go of every job (a stopped job ends at its next block)."""
    lab.wait("fetch('/api/health').then(r => r.json()).then(h => !h.busy && h.queued === 0)", timeout=30_000)


def test_a_superseded_analysis_never_lands(lab):
    n = lab.page.evaluate("window.hexrayLab.analyses")
    before = len(_outcomes(lab, "analysis"))
    lab.page.select_option("#preset", "")
    lab.page.fill("#target", "")
    lab.page.fill("#contrast", "")
    lab.page.fill("#prompt", LONG)
    lab.page.click("#run")
    lab.wait("window.hexrayLab.layerMessages > 0")  # the first job is running on the server
    lab.page.fill("#prompt", "The capital of France is")
    lab.page.click("#run")
    lab.analysed(n)
    _idle(lab)
    lab.page.wait_for_timeout(500)
    assert lab.page.evaluate("window.hexrayLab.analyses") == n + 1  # only the newer one landed
    assert _outcomes(lab, "analysis")[before:] == ["superseded", "landed"]
    assert "".join(lab.page.locator("#tokens .tok").all_inner_texts()).endswith("The capital of France is")


def test_every_long_job_has_a_stop(lab):
    # analysis: stopped mid-stream, the last good view stays
    tokens = lab.page.locator("#tokens .tok").count()
    lab.page.fill("#prompt", LONG)
    lab.page.click("#run")
    lab.wait("window.hexrayLab.layerMessages > 0 && !document.getElementById('run-stop').disabled")
    lab.page.click("#run-stop")
    lab.wait("document.getElementById('run-stop').disabled")
    assert _outcomes(lab, "analysis")[-1] == "stopped"
    assert lab.page.locator("#tokens .tok").count() == tokens
    _idle(lab)
    # patching: stopped after the first progress message
    lab.page.fill("#clean", "When Mary and John went to the store, John gave a drink to")
    lab.page.fill("#corrupt", "When Mary and John went to the store, Mary gave a drink to")
    lab.page.select_option("#sweep", "heads-pos")  # 3780 variants: seconds of chunks, progress after each
    lab.page.click("#patch-run")
    lab.wait("document.getElementById('patch-progress').value > 0", timeout=120_000)
    lab.page.click("#patch-stop")
    lab.wait("!document.getElementById('patch-run').disabled")
    assert _outcomes(lab, "patch")[-1] == "stopped"
    _idle(lab)
    # generation: stopped after two tokens, which stay on the page
    lab.page.fill("#prompt", "When Mary and John went to the store, John gave a drink to")
    lab.page.fill("#max-new", "200")
    lab.page.click("#gen-run")
    lab.wait("document.querySelectorAll('#gen-text .gtok').length >= 2")
    lab.page.click("#gen-stop")
    lab.wait("!document.getElementById('gen-run').disabled")
    made = lab.page.locator("#gen-text .gtok").count()
    assert _outcomes(lab, "gen")[-1] == "stopped" and 2 <= made < 200
    _idle(lab)
    # the circuit: stopped before it finishes
    lab.page.fill("#prompt", LONG)
    lab.page.fill("#circuit-depth", "4")
    lab.page.click("#circuit-run")
    lab.wait("!document.getElementById('circuit-stop').disabled")
    lab.page.click("#circuit-stop")
    lab.wait("document.getElementById('circuit-stop').disabled")
    assert _outcomes(lab, "circuit")[-1] == "stopped"
    _idle(lab)


def test_a_busy_model_shows_the_queue_position(lab):
    lab.page.fill("#clean", "When Mary and John went to the store, John gave a drink to")
    lab.page.fill("#corrupt", "When Mary and John went to the store, Mary gave a drink to")
    lab.page.select_option("#sweep", "heads-pos")  # 3780 variants: seconds of chunks, progress after each
    lab.page.click("#patch-run")
    lab.wait("document.getElementById('patch-progress').value > 0", timeout=120_000)
    n = lab.page.evaluate("window.hexrayLab.analyses")
    lab.page.fill("#prompt", "The capital of France is")
    lab.page.click("#run")
    lab.wait("document.getElementById('analysis-queue').textContent.includes('1 ahead')")
    assert "1 job ahead" in lab.text("#status")
    lab.page.click("#patch-stop")  # the analysis gets its turn
    lab.analysed(n)
    assert lab.text("#analysis-queue") == ""
    _idle(lab)


def test_a_hand_edited_url_falls_back_to_what_the_form_offers(server, browser):
    page = Page(browser, server + "?prompt=The+capital+of+France+is&gran=atoms&sweep=bogus&mode=nope")
    try:
        page.analysed()
        assert page.page.input_value("#granularity") == "head" and page.page.input_value("#sweep") == "heads"
        assert page.page.input_value("#mode") == "zero" and page.page.locator("#error").is_hidden()
        assert "atoms" not in page.page.url and "bogus" not in page.page.url and "nope" not in page.page.url
        assert not page.errors
    finally:
        page.page.close()


def test_a_dictionary_and_the_tuned_lens_from_the_prompt_panel(lab, shots):
    """Picking a dictionary shows each token's features on hover and lets patching sweep its features; the tuned lens joins the lens panel."""
    lab.page.select_option("#preset", "ioi")
    options = lab.page.locator("#dict option").all_inner_texts()
    assert any("examples/" in o for o in options), options
    lab.page.select_option("#dict", index=1)
    assert not lab.page.locator("#tuned").is_disabled()
    lab.page.check("#tuned")
    before = lab.page.evaluate("window.hexrayLab.analyses")
    lab.page.click("#run")
    lab.analysed(before)
    assert "dict=examples" in lab.page.url and "tl=1" in lab.page.url
    lab.page.locator("#tokens .tok").nth(13).hover()
    tip = lab.text("#tip")
    assert re.search(r"L1F\d+ +\d", tip), tip  # the token's features, by label and activation
    column = lab.page.evaluate("(() => { const a = window.hexrayLab.analysis; return a.residual.lens_positions.indexOf(a.position); })()")
    x, y = lab.page.evaluate(f"document.getElementById('lens-grid').cellCenter(3, {column})")
    lab.page.locator("#lens-grid").hover(position={"x": x, "y": y})
    assert "tuned lens: rank" in lab.text("#tip")
    lab.page.select_option("#sweep", "features")
    lab.page.click("#patch-run")
    lab.wait("(document.querySelector('#patch-top li') || {textContent: ''}).textContent.startsWith('L1F')", timeout=120_000)  # the new sweep's top features
    assert lab.page.input_value("#patch-view") == "features"
    lab.page.select_option("#dict", index=0)
    lab.page.uncheck("#tuned")


def test_a_unit_card_from_a_label_and_the_units_at_a_token(server, browser, shots):
    """Any head label opens its neuroscope card (examples shaded by activation); the token strip asks which units fire at a token."""
    deadline = time.monotonic() + 300  # an earlier test's long job (a features sweep) may still hold the model
    while httpx.get(f"{server}api/health", timeout=5).json()["busy"] and time.monotonic() < deadline:
        time.sleep(1)
    page = Page(browser, server)
    try:
        lab_page = page.page
        lab_page.select_option("#preset", "ioi")
        page.analysed()
        assert lab_page.locator("#dla-top li", has_text="MLP").first.get_attribute("data-unit") is None  # a layer is no unit the neuroscope indexes
        label = lab_page.locator("#dla-top li[data-unit]").first
        name = label.get_attribute("data-unit")
        assert re.fullmatch(r"L\d+H\d+", name), name
        label.click()
        page.wait("document.getElementById('unit-card').dataset.state === 'shown'")
        expected = httpx.get(f"{server}api/units/{name}").json()
        assert page.page.evaluate("window.hexrayLab.docs['unit-card']") == expected and expected["top"]
        assert f"unit={name}" in lab_page.url
        assert lab_page.locator("#unit-card .unit-name").inner_text() == name
        rows = lab_page.locator("#unit-card .examples li")
        assert rows.count() == len(expected["top"])
        for i, e in enumerate(expected["top"]):
            assert rows.nth(i).locator(".act").inner_text() == f"{e['activation']:.3f}"
            assert rows.nth(i).locator(".ctx").text_content() == "".join(e["tokens"]).replace("\n", "↵").replace("\t", "⇥")
            assert rows.nth(i).locator(".ctx .here").text_content() == e["token"].replace("\n", "↵").replace("\t", "⇥")
        assert lab_page.locator("#unit-card .samples li").count() == len(expected["samples"])
        assert lab_page.evaluate("document.getElementById('unit-hist').width") > 0
        lab_page.locator("#unit-drawer").screenshot(path=str(shots / "unit-card.png"))

        analysis = lab_page.evaluate("window.hexrayLab.analysis")
        lab_page.click("#units-here")
        page.wait("document.getElementById('unit-hits').dataset.state === 'shown'")
        at = httpx.get(f"{server}api/units", params={"prompt": analysis["prompt"], "position": analysis["position"] - len(analysis["tokens"]), "limit": 20}).json()
        hits = lab_page.locator("#unit-hits li[data-unit]")
        assert [hits.nth(i).get_attribute("data-unit") for i in range(hits.count())] == [h["name"] for h in at["hits"]] and at["hits"]
        assert at["search"]["token"] == analysis["tokens"][analysis["position"]]
        other = at["hits"][1]["name"] if at["hits"][0]["name"] == name else at["hits"][0]["name"]
        lab_page.locator(f"#unit-hits li[data-unit='{other}']").click()
        page.wait(f"document.getElementById('unit-card').dataset.state === 'shown' && window.hexrayLab.docs['unit-card'].name === '{other}'")

        lab_page.locator("#tokens .tok").nth(2).click(button="right")  # any token of the strip, without explaining it anew
        page.wait("(document.querySelector('#unit-hits .hits-title') || {textContent: ''}).textContent.includes('(position 2)')")
        assert lab_page.locator("#unit-hits li[data-unit]").count() > 0

        lab_page.keyboard.press("Escape")
        assert lab_page.locator("#unit-drawer").is_hidden() and "unit=" not in lab_page.url
        lab_page.click("#neuroscope-open")
        lab_page.fill("#unit-token", " Mary")
        lab_page.click("#unit-token-run")
        page.wait("(document.querySelector('#unit-hits .hits-title') || {textContent: ''}).textContent.includes('centre on')")
        on = httpx.get(f"{server}api/units", params={"token": " Mary", "limit": 20}).json()
        assert lab_page.locator("#unit-hits li[data-unit]").count() == len(on["hits"])
        lab_page.click("#unit-close")
        assert lab_page.locator("#unit-drawer").is_hidden()
        assert not page.errors, page.errors
    finally:
        page.page.close()
    missing = Page(browser, server + "?unit=L0N99999")  # a shared URL naming a unit the index lacks: one line saying why
    try:
        missing.wait("document.getElementById('unit-card').dataset.state === 'error'")
        text = missing.text("#unit-card")
        assert text.startswith("L0N99999: ") and "\n" not in text.strip()
        assert not missing.errors, missing.errors
    finally:
        missing.page.close()
