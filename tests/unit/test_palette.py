"""One sign-colour convention (ColorBrewer RdBu: positive blue, negative red) in the lab, the PNGs, the HTML and the console.

The renderers' source is read for left-over literals, the lab's CSS is parsed for its ``--pos``/``--neg``,
and real figures, pages and console tables are rendered on the tiny model and inspected.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np
import pytest

from hexray.analysis.report import AnalysisOptions, analyze
from hexray.intervene.patching import activation_patching
from hexray.render import console, plots
from hexray.render import palette
from hexray.render.files import figures
from hexray.render.html import patching_html, report_html

SRC = Path(__file__).resolve().parents[2] / "src" / "hexray"
RENDER = SRC / "render"
LAB_CSS = SRC / "server" / "static" / "lab.css"

IOI = "When Mary and John went to the store, John gave a drink to"
CLEAN, CORRUPT = "John said that Mary", "Mary said that John"  # equal length in the tiny tokenizer
HEX = re.compile(r"#([0-9a-fA-F]{6}|[0-9a-fA-F]{3})(?![0-9a-fA-F])")


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def is_green(hex_colour: str) -> bool:
    """Green clearly the strongest channel (#2a9d4b, #55a868 yes; #64b5cd, greys, oranges no)."""
    r, g, b = rgb(hex_colour)
    return g > r + 32 and g > b + 32


def blue_dominant(rgba) -> bool:
    r, g, b = rgba[:3]
    return b > r + 0.2 and b > g


def red_dominant(rgba) -> bool:
    r, g, b = rgba[:3]
    return r > b + 0.2 and r > g


# ---------------------------------------------------------------------------------------------
# the palette itself
# ---------------------------------------------------------------------------------------------


def test_palette_is_rdbu_blue_positive_red_negative():
    import matplotlib

    assert palette.DIVERGING_CMAP == "RdBu"
    cmap = matplotlib.colormaps[palette.DIVERGING_CMAP]
    assert blue_dominant(cmap(1.0)) and red_dominant(cmap(0.0)), "high values must be blue, low values red"
    for positive in (palette.POSITIVE, palette.POSITIVE_DARK):
        assert blue_dominant([c / 255 for c in rgb(positive)]), positive
    for negative in (palette.NEGATIVE, palette.NEGATIVE_DARK):
        assert red_dominant([c / 255 for c in rgb(negative)]), negative
    assert palette.sign_colour(0.5) == palette.sign_colour(0.0) == palette.POSITIVE
    assert palette.sign_colour(-0.5) == palette.NEGATIVE
    assert palette.sign_colour(2.0, dark=True) == palette.POSITIVE_DARK
    assert palette.sign_colour(-2.0, dark=True) == palette.NEGATIVE_DARK
    for legend in (palette.LEGEND, palette.PATCHING_LEGEND, palette.WEIGHT_LEGEND):
        assert "\n" not in legend and legend.startswith("blue: ") and " red: " in legend


@pytest.mark.parametrize("name", ["plots.py", "html.py", "console.py"])
def test_renderers_use_the_palette_not_literals(name):
    source = (RENDER / name).read_text()
    assert '"RdBu"' not in source and "'RdBu'" not in source, f"{name} names the colormap itself; use palette.DIVERGING_CMAP"
    greens = [m.group(0) for m in HEX.finditer(source) if is_green(m.group(0))]
    assert not greens, f"green left in {name}: {greens}"
    assert not re.search(r"""["'](?:tab:)?green["']""", source), f"{name} colours something green by name"
    assert not re.search(r"""["'](?:tab:red|C3)["']""", source), f"{name} spells a sign colour itself"
    assert "palette" in source


# ---------------------------------------------------------------------------------------------
# the lab's CSS
# ---------------------------------------------------------------------------------------------


def css_rules(text: str) -> list[tuple[str, dict[str, str]]]:
    """(selector, {property: value}) for every flat rule of a stylesheet (comments dropped)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    rules = []
    for selector, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text):
        props = dict((k.strip(), v.strip()) for k, _, v in (d.partition(":") for d in body.split(";")) if k.strip())
        rules.append((selector.strip(), props))
    return rules


def theme_variables(theme: str) -> dict[str, str]:
    """The custom properties the lab defines for ``[data-theme=theme]`` (``:root`` counts as the default, dark)."""
    found: dict[str, str] = {}
    for selector, props in css_rules(LAB_CSS.read_text()):
        selectors = [s.strip() for s in selector.split(",")]
        if f'[data-theme="{theme}"]' in selectors or (theme == "dark" and ":root" in selectors):
            found.update({k: v.lower() for k, v in props.items() if k.startswith("--")})
    return found


@pytest.mark.parametrize(
    "theme, positive, negative",
    [("dark", palette.POSITIVE_DARK, palette.NEGATIVE_DARK), ("light", palette.POSITIVE, palette.NEGATIVE)],
)
def test_lab_css_uses_the_palette(theme, positive, negative):
    variables = theme_variables(theme)
    assert variables.get("--pos") == positive.lower(), f"lab.css {theme} --pos"
    assert variables.get("--neg") == negative.lower(), f"lab.css {theme} --neg"


def test_root_is_the_dark_theme():
    root = [props for selector, props in css_rules(LAB_CSS.read_text()) if ":root" in [s.strip() for s in selector.split(",")]]
    assert root and all(props.get("--pos", palette.POSITIVE_DARK).lower() == palette.POSITIVE_DARK.lower() for props in root)


# ---------------------------------------------------------------------------------------------
# HTML reports
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tiny_gpt2):
    return analyze(tiny_gpt2, IOI, AnalysisOptions(granularity="head", target=" Mary", contrast=" John"))


@pytest.fixture(scope="module")
def patching(tiny_gpt2):
    return activation_patching(tiny_gpt2, CLEAN, CORRUPT, target=" Mary", contrast=" John", sweeps="heads,resid")


def sign_rules(page: str) -> tuple[dict[str, str], dict[str, str]]:
    """The .pos/.neg colours of a page's stylesheet: (light, dark) as {class: colour}."""
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    dark_block = re.search(r"@media\s*\(prefers-color-scheme:\s*dark\)\s*\{((?:[^{}]*\{[^{}]*\})*)[^{}]*\}", style)
    assert dark_block, "no prefers-color-scheme:dark block"
    light_css = style.replace(dark_block.group(0), "")
    pick = lambda css: {cls: m.group(1).lower() for cls in ("pos", "neg") if (m := re.search(rf"\.{cls}\{{color:(#[0-9a-fA-F]+)\}}", css))}
    return pick(light_css), pick(dark_block.group(1))


def assert_sign_styles(page: str) -> None:
    light, dark = sign_rules(page)
    assert light == {"pos": palette.POSITIVE, "neg": palette.NEGATIVE}
    assert dark == {"pos": palette.POSITIVE_DARK, "neg": palette.NEGATIVE_DARK}
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert style.index(f".pos{{color:{palette.POSITIVE}}}") < style.index("prefers-color-scheme"), "a later light rule would override the dark one"
    assert not [h for h in HEX.findall(page) if is_green("#" + h)], "a green colour in the page"


def test_report_html_shows_the_legend_once_above_the_attribution_table(report):
    page = report_html(report, figures(report))
    assert_sign_styles(page)
    legend = escape(palette.LEGEND)
    assert page.count(legend) == 1
    section = page.index("<h2>Direct logit attribution</h2>")
    assert section < page.index(legend) < page.index("<table", section)
    scores = [c.score for c in report.attribution.top(report.options.top_k)]
    assert ('class="pos"' in page) == any(s >= 0 for s in scores) and ('class="neg"' in page) == any(s < 0 for s in scores)


def test_patching_html_shows_the_patching_legend_once_above_its_tables(patching):
    page = patching_html(patching, {}, 5)
    assert_sign_styles(page)
    legend = escape(palette.PATCHING_LEGEND)
    assert page.count(legend) == 1
    assert page.index(legend) < page.index("<table")


# ---------------------------------------------------------------------------------------------
# PNGs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """Every figure a plot function saves, kept open for inspection (the function returns b"")."""
    saved = []

    def keep(fig, fmt="png"):
        saved.append(fig)
        return b""

    monkeypatch.setattr(plots, "_save", keep)
    yield saved
    import matplotlib.pyplot as plt

    for fig in saved:
        plt.close(fig)


def figure_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts] + [ax.get_ylabel() for ax in fig.axes] + [ax.get_title() for ax in fig.axes]


