"""Debugger speed figures (run by hand: `python benchmarks/bench_debug.py [--repeats N]`).

On the embedded model (30 layers x 9 heads) and the IOI prompt (14 tokens), one ``Session`` driven
through ``hexray.debugger.commands.execute`` exactly as the REPL and ``-x`` scripts drive it:

- navigation over the recording (``step``, ``next``, ``reverse-step``, ``continue`` to a
  breakpoint, plain and with a condition): each from the same stop, the stop reset untimed;
- reading (``print L23H3``, ``print lens``, ``backtrace``) at the stop of L23H3;
- edit-and-continue: ``set L23H3 = 0`` (re-runs blocks 23..29) and ``set L0H0 = 0`` (all 30),
  each undone untimed before the next repeat (``undo`` is timed on its own), against a full
  ``run`` of the prompt (record every hook point, then go to the first breakpoint).

Every figure is the median of ``--repeats`` (default 20) after one warm-up round; the commands are
timed round-robin (each once per round), so ratios compare figures taken side by side in this run.
The load average before and after is printed: other work on the machine shows there.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from hexray import load_model
from hexray.debugger.commands import execute
from hexray.debugger.session import Session
from hexray.tracing import sites

IOI = "When Mary and John went to the store, John gave a drink to"
REPEATS = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 20


def timed(session: Session, line: str, setup=None, after=None) -> float:
    """The wall time of one ``execute(session, line)``; ``setup``/``after`` run untimed around it."""
    if setup:
        setup()
    start = time.perf_counter()
    execute(session, line)
    elapsed = time.perf_counter() - start
    if after:
        after()
    return elapsed


def load() -> str:
    with open("/proc/loadavg") as f:  # Linux; what else the machine was doing
        return " ".join(f.read().split()[:3])


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(0)
    model = load_model()
    spec = model.spec
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"model {model.name}: {spec.n_layers} layers x {spec.n_heads} heads; prompt {IOI!r}; median of {REPEATS}")

    session = Session(model)
    execute(session, f"run {IOI}")
    print(f"{len(session.ids)} tokens; {len(session.stops)} stops; {len(session.hooks)} hooks recorded")
    at_l23 = session.stops.index(sites.head_z(23))  # where L23H3 stops (its layer's head outputs)

    def go(index: int, breaks: tuple[str, ...] = ()):
        def setup():
            execute(session, "delete")
            for where in breaks:
                execute(session, f"break {where}")
            session.cursor = index
        return setup

    undo = lambda: execute(session, "undo")  # noqa: E731
    redo = lambda: (go(at_l23)(), execute(session, "set L23H3 = 0"))  # noqa: E731
    cases = [  # (label, command, untimed setup, untimed clean-up)
        ("step", "step", go(at_l23), None),
        ("next", "next", go(at_l23), None),
        ("reverse-step", "reverse-step", go(at_l23), None),
        ("print L23H3", "print L23H3", go(at_l23), None),
        ("print lens", "print lens", go(at_l23), None),
        ("backtrace", "backtrace", go(at_l23), None),
        ("continue (to break L23H3)", "continue", go(0, ("L23H3",)), None),
        ("continue (to break L23H3 if attn[-1, 4] > 0.0)", "continue", go(0, ("L23H3 if attn[-1, 4] > 0.0",)), None),
        ("set L23H3 = 0 (re-runs blocks 23..29)", "set L23H3 = 0", go(at_l23), undo),
        ("set L0H0 = 0 (re-runs blocks 0..29)", "set L0H0 = 0", go(at_l23), undo),
        ("undo (of set L23H3 = 0)", "undo", redo, None),
        ("run (the full recorded pass)", f"run {IOI}", go(at_l23), None),
    ]
    # round-robin: every repeat times each command once, so a busy spell slows them all alike
    times: dict[str, list[float]] = {label: [] for label, *_ in cases}
    print(f"load average before: {load()}")
    for i in range(REPEATS + 1):  # the first round is a warm-up
        for label, line, setup, after in cases:
            elapsed = timed(session, line, setup, after)
            if i:
                times[label].append(elapsed)
    print(f"load average after:  {load()}")
    rows = [(label, 1000 * statistics.median(times[label])) for label, *_ in cases]
    ms = dict(rows)
    t_l23, t_l0, t_run = ms["set L23H3 = 0 (re-runs blocks 23..29)"], ms["set L0H0 = 0 (re-runs blocks 0..29)"], ms["run (the full recorded pass)"]

    width = max(len(name) for name, _ in rows)
    print(f"{'command':<{width}}  {'ms':>9}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:9.2f}")
    blocks = spec.n_layers - 23
    print(f"set L23H3 = 0 / run = {t_l23 / t_run:.2f}  ({blocks} of {spec.n_layers} blocks: {blocks / spec.n_layers:.2f})")
    print(f"set L0H0 = 0  / run = {t_l0 / t_run:.2f}")


if __name__ == "__main__":
    main()
