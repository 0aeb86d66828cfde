"""``hexray debug``: breakpoints, stepping both ways, edits and scripts, on the tiny random models.

References are independent of the debugger: the Hugging Face model's own forward pass (with hooks
of the test's own), and ``hexray ablate``'s edit runner for an edit-and-continue.
"""

from __future__ import annotations

import json

import pytest
import torch

from hexray.debugger.commands import execute
from hexray.debugger.repl import run_script
from hexray.debugger.session import LOGITS, Session
from hexray.errors import HexRayError
from hexray.intervene.ablation import ablate
from hexray.tracing import sites

PROMPT = "When Mary and John went to the store, John gave a drink to"
OTHER = "When Mary and John went to the store, Mary gave a drink to"  # the same token length


@pytest.fixture
def session(tiny_model):
    return Session(tiny_model)


def _hf_run(hf, ids, hooks=()):
    """The HF model's own logits [pos, vocab], with forward hooks (module, fn) of the test's own."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in handles:
            h.remove()


def test_a_breakpoint_stops_at_its_hook_and_continue_reaches_the_prediction(session, tiny_model, tiny_hf_model):
    execute(session, "break L1H0")
    reply = execute(session, f"run {PROMPT}")
    assert reply.data["stop"] == str(sites.head_z(1)) and reply.data["breakpoints"] == [1]
    assert "breakpoint 1, L1H0" in reply.text
    done = execute(session, "continue")
    assert done.data["stop"] == LOGITS
    expected = torch.softmax(_hf_run(tiny_hf_model, session.ids).logits[0, -1].double(), -1)
    top = done.data["prediction"]
    assert [t["id"] for t in top] == expected.topk(5).indices.tolist()
    assert [t["prob"] for t in top] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-5)


def test_a_conditional_breakpoint_stops_only_when_true(tiny_gpt2, tiny_hf_model):
    """``break L0N3 if > x``: the neuron's value at the last position, read from HF's own MLP activation."""
    if tiny_hf_model.config.model_type != "gpt2":
        pytest.skip("the reference reads GPT-2's MLP activation module")
    session = Session(tiny_gpt2)
    ids = session.model.encode(PROMPT)
    seen = {}
    out = _hf_run(tiny_hf_model, ids, [(tiny_hf_model.transformer.h[0].mlp.act, lambda m, i, o: seen.setdefault("post", o[0].clone()))])
    value = float(seen["post"][-1, 3])
    execute(session, f"break L0N3 if > {value + 1e-3}")
    assert execute(session, f"run {PROMPT}").data["stop"] == LOGITS  # false: never stopped
    execute(session, "delete")
    execute(session, f"break L0N3 if > {value - 1e-3}")
    reply = execute(session, f"run {PROMPT}")
    assert reply.data["stop"] == str(sites.mlp_post(0)) and reply.data["breakpoints"] == [2]
    # a head's pattern in the condition: attn[q, k] from HF's attentions
    weight = float(out.attentions[1][0, 0, -1, 0])
    execute(session, "delete")
    execute(session, f"break L1H0 if attn[-1, 0] < {weight - 1e-4}")
    assert execute(session, f"run {PROMPT}").data["stop"] == LOGITS
    execute(session, f"break L1H0 if attn[-1, 0] >= {weight - 1e-4}")
    assert execute(session, f"run {PROMPT}").data["stop"] == str(sites.head_z(1))


def test_reverse_steps_return_the_values_the_forward_steps_showed(session):
    execute(session, f"run {PROMPT}")  # no breakpoints: at the logits
    execute(session, "reverse-step 1000")  # back to the first stop
    assert session.cursor == 0
    forward = []
    while session.cursor < len(session.stops) - 1:
        execute(session, "step")
        forward.append((session.cursor, execute(session, "print lens").data))
    backward = []
    while session.cursor > 0:
        backward.append((session.cursor, execute(session, "print lens").data))
        execute(session, "reverse-step")
    assert backward == forward[::-1][: len(backward)] and len(backward) == len(forward)


def test_next_and_reverse_next_move_by_blocks(session):
    execute(session, f"run {PROMPT}")
    execute(session, "reverse-step 1000")
    assert execute(session, "next").data["stop"] == str(sites.resid_pre(1))
    assert execute(session, "next").data["stop"] == LOGITS  # two blocks: then the logits
    assert execute(session, "reverse-next").data["stop"] == str(sites.resid_pre(1))
    assert execute(session, "reverse-next").data["stop"] == str(sites.resid_pre(0))


def test_edit_and_continue_equals_hexray_ablate(session, tiny_model):
    execute(session, f"run {PROMPT}")
    before = execute(session, "print prediction").data["prediction"]
    edit = execute(session, "set L1H0 = 0")
    assert edit.data["rerun_from"] == 1
    after = execute(session, "finish").data["prediction"]
    reference = ablate(tiny_model, PROMPT, "L1H0", mode="zero", k=5)
    assert [t["token"] for t in after] == [t.token for t in reference.after.top]
    assert [t["prob"] for t in after] == pytest.approx([t.prob for t in reference.after.top], abs=1e-5)
    execute(session, "undo")
    assert execute(session, "print prediction").data["prediction"] == before  # undo gives the recording back


def test_a_patch_edit_matches_a_hooked_hf_run(session, tiny_hf_model):
    """``set MLP0 = patch OTHER``: MLP0's output from another prompt, against HF's forward with that output swapped in."""
    if tiny_hf_model.config.model_type != "gpt2":
        pytest.skip("the reference hooks GPT-2's MLP module")
    execute(session, f"run {PROMPT}")
    execute(session, f"set MLP0 = patch {OTHER}")
    got = torch.tensor([t["prob"] for t in execute(session, "finish").data["prediction"]])
    mlp = tiny_hf_model.transformer.h[0].mlp
    kept = {}
    _hf_run(tiny_hf_model, session.model.encode(OTHER), [(mlp, lambda m, i, o: kept.setdefault("out", o.clone()))])
    patched = _hf_run(tiny_hf_model, session.ids, [(mlp, lambda m, i, o: kept["out"])]).logits[0, -1]
    expected = torch.softmax(patched.double(), -1).topk(5).values.float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_an_edit_reruns_only_the_blocks_after_it(session, tiny_model):
    execute(session, f"run {PROMPT}")
    ran = []
    with tiny_model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", lambda x, hook: ran.append(hook.name)) for layer in range(2)]):
        execute(session, "set L1H0 *= 0.5")
    assert [name.split(".")[1] for name in ran] == ["1"]  # block 0 did not run again


def test_add_a_token_direction_to_the_stream(session, tiny_model):
    execute(session, f"run {PROMPT}")
    mary = tiny_model.single_token(" Mary") if len(tiny_model.encode(" Mary")) == 1 else None
    token = " Mary" if mary is not None else tiny_model.token_str(session.ids[-1])
    tid = tiny_model.single_token(token)
    logit = lambda: float(session.logits[-1, tid])  # noqa: E731
    plain = logit()
    execute(session, f"set RESID1@-1 += 20 * token({token!r})")
    assert logit() > plain  # pushing the stream toward the token raises its logit
    with pytest.raises(HexRayError, match="d_model"):
        execute(session, f"set L1H0 += 1 * token({token!r})")


def test_tbreak_watch_and_info(session):
    execute(session, "tbreak MLP0")
    execute(session, "break RESID1")
    execute(session, "watch MLP0")
    reply = execute(session, f"run {PROMPT}")
    assert reply.data["stop"] == str(sites.mlp_out(0)) and "MLP0" in reply.data["watch"]
    listed = execute(session, "info breakpoints").data["breakpoints"]
    assert [b["where"] for b in listed] == ["RESID1"]  # the temporary one is gone
    nxt = execute(session, "continue")
    assert nxt.data["stop"] == str(sites.resid_pre(1)) and nxt.data["watch"]["MLP0"] is not None


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("brek L1H0", "did you mean break"),
        ("continue", "nothing is running"),
        ("break L9H0", "out of range"),
        ("break L1H99", "out of range"),
        ("break blocks.0.hook_resid_prr", "did you mean blocks.0.hook_resid_pre"),
        ("break L1H0 if __import__('os')", "cannot use"),
        ("print L1H0", "nothing is running"),
    ],
)
def test_bad_input_is_one_line_and_the_debugger_goes_on(session, line, says):
    with pytest.raises(HexRayError) as info:
        execute(session, line)
    assert says in info.value.one_line() and "\n" not in info.value.one_line()


def test_edits_that_do_not_fit_are_refused(session):
    execute(session, f"run {PROMPT}")
    execute(session, "reverse-step 1000")
    for line, says in [("set L1H0 = patch The cat", "equal token length"), ("set L1H0 = banana", "not a number"),
                       ("print L1H0", "not computed yet"), ("set blocks.0.hook_resid_pre = 0", "not a hook")]:
        with pytest.raises(HexRayError) as info:
            execute(session, line)
        assert says in info.value.one_line(), line
    assert session.changes == []


def test_the_issue_script_runs_as_written_with_json(cli, tiny_model, tmp_path):
    """The script of the issue (with a head the tiny model has): one JSON object per command; the prediction after continue."""
    script = tmp_path / "ioi.hx"
    script.write_text(f"break L1H0\nrun {PROMPT}\nprint L1H0\nset L1H0 = 0\ncontinue\nquit\n")
    run = cli(tiny_model, "debug", "-x", script, "--json")
    assert run.code == 0, run.err
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [r["command"] for r in rows] == ["break L1H0", f"run {PROMPT}", "print L1H0", "set L1H0 = 0", "continue", "quit"]
    assert all(r["ok"] for r in rows)
    reference = ablate(tiny_model, PROMPT, "L1H0", mode="zero", k=5)
    assert [t["token"] for t in rows[4]["prediction"]] == [t.token for t in reference.after.top]
    text = cli(tiny_model, "debug", "-x", script)
    assert text.code == 0 and "(hexray) continue\nfinished: the prediction" in text.out


def test_a_script_with_a_mistake_goes_on_and_exits_2(cli, tiny_model, tmp_path):
    script = tmp_path / "bad.hx"
    script.write_text(f"brek L1H0\nrun {PROMPT}\nfinish\n")
    run = cli(tiny_model, "debug", "-x", script)
    assert run.code == 2
    assert "error: unknown command 'brek' (did you mean break? (help lists them))" in run.out
    assert "finished: the prediction" in run.out  # the commands after the mistake ran
    missing = cli("no-load", "debug", "-x", tmp_path / "nope.hx")
    assert missing.code == 2 and "cannot read" in missing.err and missing.err.count("\n") == 1


def test_run_script_skips_comments_and_blank_lines(session, capsys):
    code = run_script(session, ["# a comment", "", "help"], json_out=True)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r["command"] for r in rows] == ["help"] and "reverse-step" in rows[0]["text"]


def test_generate_matches_greedy_decoding_and_stops_on_a_token_breakpoint(session, tiny_model, tiny_hf_model):
    """Against a plain greedy loop over HF's own forward (never ``generate``: the bridge changes it)."""
    ids = tiny_model.encode(PROMPT)
    greedy = list(ids)
    for _ in range(4):
        greedy.append(int(_hf_run(tiny_hf_model, greedy).logits[0, -1].argmax()))
    made = [tiny_model.token_str(t) for t in greedy[len(ids):]]
    execute(session, f"run {PROMPT}")
    reply = execute(session, "generate 4")
    assert reply.data["generated"] == made and session.ids == greedy
    execute(session, f"run {PROMPT}")
    execute(session, f"break token {made[1]!r}")
    stopped = execute(session, "generate 4")
    assert stopped.data["stopped_on"] == made[1] and len(stopped.data["generated"]) == made.index(made[1]) + 1
    # the recording is the pass that made it: its last logits predict the token after it
    assert int(session.logits[-1].argmax()) == greedy[len(ids) + len(stopped.data["generated"])]
    with pytest.raises(HexRayError, match="unedited"):
        execute(session, "set L1H0 = 0")
        execute(session, "generate 1")


def test_a_plain_print_is_not_a_hit_and_a_failing_condition_stops_with_its_reason(session):
    execute(session, "break L1H0")
    execute(session, f"run {PROMPT}")
    assert execute(session, "print").data["breakpoints"] == [1] and execute(session, "print").data["breakpoints"] == [1]
    assert [b["hits"] for b in execute(session, "info breakpoints").data["breakpoints"]] == [1]  # hit once, on arrival
    execute(session, "delete")
    execute(session, "break L1H0 if attn[-1, 999] > 0")  # no key 999: the condition cannot be read
    reply = execute(session, f"run {PROMPT}")
    assert reply.data["stop"] == str(sites.head_z(1)) and "error in breakpoint 2's condition" in reply.text
    assert execute(session, "continue").data["stop"] == LOGITS  # and continue goes past it
