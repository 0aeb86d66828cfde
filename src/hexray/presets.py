"""Prompt presets: well-studied tasks with a prompt, a corrupted twin and the circuit the literature expects.

The CLI's ``--preset NAME`` and the web lab's preset menu both read :data:`PRESETS`. Every
target and contrast is a single token for the embedded SmolLM2-135M-Instruct, which splits
numbers into single digits (so the number tasks end on a digit and predict the next one).
``clean`` and ``corrupt`` have the same token length, as exact patching needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexray.errors import HexRayError
from hexray.options import spoken_list


@dataclass(frozen=True)
class Preset:
    """One task: what to run, what to compare it with, and what a circuit for it usually looks like."""

    name: str  # what --preset takes
    title: str
    prompt: str  # for trace, ablate, heads and generate (the same text as ``clean``)
    target: str | None  # one token; None lets the command pick the prediction
    contrast: str | None  # one token; None: no logit difference
    clean: str  # patch: the prompt with the behaviour
    corrupt: str  # patch: the same prompt with the behaviour broken
    components: str  # ablate: comma-separated components ("" when there is no measured set)
    expected: str  # one line: the circuit the literature expects for this task


_IOI = "When Mary and John went to the store, John gave a drink to"
_INDUCTION = "The lamp glowed. Kexi Morb plays the drum. The lamp glowed. Kexi Morb plays the"
_FACTUAL = "The capital of France is"
_GREATER_THAN = "The war lasted from the year 1732 to the year 17"
_DUPLICATE_TOKEN = "Say it again: banana, banana, banana, banana,"
# "12 + 7 =" makes SmolLM2 predict a space, and 19 and 17 share their first digit: the prompt ends
# on the tens digit so the next token is the units digit, where the sum shows.
_ARITHMETIC = "What is 12 + 7? The answer is 1"

PRESETS: tuple[Preset, ...] = (
    Preset(
        name="ioi",
        title="Indirect object identification",
        prompt=_IOI,
        target=" Mary",
        contrast=" John",
        clean=_IOI,
        corrupt="When Mary and John went to the store, Mary gave a drink to",
        components="L23H3, L29H1, L20H0",
        expected="duplicate-token and induction heads flag the name that occurs twice (John), S-inhibition heads pass that on and suppress it at the end, and late name-mover heads copy the other name (Mary) to the output",
    ),
    Preset(
        name="induction",
        title="Induction (repeated sequence)",
        prompt=_INDUCTION,
        target=" drum",
        contrast=" harp",
        clean=_INDUCTION,
        corrupt="The lamp glowed. Kexi Morb plays the harp. The lamp glowed. Kexi Morb plays the",
        components="",
        expected="a previous-token head in an early layer tags each token with the one before it, and an induction head at the second 'plays the' attends to the token after the first one (' drum') and copies it",
    ),
    Preset(
        name="factual",
        title="Factual recall",
        prompt=_FACTUAL,
        target=" Paris",
        contrast=" Rome",
        clean=_FACTUAL,
        corrupt="The capital of Italy is",
        components="",
        expected="early-to-mid MLPs at the subject's last token (' France') look up facts about it, and attention heads in later layers move the asked-for attribute (' Paris') from the subject to the last position",
    ),
    Preset(
        name="greater-than",
        title="Greater-than (years)",
        prompt=_GREATER_THAN,
        target="3",
        contrast="1",
        clean=_GREATER_THAN,
        corrupt="The war lasted from the year 1701 to the year 17",
        components="",
        expected="mid-layer attention heads at the last position attend to the start year's digits, and later MLPs raise the digits that make a later year and lower the smaller ones (here the next token is the end year's tens digit)",
    ),
    Preset(
        name="duplicate-token",
        title="Duplicate token (repeated word)",
        prompt=_DUPLICATE_TOKEN,
        target=" banana",
        contrast=None,
        clean=_DUPLICATE_TOKEN,
        corrupt="Say it again: banana, cherry, mango, lemon,",
        components="",
        expected="duplicate-token heads attend from each ' banana' to its earlier copies, and copying heads in later layers raise the repeated word as the next token; with the repeat broken there is nothing to copy",
    ),
    Preset(
        name="arithmetic",
        title="Two-number addition",
        prompt=_ARITHMETIC,
        target="9",
        contrast="7",
        clean=_ARITHMETIC,
        corrupt="What is 12 + 5? The answer is 1",
        components="",
        expected="attention heads bring the operands (12 and 7) to the last position, and MLPs in the middle and late layers turn them into the sum's units digit",
    ),
)


def preset_names() -> tuple[str, ...]:
    return tuple(p.name for p in PRESETS)


def preset(name: str) -> Preset:
    """The preset called ``name``; a HexRayError naming the valid ones for any other name."""
    for candidate in PRESETS:
        if candidate.name == name:
            return candidate
    raise HexRayError(f"unknown preset {name!r}", hint=f"use {spoken_list(preset_names())}", field="preset")
