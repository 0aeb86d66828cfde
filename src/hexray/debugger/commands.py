"""The debugger's commands: one table of names, aliases, help and handlers, shared by the REPL and scripts."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass

from hexray.debugger.session import Reply, Session
from hexray.errors import HexRayError


@dataclass(frozen=True)
class Command:
    name: str
    aliases: tuple[str, ...]
    usage: str
    help: str
    handle: Callable[[Session, str], Reply]


def _count(arg: str) -> int:
    if not arg.strip():
        return 1
    try:
        n = int(arg)
    except ValueError:
        raise HexRayError(f"{arg!r} is not a count", hint="e.g. step 3") from None
    if n < 1:
        raise HexRayError("the count must be positive")
    return n


def _numbers(arg: str) -> list[int]:
    try:
        return [int(x) for x in arg.replace(",", " ").split()]
    except ValueError:
        raise HexRayError(f"breakpoint numbers, not {arg!r}", hint="delete 2, or delete for all") from None


def _info(session: Session, arg: str) -> Reply:
    what = arg.strip()
    table = {"breakpoints": session.info_breakpoints, "b": session.info_breakpoints, "edits": session.info_edits,
             "watch": lambda: Reply("\n".join(session._watch_line(w)[0].strip() for w in session.watches) or "no watches")}
    if what not in table:
        raise HexRayError(f"info {what}?", hint="info breakpoints, info edits or info watch")
    return table[what]()


def _position(session: Session, arg: str) -> Reply:
    if not arg.strip():
        return Reply(f"position {session.position}", {"position": session.position})
    try:
        session.position = int(arg)
    except ValueError:
        raise HexRayError(f"position {arg!r} is not a number", hint="e.g. position -1 (the last token)") from None
    if session.prompt is not None:
        session._pos()  # out of range for the running prompt: say so now
    return Reply(f"reading position {session.position}", {"position": session.position})


def _run(session: Session, arg: str) -> Reply:
    prompt = arg.strip() or session.prompt
    if not prompt:
        raise HexRayError("run what?", hint="run PROMPT (or start with hexray debug --prompt ...)")
    return session.run(prompt)


def _help(session: Session, arg: str) -> Reply:
    if arg.strip():
        command = find(arg.strip())
        return Reply(f"{command.usage}\n  {command.help}" + (f"\n  aliases: {', '.join(command.aliases)}" if command.aliases else ""))
    width = max(len(c.usage) for c in COMMANDS)
    return Reply("\n".join(f"{c.usage:<{width}}  {c.help}" for c in COMMANDS))


COMMANDS: tuple[Command, ...] = (
    Command("run", ("r",), "run [PROMPT]", "record the forward pass on PROMPT (or the last one) and stop at the first breakpoint", _run),
    Command("continue", ("c", "cont"), "continue", "go on to the next breakpoint, or to the logits", lambda s, a: s.cont()),
    Command("step", ("s",), "step [N]", "to the next hook point (N of them)", lambda s, a: s.step(_count(a))),
    Command("next", ("n",), "next", "to the start of the next block", lambda s, a: s.next()),
    Command("finish", ("fin",), "finish", "to the logits: the prediction", lambda s, a: s.finish()),
    Command("reverse-step", ("rs",), "reverse-step [N]", "back one hook point (N of them): the recorded values, unchanged", lambda s, a: s.reverse_step(_count(a))),
    Command("reverse-next", ("rn",), "reverse-next", "back to the start of this block, or of the one before", lambda s, a: s.reverse_next()),
    Command("break", ("b",), "break WHERE [if COND] | break token T", "stop at L9H6, MLP10, L10N1234, RESID12 (resid.12) or a hook; COND e.g. > 3.0, attn[-1, 4] > 0.5; break token ' Mary' stops generate", lambda s, a: s.add_break(a)),
    Command("generate", ("gen",), "generate [N]", "greedy tokens after the prompt, one recorded pass each; stops at a token breakpoint", lambda s, a: s.generate(_count(a))),
    Command("tbreak", ("tb",), "tbreak WHERE [if COND]", "a breakpoint that deletes itself when hit", lambda s, a: s.add_break(a, temporary=True)),
    Command("delete", ("d",), "delete [N ...]", "delete breakpoints N (all without N)", lambda s, a: s.delete(_numbers(a))),
    Command("info", ("i",), "info breakpoints|edits|watch", "list breakpoints, edits or watches", _info),
    Command("print", ("p",), "print [WHERE|lens|backtrace|prediction]", "a component, hook or the stream here (lens), at the position", lambda s, a: s.print_(a)),
    Command("backtrace", ("bt",), "backtrace", "what the components written so far add to the prediction's logit", lambda s, a: s.backtrace()),
    Command("set", (), "set WHERE = 0 | *= K | += K * token(' T') | = patch PROMPT", "edit a component (WHERE@P for one position) and re-run from its block", lambda s, a: s.set_(a)),
    Command("undo", ("u",), "undo", "take back the last edit", lambda s, a: s.undo()),
    Command("watch", ("display",), "watch WHERE", "show WHERE's value at every stop", lambda s, a: s.watch(a)),
    Command("position", ("pos",), "position [P]", "the position prints and conditions read (default -1, the last token)", _position),
    Command("help", ("h", "?"), "help [COMMAND]", "this list, or one command's help", _help),
    Command("quit", ("q", "exit"), "quit", "leave the debugger", lambda s, a: Reply("bye", {"quit": True})),
)
_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}


def find(word: str) -> Command:
    command = _BY_NAME.get(word)
    if command is None:
        near = difflib.get_close_matches(word, list(_BY_NAME), n=1)
        raise HexRayError(f"unknown command {word!r}", hint=f"did you mean {near[0]}? (help lists them)" if near else "help lists the commands")
    return command


def execute(session: Session, line: str) -> Reply:
    """One line: a command and its argument. A user's mistake raises HexRayError (the caller prints it and goes on)."""
    word, _, arg = line.strip().partition(" ")
    return find(word).handle(session, arg)


def as_json(line: str, reply: Reply | None, error: HexRayError | None) -> str:
    if error is not None:
        return json.dumps({"command": line, "ok": False, "error": error.message, "hint": error.hint}, allow_nan=False)
    return json.dumps({"command": line, "ok": True, "text": reply.text, **reply.data}, allow_nan=False, default=str)


def completions(session: Session) -> list[str]:
    """Every command name and every component and hook name of the model: what the REPL completes."""
    spec = session.model.spec
    words = sorted(_BY_NAME) + ["breakpoints", "edits", "lens", "backtrace", "prediction", "patch", "token("]
    for layer in range(spec.n_layers):
        words += [f"L{layer}H{h}" for h in range(spec.n_heads)] + [f"MLP{layer}", f"RESID{layer}", f"resid.{layer}"]
    words += [str(s) for s in session.stops if s != "logits"]
    return words
