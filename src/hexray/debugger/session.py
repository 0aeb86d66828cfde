"""A debugging session over one recorded forward pass: breakpoints, stepping both ways, edits.

``run`` makes one pass and records every hook point the debugger can stop at, in execution order
(per block: the stream entering it, the attention pattern, the heads' outputs, the attention
output, the MLP neurons, the MLP output, the stream leaving it; then the logits). Stepping and
continuing only move a cursor through that recording, so going back is as cheap as going on and
returns the same values. An edit (``set``) re-runs the pass from the edited block onward, from the
recorded stream entering it (:func:`hexray.tracing.engine.run_recorded`).

Every command returns a :class:`Reply`; the REPL prints its text, ``--json`` its data.
"""

from __future__ import annotations

import ast
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution
from hexray.analysis.lens import lens_logits
from hexray.errors import HexRayError
from hexray.models.loading import LoadedModel
from hexray.tracing import sites
from hexray.tracing.edits import Edit, site_mask
from hexray.tracing.engine import Trace, resolve_position, run_recorded, tokenize_prompt
from hexray.tracing.sites import Component, Hook, component_hook, parse_component

POINTS = ("resid_pre", "pattern", "z", "attn_out", "mlp_post", "mlp_out", "resid_post")  # a block's hooks, in the order they run
LOGITS = "logits"  # the stop after the last block


@dataclass(frozen=True)
class Reply:
    """What a command says: lines for a person, data for ``--json``."""

    text: str
    data: dict = field(default_factory=dict)


@dataclass
class Breakpoint:
    number: int
    where: Component | Hook  # a component stops at its hook; a hook point at itself
    hook: Hook
    condition: str | None = None
    temporary: bool = False
    hits: int = 0

    @property
    def label(self) -> str:
        return self.where.name if isinstance(self.where, Component) else str(self.where)


@dataclass
class TokenBreak:
    """Stop ``generate`` when it makes ``text``."""

    number: int
    text: str
    hits: int = 0


@dataclass(frozen=True)
class Change:
    """One ``set``: what was edited, how, and the edit the pass applies."""

    text: str
    edit: Edit
    layer: int