def test_diverging_heatmaps_use_the_palette_cmap_and_carry_the_legend(report, patching, drawn):
    plots.head_heatmap(report.attribution, report.spec)
    plots.patch_heatmap(patching, "heads")
    for fig, legend in zip(drawn, (palette.LEGEND, palette.PATCHING_LEGEND)):
        images = [im for ax in fig.axes for im in ax.get_images()]
        assert images and all(im.get_cmap().name == palette.DIVERGING_CMAP for im in images)
        lo, hi = images[0].get_clim()
        assert lo == -hi, "a diverging map is centred on 0"
        assert legend in figure_texts(fig)


def test_sign_coloured_bars_use_the_palette(report, drawn):
    import matplotlib.colors as mcolors

    plots.layer_bars(report.attribution, report.spec)
    (fig,) = drawn
    attn, mlp = report.attribution.layer_totals(report.spec.n_layers)
    bars = fig.axes[0].patches
    assert len(bars) == len(attn) + len(mlp)
    for bar, value in zip(bars, [*attn, *mlp]):
        assert mcolors.to_hex(bar.get_facecolor(), keep_alpha=False) == palette.sign_colour(value)
    assert palette.LEGEND in figure_texts(fig)


def test_head_heatmap_draws_a_positive_head_blue_and_a_negative_head_red(report, drawn):
    """Render the heatmap and read the pixel at the strongest head's cell; flipping every score must flip its colour."""
    a = report.attribution
    flipped = replace(a, components=tuple(replace(c, score=-c.score) for c in a.components), value=-a.value)
    heads = a.head_matrix(report.spec.n_layers, report.spec.n_heads)
    layer, head = np.unravel_index(np.nanargmax(np.abs(heads)), heads.shape)
    strongest = float(heads[layer, head])
    seen = {}
    for attribution, score in ((a, strongest), (flipped, -strongest)):
        plots.head_heatmap(attribution, report.spec)
        fig = drawn[-1]
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
        x, y = fig.axes[0].transData.transform((head, layer))
        seen["positive" if score > 0 else "negative"] = pixels[pixels.shape[0] - int(round(y)), int(round(x))]
    assert blue_dominant(seen["positive"]), f"a strongly positive head is drawn {seen['positive']}, not blue"
    assert red_dominant(seen["negative"]), f"a strongly negative head is drawn {seen['negative']}, not red"


def test_head_heatmap_png_decodes(report):
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(plots.head_heatmap(report.attribution, report.spec)), format="png")
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 50


# ---------------------------------------------------------------------------------------------
# the console
# ---------------------------------------------------------------------------------------------


def test_console_scores_use_the_palette(report, patching):
    table = console.attribution_table(report.attribution, 6)
    scores = [c.score for c in report.attribution.top(6)]
    cells = table.columns[2]._cells
    assert [str(cell.style) for cell in cells] == [palette.sign_colour(s, dark=True) for s in scores]
    assert {str(cell.style) for cell in table.columns[4]._cells} <= {palette.POSITIVE_DARK, palette.NEGATIVE_DARK}

    from rich.console import Console

    out = Console(file=io.StringIO(), record=True, color_system="truecolor", width=200)
    console.render_patching(patching, out, 5)
    rendered = out.export_text(styles=True)
    expected = {palette.sign_colour(p.score, dark=True) for sweep in patching.sweeps for p in patching.top(5, sweep)}
    for colour in expected:
        r, g, b = rgb(colour)
        assert f"38;2;{r};{g};{b}" in rendered, f"patching scores not drawn in {colour}"
