"""The one sign-colour convention of every HexRay view: the lab, the report PNGs, the HTML reports, the console.

A score is POSITIVE when it raises the explained value (a logit or logit difference) or, in
activation patching, restores the clean metric; NEGATIVE when it does the opposite. Positive is
BLUE and negative is RED everywhere, taken from ColorBrewer's RdBu: a diverging palette that stays
readable under the common colour-vision deficiencies (red-green confusion, i.e. protanopia and
deuteranopia, hits green/red pairs, not blue/red), and the palette matplotlib's "RdBu" colormap
already draws (low values red, high values blue). One convention everywhere means a blue cell in
the lab, a blue bar in a PNG and a blue number in a report all say the same thing.

The light values are for light backgrounds (PNGs, the light themes), the dark values for dark
ones. ``src/hexray/server/static/lab.css`` spells the same values as ``--pos``/``--neg``
(tests/unit/test_palette.py keeps the two in step).
"""

from __future__ import annotations

POSITIVE = "#2166ac"  # RdBu dark blue, on light backgrounds
NEGATIVE = "#b2182b"  # RdBu dark red, on light backgrounds
POSITIVE_DARK = "#4393c3"  # RdBu mid blue, on dark backgrounds
NEGATIVE_DARK = "#d6604d"  # RdBu mid red, on dark backgrounds

UNSIGNED = "#7f7f7f"  # an unsigned quantity drawn beside signed ones (attention weights): grey, never blue or red
SELECTION = "#b7791f"  # the marked position (lab.css --sel), on light backgrounds: amber, outside the sign colours
SELECTION_DARK = "#ffd166"  # the same on dark backgrounds

DIVERGING_CMAP = "RdBu"  # matplotlib colormap for signed heatmaps, centred on 0: high values blue

LEGEND = "blue: raises the explained value · red: lowers it"
PATCHING_LEGEND = "blue: restores the clean metric · red: moves it away"
WEIGHT_LEGEND = "blue: positive weight · red: negative weight"


def sign_colour(score: float, *, dark: bool = False) -> str:
    """The colour of ``score``: POSITIVE at zero and above, NEGATIVE below (the ``_DARK`` pair if ``dark``)."""
    if dark:
        return POSITIVE_DARK if score >= 0 else NEGATIVE_DARK
    return POSITIVE if score >= 0 else NEGATIVE