class Session:
    """The debugger's state: a model, the recorded pass, the cursor, breakpoints, watches and edits."""

    def __init__(self, model: LoadedModel):
        self.model = model
        spec = model.spec
        self.stops: list[Hook | str] = [Hook(p, layer) for layer in range(spec.n_layers) for p in POINTS] + [LOGITS]
        self.hooks = sorted({h for h in self.stops if h != LOGITS} | {sites.parse_hook(h) for h in attribution_hooks(spec, "head")})
        self.breakpoints: list[Breakpoint] = []
        self.token_breaks: list[TokenBreak] = []
        self.condition_errors: dict[int, str] = {}  # breakpoint -> why its condition failed where it stopped
        self.watches: list[Component | Hook] = []
        self.changes: list[Change] = []
        self.next_number = 1
        self.prompt: str | None = None
        self.ids: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        self.acts: dict[Hook, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self.first_prediction: int | None = None  # the unedited run's prediction: what edits are measured against
        self.cursor = -1  # index into stops; -1: not started
        self.position = -1  # the position prints and conditions read (negative: from the end)

    # -- running ---------------------------------------------------------------------------------

    def run(self, prompt: str) -> Reply:
        """Record the pass on ``prompt`` (edits are cleared: they belong to a prompt) and go to the first breakpoint."""
        ids, offsets = tokenize_prompt(self.model, prompt)
        logits, acts = run_recorded(self.model, ids, self.hooks)
        self.prompt, self.ids, self.offsets, self.logits, self.acts = prompt, ids, offsets, logits, acts
        self.changes = []
        self.first_prediction = int(logits[-1].argmax())
        self.cursor = -1
        for bp in self.breakpoints:
            bp.hits = 0
        return self._go(self._next_break(0), f"running {len(ids)} tokens")

    def cont(self) -> Reply:
        self._running()
        return self._go(self._next_break(self.cursor + 1))

    def step(self, count: int = 1) -> Reply:
        self._running()
        return self._go(min(self.cursor + count, len(self.stops) - 1))

    def next(self) -> Reply:
        """To the start of the next block (or the logits)."""
        self._running()
        here = self._layer_of(self.cursor)
        target = next((i for i, s in enumerate(self.stops) if s == LOGITS or (s.point == "resid_pre" and s.layer > here)), len(self.stops) - 1)
        return self._go(target)

    def finish(self) -> Reply:
        self._running()
        return self._go(len(self.stops) - 1)

    def reverse_step(self, count: int = 1) -> Reply:
        self._running()
        return self._go(max(self.cursor - count, 0))

    def reverse_next(self) -> Reply:
        """Back to the start of this block, or of the one before when already there."""
        self._running()
        here = self.cursor
        starts = [i for i, s in enumerate(self.stops) if s != LOGITS and s.point == "resid_pre" and i < here]
        return self._go(starts[-1] if starts else 0)

    def _running(self) -> None:
        if self.prompt is None:
            raise HexRayError("nothing is running", hint="run PROMPT first")

    def _layer_of(self, index: int) -> int:
        stop = self.stops[index]
        return self.model.spec.n_layers if stop == LOGITS else stop.layer

    def _next_break(self, start: int) -> int:
        """The first stop from ``start`` where a breakpoint holds (its condition true), else the logits."""
        for i in range(start, len(self.stops)):
            for bp in self.breakpoints:
                if bp.hook == self.stops[i] and self._holds(bp):
                    return i
        return len(self.stops) - 1

    def _go(self, index: int, heading: str | None = None, *, arrive: bool = True) -> Reply:
        """Move to stop ``index`` and say where it is; ``arrive=False`` (a plain ``print``) counts no hit."""
        self.cursor = index
        stop = self.stops[index]
        lines = [heading] if heading else []
        data: dict[str, Any] = {"stop": str(stop), "index": index}
        hit = [bp for bp in self.breakpoints if bp.hook == stop and self._holds(bp)]
        for bp in hit:
            bp.hits += arrive
            lines.append(f"breakpoint {bp.number}, {bp.label}" + (f" if {bp.condition}" if bp.condition else "") + f" (hit {bp.hits})")
            if bp.number in self.condition_errors:
                lines.append(f"error in breakpoint {bp.number}'s condition: {self.condition_errors.pop(bp.number)} (stopped here)")
        data["breakpoints"] = [bp.number for bp in hit]
        if arrive:
            self.breakpoints = [bp for bp in self.breakpoints if not (bp.temporary and bp in hit)]
        if stop == LOGITS:
            top = self._prediction()
            lines.append("finished: the prediction " + ", ".join(f"{t!r} {p:.3f}" for t, p, _ in top))
            data["prediction"] = [{"token": t, "prob": round(p, 6), "id": i} for t, p, i in top]
        else:
            lines.append(f"stopped at {stop} ({self._describe_stop(stop)})")
        for w in self.watches:
            line, value = self._watch_line(w)
            lines.append(line)
            data.setdefault("watch", {})[w.name if isinstance(w, Component) else str(w)] = value
        return Reply("\n".join(lines), data)

    def _describe_stop(self, stop: Hook) -> str:
        return {"resid_pre": f"the stream entering block {stop.layer}", "pattern": f"layer {stop.layer}'s attention patterns",
                "z": f"layer {stop.layer}'s head outputs (L{stop.layer}H*)", "attn_out": f"layer {stop.layer}'s attention output",
                "mlp_post": f"layer {stop.layer}'s MLP neurons (L{stop.layer}N*)", "mlp_out": f"MLP{stop.layer}'s output",
                "resid_post": f"the stream leaving block {stop.layer}"}[stop.point]

    def _prediction(self, k: int = 5) -> list[tuple[str, float, int]]:
        probs = torch.softmax(self.logits[self._pos()].double(), -1)
        top_p, top_i = probs.topk(k)
        return [(self.model.token_str(int(i)), float(p), int(i)) for p, i in zip(top_p, top_i)]

    def _pos(self) -> int:
        return resolve_position(self.position, len(self.ids), field_name="position")

    def generate(self, count: int) -> Reply:
        """Greedy tokens after the prompt, one recorded pass each; a token breakpoint stops on the pass that made it.

        After a stop (or the last token) the recording is that pass, on the prompt and the tokens
        so far, at its logits: reverse-step shows how the token formed.
        """
        self._running()
        if self.changes:
            raise HexRayError("generate runs the model unedited", hint="undo the edits first (info edits lists them)")
        made = []
        for _ in range(count):
            token = int(self.logits[-1].argmax())
            made.append(self.model.token_str(token))
            self.ids = self.ids + [token]
            self.logits, self.acts = run_recorded(self.model, self.ids, self.hooks)
            self.prompt = self.model.tokenizer.decode(self.ids)
            hit = [t for t in self.token_breaks if t.text == made[-1]]
            if hit:
                for t in hit:
                    t.hits += 1
                break
        self.offsets = [(0, 0)] * len(self.ids)  # the prompt's text is now the decoded tokens
        self.cursor = len(self.stops) - 2  # the last block's stream: one step before the next prediction
        stopped = f"token breakpoint on {made[-1]!r}: " if hit else ""
        return Reply(f"{stopped}generated {''.join(made)!r} ({len(made)} token{'s' if len(made) != 1 else ''}); "
                     f"now at the pass that made the last one ({len(self.ids)} tokens); reverse-step to see it form",
                     {"generated": made, "stopped_on": made[-1] if hit else None, "tokens": len(self.ids)})

    def break_on_token(self, text: str) -> Reply:
        token = ast.literal_eval(text.strip()) if text.strip()[:1] in "'\"" else text.strip()
        self.model.single_token(token)  # one token, or a clear error
        bp = TokenBreak(self.next_number, token)
        self.next_number += 1
        self.token_breaks.append(bp)
        return Reply(f"breakpoint {bp.number} on generating {token!r}", {"breakpoint": bp.number, "token": token})

    # -- breakpoints and watches -----------------------------------------------------------------

    def add_break(self, spec: str, *, temporary: bool = False) -> Reply:
        if spec.strip().startswith("token "):
            return self.break_on_token(spec.strip()[6:])
        where_text, _, condition = spec.partition(" if ")
        where = self.parse_where(where_text)
        hook = component_hook(where) if isinstance(where, Component) else where
        condition = condition.strip() or None
        if condition is not None:
            condition = _expand(condition)
            _check_expression(condition)
        bp = Breakpoint(self.next_number, where, hook, condition, temporary)
        self.next_number += 1
        self.breakpoints.append(bp)
        return Reply(f"{'temporary ' if temporary else ''}breakpoint {bp.number} at {bp.label} ({hook})" + (f" if {condition}" if condition else ""),
                     {"breakpoint": bp.number, "hook": str(hook), "condition": condition})

    def delete(self, numbers: list[int]) -> Reply:
        if not numbers:
            gone, self.breakpoints, self.token_breaks = self.breakpoints + self.token_breaks, [], []
        else:
            known = {bp.number for bp in self.breakpoints + self.token_breaks}
            missing = [n for n in numbers if n not in known]
            if missing:
                raise HexRayError(f"no breakpoint {missing[0]}", hint="info breakpoints lists them")
            gone = [bp for bp in self.breakpoints + self.token_breaks if bp.number in numbers]
            self.breakpoints = [bp for bp in self.breakpoints if bp.number not in numbers]
            self.token_breaks = [bp for bp in self.token_breaks if bp.number not in numbers]
        return Reply(f"deleted {len(gone)} breakpoint{'s' if len(gone) != 1 else ''}", {"deleted": [bp.number for bp in gone]})

    def info_breakpoints(self) -> Reply:
        if not self.breakpoints and not self.token_breaks:
            return Reply("no breakpoints", {"breakpoints": []})
        rows = [f"{bp.number:>3}  {'tbreak' if bp.temporary else 'break ':6}  {bp.label:<12} {bp.hook}" + (f"  if {bp.condition}" if bp.condition else "") + f"  (hit {bp.hits})"
                for bp in self.breakpoints]
        rows += [f"{t.number:>3}  break   token {t.text!r}  (hit {t.hits})" for t in self.token_breaks]
        return Reply("\n".join(rows), {"breakpoints": [{"number": bp.number, "where": bp.label, "hook": str(bp.hook), "condition": bp.condition,
                                                        "temporary": bp.temporary, "hits": bp.hits} for bp in self.breakpoints]
                                        + [{"number": t.number, "token": t.text, "hits": t.hits} for t in self.token_breaks]})

    def watch(self, spec: str) -> Reply:
        where = self.parse_where(spec)
        self.watches.append(where)
        return Reply(f"watching {spec.strip()} at every stop", {"watch": spec.strip()})

    def _watch_line(self, where: Component | Hook) -> tuple[str, float | None]:
        name = where.name if isinstance(where, Component) else str(where)
        if not self._computed(where):
            return f"  {name}: not computed yet", None
        value = self._value(where)
        return f"  {name} = {value:.4f}", round(value, 6)

    # -- reading ---------------------------------------------------------------------------------

    def parse_where(self, text: str) -> Component | Hook:
        """``L9H6``, ``MLP10``, ``L10N1234``, ``RESID12`` / ``resid.12``, or a TransformerLens hook name."""
        raw = text.strip()
        if not raw:
            raise HexRayError("where?", hint=f"name a component (L9H6, MLP10, L10N1234, RESID12) or a hook ({sites.resid_post(0)})")
        if raw.lower().startswith("resid."):
            raw = "RESID" + raw[6:]
        if "." in raw:  # a hook name (components never have a dot)
            hook = sites.parse_hook(raw)
            if hook not in self.stops:
                names = [str(s) for s in self.stops if s != LOGITS]
                near = difflib.get_close_matches(raw, names, n=1)
                layer0 = ", ".join(str(Hook(p, 0)) for p in POINTS)
                raise HexRayError(f"no stop at {raw!r}", hint=f"did you mean {near[0]}?" if near else f"each block's stops are, for block 0: {layer0}")
            return hook
        component = parse_component(raw, self.model.spec)
        if component.kind in ("embed", "bias"):
            raise HexRayError(f"{raw}: the debugger stops inside blocks", hint="break at RESID0 for the embeddings")
        if component.kind == "resid" and component.layer >= self.model.spec.n_layers:
            raise HexRayError(f"{raw}: the last stream is the output", hint="finish shows the prediction")
        return component

    def _computed(self, where: Component | Hook) -> bool:
        hook = component_hook(where) if isinstance(where, Component) else where
        return self.cursor >= 0 and self.stops.index(hook) <= self.cursor

    def _value(self, where: Component | Hook) -> float:
        """The scalar a watch and a condition's ``value`` read, at the debugger's position."""
        pos = self._pos()
        if isinstance(where, Component):
            act = self.acts[component_hook(where)][pos]
            if where.kind == "head":
                return float((act[where.head] @ self.model.W_O[where.layer][where.head]).norm())  # what it writes
            if where.kind == "neuron":
                return float(act[where.neuron])
            return float(act.norm())
        act = self.acts[where]
        return float(act[:, pos].norm() if where.point == "pattern" else act[pos].norm())

    def _holds(self, bp: Breakpoint) -> bool:
        """Whether ``bp`` stops here; a condition that cannot be evaluated stops too, and says why (as gdb does)."""
        if bp.condition is None:
            return True
        try:
            return bool(_evaluate(bp.condition, self._namespace(bp.where)))
        except HexRayError as exc:
            self.condition_errors[bp.number] = exc.one_line()
            return True

    def _namespace(self, where: Component | Hook) -> dict[str, Any]:
        ns: dict[str, Any] = {"value": self._value(where), "pos": self._pos()}
        if isinstance(where, Component) and where.kind == "head":
            ns["attn"] = self.acts[sites.attn_pattern(where.layer)][where.head].cpu().numpy()  # [q, k]
        hook = component_hook(where) if isinstance(where, Component) else where
        ns["act"] = self.acts[hook].cpu().numpy()
        return ns

    def print_(self, what: str) -> Reply:
        self._running()
        what = what.strip()
        if what in ("", "here"):
            return self._go(self.cursor, arrive=False)
        if what in ("lens", "resid"):
            return self._print_stream()
        if what in ("backtrace", "bt"):
            return self.backtrace()
        if what == "prediction":
            top = self._prediction()
            return Reply("the prediction " + ", ".join(f"{t!r} {p:.3f}" for t, p, _ in top), {"prediction": [{"token": t, "prob": p} for t, p, _ in top]})
        where = self.parse_where(what)
        if not self._computed(where):
            raise HexRayError(f"{what} is not computed yet (stopped at {self.stops[self.cursor]})", hint="continue, step or next to reach it")
        pos = self._pos()
        value = self._value(where)
        data: dict[str, Any] = {"where": what, "position": pos, "value": round(value, 6)}
        if isinstance(where, Component) and where.kind == "head":
            row = self.acts[sites.attn_pattern(where.layer)][where.head][pos]  # [k]
            top = row.topk(min(3, row.shape[0]))
            keys = [(int(k), self.model.token_str(self.ids[int(k)]), float(w)) for w, k in zip(top.values, top.indices)]
            data["top_keys"] = [{"key": k, "token": t, "weight": round(w, 6)} for k, t, w in keys]
            text = f"{where.name} at position {pos}: writes |{value:.4f}|, attends to " + ", ".join(f"{t!r} ({k}) {w:.3f}" for k, t, w in keys)
        elif isinstance(where, Component) and where.kind == "neuron":
            column = self.acts[component_hook(where)][:, where.neuron]
            best = int(column.argmax())
            data["max"] = {"position": best, "value": round(float(column[best]), 6)}
            text = f"{where.name} at position {pos} = {value:.4f} (largest {float(column[best]):.4f} at {best} {self.model.token_str(self.ids[best])!r})"
        else:
            text = f"{what} at position {pos}: |x| = {value:.4f}"
        return Reply(text, data)

    def _print_stream(self) -> Reply:
        """The residual stream here (the last one recorded at or before the cursor) through the logit lens."""
        here = [s for s in self.stops[: self.cursor + 1] if s != LOGITS and s.point in ("resid_pre", "resid_post")]
        if not here:
            raise HexRayError("no residual stream recorded yet", hint="step once")
        hook = here[-1]
        pos = self._pos()
        resid = self.acts[hook][pos]
        probs = torch.softmax(lens_logits(self.model, resid).double(), -1)
        top_p, top_i = probs.topk(5)
        top = [(self.model.token_str(int(i)), float(p)) for p, i in zip(top_p, top_i)]
        return Reply(f"{hook} at position {pos}: |resid| = {float(resid.norm()):.3f}; lens " + ", ".join(f"{t!r} {p:.3f}" for t, p in top),
                     {"hook": str(hook), "norm": round(float(resid.norm()), 6), "lens": [{"token": t, "prob": round(p, 6)} for t, p in top]})

    def backtrace(self, k: int = 10) -> Reply:
        """What the components written so far contribute to the prediction (DLA, the finished pass's final scale)."""
        self._running()
        trace = Trace(model_name=self.model.name, prompt=self.prompt, token_ids=tuple(self.ids), tokens=tuple(self.model.token_strs(self.ids)),
                      offsets=tuple(self.offsets), logits=self.logits, acts=self.acts)
        a = direct_logit_attribution(self.model, trace, position=self._pos(), target=self.first_prediction, granularity="head")
        def written(c: Component) -> bool:  # a head's output is in the stream once its layer's attention output is
            if c.kind in ("embed", "pos_embed"):
                return True
            if c.layer is None:
                return False
            return self._computed(sites.attn_out(c.layer) if c.kind == "head" else component_hook(c))

        written = [c for c in a.components if written(c.component)]
        total = sum(c.score for c in written)
        lines = [f"written so far into the logit of {a.target.token!r}: {total:+.3f} of {a.value:+.3f} (direct effects; the finished pass's final norm)"]
        lines += [f"  {c.name:<9} {c.score:+.3f}" for c in written[:k]]
        return Reply("\n".join(lines), {"target": a.target.token, "so_far": round(total, 6), "value": round(a.value, 6),
                                         "components": [{"name": c.name, "score": round(c.score, 6)} for c in written[:k]]})

    # -- edits -----------------------------------------------------------------------------------

    def set_(self, text: str) -> Reply:
        """``X = 0``, ``X *= 0.5``, ``X = patch PROMPT``, ``X += 3 * token(' Mary')``; ``X@P`` for one position."""
        self._running()
        for op in ("*=", "+=", "="):
            left, found, right = text.partition(op)
            if found:
                break
        else:
            raise HexRayError(f"set what? {text!r}", hint="set L23H3 = 0, set MLP10 *= 0.5, set RESID12 += 3 * token(' Mary'), set L9H6 = patch OTHER PROMPT")
        name, at, pos_text = left.strip().partition("@")
        where = self.parse_where(name)
        if not isinstance(where, Component):
            raise HexRayError(f"set edits a component, not a hook: {name.strip()}", hint="name it as L9H6, MLP10, L10N1234 or RESID12")
        position = None
        if at:
            try:
                position = resolve_position(int(pos_text), len(self.ids), field_name="position")
            except ValueError:
                raise HexRayError(f"{left.strip()}: position {pos_text!r} is not a number", hint="write e.g. L9H6@-1") from None
        hook = component_hook(where)
        current = self.acts[hook]
        mask = site_mask(where.unit, position, current.shape)
        right = right.strip()
        if op == "*=":
            values, edit_op, how = current * _number(right), "replace", f"scaled by {_number(right):g}"
        elif op == "+=":
            values, edit_op, how = self._direction(where, right, current.shape), "add", f"added {right}"
        elif right.startswith("patch "):
            values, edit_op, how = self._patch_values(hook, right[6:].strip()), "replace", f"patched from {right[6:].strip()!r}"
        else:
            values, edit_op, how = torch.full_like(current, _number(right)), "replace", f"set to {_number(right):g}"
        label = where.name + ("" if position is None else f"@{position}")
        change = Change(f"{label} {how}", Edit(hook, mask, values, op=edit_op), where.layer)
        before = self._prediction()
        self.changes.append(change)
        layers = self._rerun(change.layer)
        after = self._prediction()
        return Reply(f"{change.text}; re-ran blocks {change.layer}..{self.model.spec.n_layers - 1} ({layers} of {self.model.spec.n_layers}): "
                     f"prediction {before[0][0]!r} {before[0][1]:.3f} -> {after[0][0]!r} {after[0][1]:.3f}",
                     {"edit": change.text, "rerun_from": change.layer, "before": [{"token": t, "prob": round(p, 6)} for t, p, _ in before],
                      "after": [{"token": t, "prob": round(p, 6)} for t, p, _ in after]})

    def undo(self) -> Reply:
        self._running()
        if not self.changes:
            raise HexRayError("nothing to undo", hint="set makes an edit")
        change = self.changes.pop()
        self._rerun(change.layer)
        top = self._prediction()[0]
        return Reply(f"undid {change.text}; prediction {top[0]!r} {top[1]:.3f}", {"undone": change.text})

    def info_edits(self) -> Reply:
        return Reply("\n".join(f"{i + 1:>3}  {c.text}" for i, c in enumerate(self.changes)) or "no edits", {"edits": [c.text for c in self.changes]})

    def _rerun(self, start: int) -> int:
        """Re-run from block ``start`` with every edit (those before it are already in the recorded stream)."""
        resid = self.acts[sites.resid_post(start - 1)] if start > 0 else None  # what leaves the block before: untouched by edits from start on
        logits, acts = run_recorded(self.model, self.ids, self.hooks, edits=[c.edit for c in self.changes], start_layer=start, resid=resid)
        self.logits = logits
        self.acts = {**self.acts, **acts}  # blocks before ``start`` keep their recording
        return self.model.spec.n_layers - start

    def _direction(self, where: Component, text: str, shape: torch.Size) -> torch.Tensor:
        """``K * token(' Mary')``: K times the unit unembedding direction of a token, for a d_model vector."""
        if where.kind not in ("resid", "mlp"):
            raise HexRayError(f"+= adds a d_model vector, and {where.name} is not one", hint="add to RESIDn or MLPn, e.g. set RESID12 += 3 * token(' Mary')")
        scale_text, star, call = text.partition("*")
        if not star:
            scale_text, call = "1", text
        call = call.strip()
        if not (call.startswith("token(") and call.endswith(")")):
            raise HexRayError(f"cannot add {text!r}", hint="write K * token(' Mary')")
        token = ast.literal_eval(call[6:-1].strip())
        direction = self.model.W_U[:, self.model.single_token(token)].float()
        return (_number(scale_text.strip()) * direction / direction.norm()).expand(shape).clone()

    def _patch_values(self, hook: Hook, prompt: str) -> torch.Tensor:
        if len(prompt) >= 2 and prompt[0] == prompt[-1] and prompt[0] in "'\"":
            prompt = prompt[1:-1]
        ids, _ = tokenize_prompt(self.model, prompt, field_name="patch prompt")
        if len(ids) != len(self.ids):
            raise HexRayError(f"the patch prompt is {len(ids)} tokens and the running one {len(self.ids)}", hint="patching needs prompts of equal token length")
        _, acts = run_recorded(self.model, ids, [hook])
        return acts[hook]


# -- conditions: a small, safe expression language -------------------------------------------------

_ALLOWED = (ast.Expression, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Subscript, ast.Tuple,
            ast.Slice, ast.Call, ast.And, ast.Or, ast.Not, ast.Gt, ast.GtE, ast.Lt, ast.LtE, ast.Eq, ast.NotEq, ast.Add, ast.Sub, ast.Mult,
            ast.Div, ast.USub, ast.UAdd, ast.Pow)
_NAMES = {"value", "attn", "act", "pos", "abs", "max", "min"}


def _expand(condition: str) -> str:
    """``> 3.0`` is short for ``value > 3.0``."""
    return f"value {condition}" if condition[:1] in "<>=!" else condition


def _check_expression(text: str) -> ast.Expression:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise HexRayError(f"cannot read the condition {text!r}", hint="e.g. if > 3.0, or if attn[-1, 4] > 0.5") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Name) and node.id not in _NAMES):
            bad = node.id if isinstance(node, ast.Name) else type(node).__name__
            raise HexRayError(f"the condition cannot use {bad}", hint="use value, attn[q, k], act[...], pos, numbers, comparisons, and/or, abs/max/min")
    return tree


def _evaluate(text: str, namespace: dict[str, Any]) -> Any:
    tree = _check_expression(text)
    try:
        return eval(compile(tree, "<condition>", "eval"), {"__builtins__": {}}, {"abs": abs, "max": max, "min": min, **namespace})
    except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise HexRayError(f"the condition {text!r} failed: {exc}", hint="attn is [query, key]; act is the activation [pos, ...]") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise HexRayError(f"{text!r} is not a number", hint="e.g. set L9H6 = 0 or set L9H6 *= 0.5") from None
    if not math.isfinite(value):
        raise HexRayError(f"{text!r} is not a finite number")
    return value

