"""The ``hexray`` command line: a thin shell over :mod:`hexray.analysis` and :mod:`hexray.render`.

``hexray --prompt ...`` (the reference tool's form) is ``hexray trace --prompt ...``.
User mistakes surface as :class:`~hexray.errors.HexRayError`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hexray import warm
from hexray.errors import HexRayError, spell_indexed
from hexray.models.loading import load_model

app = typer.Typer(
    name="hexray",
    help="A debugger for transformer language models: see how a prediction forms, layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", envvar="HEXRAY_MODEL", help="Model: HF id, local folder, .gguf file, or an alias like gpt2-small. Default: the embedded SmolLM2-135M-Instruct.")]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="The text to run through the model.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]
ReportOpt = Annotated[Optional[str], typer.Option("--report", help="Folder for the PNG figures, hexray.json and index.html.")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="HEXRAY_DEVICE", help="cpu | cuda | cuda:N | mps | auto (CUDA, else MPS, else CPU).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", envvar="HEXRAY_DTYPE", help="float32 | bfloat16 | float16: what the model computes in (attribution accumulates in float32).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Take the prompt, target and contrast from a preset task (hexray presets lists them); a flag you give wins.")]

FIGURE_DEFAULT_REPORT = Path("hexray-report")

# fields that are not options of a capability, as the CLI spells them (errors name fields)
_FIXED_FLAGS = {"prompt": "--prompt", "clean": "--clean", "corrupt": "--corrupt", "components": "--components", "reference": "--reference", "prompts": "--prompts", "preset": "--preset"}
_flags: dict[str, str] = {}  # field -> flag of the command running now


def _flag_of(field: str) -> str:
    return _flags.get(field) or _FIXED_FLAGS.get(field) or "--" + field.replace("_", "-")


def _typer_param(option):
    """An Option as a typer parameter (its flag, help and default, from the one declaration)."""
    import inspect

    from hexray.options import base_type, is_optional

    if option.type == tuple[str, ...]:
        annotation, default = Optional[list[str]], None
    elif option.cli_unset or is_optional(option.type):
        annotation, default = Optional[base_type(option.type)], None if option.cli_unset else option.default
    else:
        annotation, default = option.type, option.default
    decls = [option.cli_flag] + ([option.short] if option.short else [])
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(*decls, help=option.help)])


def with_options(*groups):
    """Give a command the CLI flags of its options (``fn(..., **opts)`` receives them)."""
    import inspect
    import typing

    options = [o for group in groups for o in group if o.flag != ""]

    def wrap(fn):
        sig, hints = inspect.signature(fn), typing.get_type_hints(fn, include_extras=True)
        fixed = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        derived = [_typer_param(o) for o in options]
        fn.__signature__ = sig.replace(parameters=fixed + derived, return_annotation=None)
        fn.__annotations__ = {**hints, **{p.name: p.annotation for p in derived}}
        return fn

    return wrap


def _options(cls, given: dict, **overrides):
    """The capability's options from the CLI's values (unset ones take the declared default); validated."""
    from hexray.options import values

    _flags.update({o.name: o.cli_flag.split("/")[0] for o in cls.OPTIONS})
    picked = {k: v for k, v in values(cls.OPTIONS, given).items() if v is not None or not _unset(cls, k)}
    options = cls(**{**picked, **overrides})
    options.validate()
    return options


def _unset(cls, name: str) -> bool:
    return next(o for o in cls.OPTIONS if o.name == name).cli_unset


@app.callback()
def _root(
    server: Annotated[Optional[str], typer.Option("--server", envvar=warm.SERVER_ENV, help="Run the command on a warm `hexray serve` (its model already loaded): a URL, or auto for a local one (else a cold run here).")] = None,
) -> None:
    """A debugger for transformer language models: see how a prediction forms, layer by layer."""
    # hexray.warm.dispatch takes --server before typer sees the arguments; it is declared here for --help


def _console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); in a warm run, drawing on the client's terminal's terms."""
    served = warm.SERVED.get()
    return served.console(stderr) if served is not None else Console(stderr=stderr)


def _stderr() -> Console:
    return _console(stderr=True)


@contextmanager
def _status(message: str, quiet: bool):
    """A spinner on stderr for slow steps (silent when stderr is not a terminal)."""
    console = _stderr()
    if quiet or warm.SERVED.get() is not None or not console.is_terminal:  # a warm run's output is not live
        yield lambda _msg: None
        return
    with console.status(message) as status:
        yield lambda msg: status.update(msg)


def _load(model: str | None, quiet: bool, device: str = "cpu", dtype: str = "float32"):
    from hexray.models.loading import resolve_device, resolve_dtype

    resolve_device(device), resolve_dtype(dtype)  # a bad flag fails before a long load
    if (served := warm.SERVED.get()) is not None:  # a warm run: the server's model, if it is the one asked for
        return served.model_for(model, device, dtype)
    with _status("Loading model...", quiet) as update:
        return load_model(model, progress=update, device=device, dtype=dtype)


def _trace_options():
    from hexray.analysis.report import trace_options

    return trace_options()


PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="A file of prompts, one a line (or JSONL with a \"prompt\" per row): report the mean and spread over the set.")]


@app.command("trace")
@with_options(_trace_options())
def trace_command(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The text to run through the model.")] = None,
    prompts: PromptsOpt = None,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    save_activations: Annotated[Optional[str], typer.Option("--save-activations", help="Write activations (safetensors + manifest.json) to this folder.")] = None,
    save_hooks: Annotated[Optional[str], typer.Option("--save-hooks", help="Comma-separated hook-name globs to save (default: residual stream per layer).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier activation dump in the --save-activations folder.")] = False,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    **given,
) -> None:
    """Trace a prompt: residual stream, direct logit attribution, logit lens, and every analysis in the registry."""
    report = _folder(report)
    save_activations = _folder(save_activations, "--save-activations")
    from hexray.analysis.registry import analyses
    from hexray.analysis.report import AnalysisOptions, analyze
    from hexray.render.files import check_writable, write_report
    from hexray.render.jsondoc import report_document
    from hexray.tracing.activations import check_fired, check_no_dump, select_hooks
    from hexray.tracing.activations import save_activations as save_acts

    task = _chosen_preset(preset, prompts)
    prompt, given = _or_preset(prompt, task, "prompt"), _fill_from_preset(given, task, "target", "contrast")
    _one_source(prompt=prompt, prompts=prompts)
    chosen = [a for a in analyses() if a.switch is not None and a.name != "residual" and given.get(a.switch.name)]
    asked = given.get("top_k") is not None or bool(chosen) or save_activations is not None
    if report is None and any(a.report_by_default for a in chosen):
        report = FIGURE_DEFAULT_REPORT
    options = _options(AnalysisOptions, given, residual=bool(given.get("residual")) or not asked)
    if prompts is not None:
        return _trace_dataset(prompts, options, model, device, dtype, json_out, report, save_activations)
    if save_hooks is not None and save_activations is None:
        raise HexRayError("--save-hooks needs --save-activations DIR")
    if save_hooks is not None and not [p for p in save_hooks.split(",") if p.strip()]:
        raise HexRayError("--save-hooks is empty", hint="give comma-separated hook-name globs, or drop it for the residual stream")
    for folder, flag in ((report, "--report"), (save_activations, "--save-activations")):
        if folder is not None:
            check_writable(folder, flag)
    if save_activations is not None:
        check_no_dump(save_activations, force=force)
    loaded = _load(model, json_out, device, dtype)
    _ensure_defaults(loaded, options.dict, options.tuned_lens, json_out)
    hooks = tuple(select_hooks(loaded, save_hooks)) if save_activations else ()
    with _status("Tracing...", json_out):
        result = analyze(loaded, prompt, dataclasses.replace(options, save_hooks=hooks))
        document = _mark_preset(report_document(result), task)
    if save_activations is not None:
        check_fired(result.trace, list(hooks))  # before anything is written
    written = write_report(report, result, document) if report is not None else []
    if save_activations is not None:
        save_acts(result.trace, save_activations, list(hooks))
    if json_out:
        if save_activations is not None:
            document["activations"] = {"folder": str(save_activations), "hooks": list(hooks)}
        if written:
            document["report_files"] = [str(p) for p in written]
        sys.stdout.write(json.dumps(document, allow_nan=False) + "\n")
        return
    from hexray.render.console import render_report

    console = _console()
    render_report(result, console)
    _print_expected(console, task)
    if written:
        console.print(f"[green]Report written to {escape(str(report))}/[/] ({', '.join(p.name for p in written)})")
    if save_activations is not None:
        console.print(f"[green]Saved {len(hooks)} hook points to {escape(str(save_activations))}/[/] (read back with hexray.load_activations)")


def _trace_dataset(path: Path, options, model, device, dtype, json_out: bool, report: Path | None, save_activations) -> None:
    """``hexray trace --prompts FILE``: attribution's mean and spread over the set (batched forward passes)."""
    from hexray.analysis.dataset import dataset_attribution
    from hexray.corpus import read_rows
    from hexray.render.console import render_dataset_attribution
    from hexray.render.files import check_writable, dataset_files
    from hexray.render.jsondoc import dataset_attribution_document

    if save_activations is not None:
        raise HexRayError("--save-activations takes one --prompt, not --prompts")
    rows = read_rows(path, required=("prompt",), optional=("target", "contrast"))
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    with _status(f"Tracing {len(rows)} prompts...", json_out):
        result = dataset_attribution(loaded, rows, options)
    document = dataset_attribution_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: dataset_files("Attribution over a prompt set", document), lambda c: render_dataset_attribution(result, c, options.top_k))


def _patch_dataset(path: Path, options, model, device, dtype, json_out: bool, report: Path | None) -> None:
    """``hexray patch --prompts FILE``: each site's mean and spread over the prompt pairs."""
    from hexray.corpus import read_rows
    from hexray.intervene.dataset import dataset_patching
    from hexray.render.console import render_dataset_patching
    from hexray.render.files import dataset_files
    from hexray.render.jsondoc import dataset_patch_document

    rows = read_rows(path, required=("clean", "corrupt"), optional=("target", "contrast"))
    loaded = _load(model, json_out, device, dtype)
    with _status(f"Patching {len(rows)} pairs...", json_out) as update:
        result = dataset_patching(loaded, rows, options, progress=lambda done, total: update(f"Patching: {done}/{total} pairs"))
    document = dataset_patch_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: dataset_files("Patching over a prompt set", document), lambda c: render_dataset_patching(result, c, options.top_k))


def _ablate_dataset(path: Path, components: str, refs, options, model, device, dtype, json_out: bool, report: Path | None) -> None:
    """``hexray ablate --prompts FILE``: KL and the target's probability, mean and spread over the set."""
    from hexray.corpus import read_rows
    from hexray.intervene.dataset import dataset_ablation
    from hexray.render.console import render_dataset_ablation
    from hexray.render.files import dataset_files
    from hexray.render.jsondoc import dataset_ablation_document

    rows = read_rows(path, required=("prompt",), optional=("target", "contrast"))
    loaded = _load(model, json_out, device, dtype)
    with _status(f"Ablating in {len(rows)} prompts...", json_out):
        result = dataset_ablation(loaded, rows, components, options, reference=refs)
    document = dataset_ablation_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: dataset_files("Ablation over a prompt set", document), lambda c: render_dataset_ablation(result, c))


def _folder(value: str | None, flag: str = "--report") -> Path | None:
    """A folder option as a Path; an empty one is a mistake (it would mean the current directory)."""
    if value is None:
        return None
    if not value.strip():
        raise HexRayError(f"{flag} is empty", hint="name a folder, e.g. hexray-report")
    return Path(value)


def _one_source(**sources) -> None:
    """Exactly one of a prompt (or prompt pair) and --prompts FILE."""
    (single, single_value), (_, file) = list(sources.items())[0], list(sources.items())[-1]
    if file is not None and single_value is not None:
        raise HexRayError(f"give {_flag_of(single)} or --prompts, not both")
    if file is None and single_value is None:
        raise HexRayError(f"missing option {_flag_of(single)}", hint="or --prompts FILE for a set of prompts, or --preset NAME")


def _chosen_preset(name: str | None, prompts: Path | None = None):
    """The --preset task (None without one), checked before any model is loaded."""
    if name is None:
        return None
    from hexray.presets import preset

    task = preset(name)
    if prompts is not None:
        raise HexRayError("give --preset or --prompts, not both")
    return task


def _or_preset(value, task, field: str):
    """An explicit value wins; else the preset's (None without a preset)."""
    return value if value is not None or task is None else getattr(task, field)


def _fill_from_preset(given: dict, task, *fields: str) -> dict:
    """The command's option values with the preset's for each of ``fields`` the user did not give."""
    return {**given, **{field: _or_preset(given.get(field), task, field) for field in fields}}


def _mark_preset(document: dict, task) -> dict:
    if task is not None:
        document["preset"] = {"name": task.name, "expected": task.expected}
    return document


def _print_expected(console: Console, task) -> None:
    """The preset's expected circuit, one dim line to hold what HexRay found against."""
    if task is not None:
        console.print(Text(f"Expected for the {task.name} preset: {task.expected}", style="dim"), soft_wrap=True)


def _finish(json_out: bool, report: Path | None, document: dict, files, show, task=None) -> None:
    """Print JSON or the console view (with a preset's expected circuit), and write the report (all files at once)."""
    from hexray.render.files import write_files

    _mark_preset(document, task)
    written = write_files(report, files()) if report is not None else []
    if json_out:
        if written:
            document["report_files"] = [str(p) for p in written]
        sys.stdout.write(json.dumps(document, allow_nan=False) + "\n")
        return
    console = _console()
    show(console)
    _print_expected(console, task)
    if written:
        console.print(f"[green]Report written to {escape(str(report))}/[/] ({', '.join(p.name for p in written)})")


def _patch_options():
    from hexray.intervene.patching import PATCH_OPTIONS

    return PATCH_OPTIONS


def _ablate_options():
    from hexray.intervene.ablation import ABLATE_OPTIONS

    return ABLATE_OPTIONS


def _heads_options():
    from hexray.analysis.heads import HEADS_OPTIONS

    return HEADS_OPTIONS


def _generation_options():
    from hexray.generation.tracer import GENERATION_OPTIONS

    return GENERATION_OPTIONS


@app.command("patch")
@with_options(_patch_options())
def patch_command(
    clean: Annotated[Optional[str], typer.Option("--clean", help="The prompt with the behaviour (e.g. the IOI sentence).")] = None,
    corrupt: Annotated[Optional[str], typer.Option("--corrupt", help="The same prompt with the behaviour broken (same token length).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL, one {clean, corrupt[, target, contrast]} a row (e.g. IOI templates): mean and spread over the set.")] = None,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    **given,
) -> None:
    """Activation patching: which sites, patched from the clean run into the corrupt one, restore the behaviour."""
    report = _folder(report)
    from hexray.intervene.patching import PatchOptions, activation_patching
    from hexray.render.files import check_writable, patching_files
    from hexray.render.jsondoc import patch_document

    task = _chosen_preset(preset, prompts)
    clean, corrupt = _or_preset(clean, task, "clean"), _or_preset(corrupt, task, "corrupt")
    given = _fill_from_preset(given, task, "target", "contrast")
    if prompts is None and (clean is None or corrupt is None):
        raise HexRayError("missing option --clean" if clean is None else "missing option --corrupt", hint="or --prompts FILE for a set of prompt pairs, or --preset NAME")
    if prompts is not None and (clean is not None or corrupt is not None):
        raise HexRayError("give --clean/--corrupt or --prompts, not both")
    options = _options(PatchOptions, given)
    if report is not None:
        check_writable(report)
    if prompts is not None:
        return _patch_dataset(prompts, options, model, device, dtype, json_out, report)
    loaded = _load(model, json_out, device, dtype)
    _ensure_defaults(loaded, options.dict, False, json_out)
    with _status("Patching...", json_out) as update:
        result = activation_patching(loaded, clean, corrupt, **_patch_kwargs(options), progress=lambda done, total: update(f"Patching: {done}/{total} sites"))
    from hexray.render.console import render_patching

    document = patch_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: patching_files(result, document, options.top_k), lambda c: render_patching(result, c, options.top_k), task)


def _patch_kwargs(options) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k != "top_k"}


@app.command("ablate")
@with_options(_ablate_options())
def ablate_command(
    components: Annotated[Optional[str], typer.Option("--components", "-c", help="Comma-separated: L9H6, ATTN9, MLP10, L10N1234, RESID12; with --dict, features L8F117 (=5 clamps, +=5 steers); add @P for one position (L9H6@-1).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The text to run through the model.")] = None,
    prompts: PromptsOpt = None,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference prompts for mean/resample, one a line (default: a built-in set).")] = None,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    **given,
) -> None:
    """Ablate components together and compare the next-token distribution before and after."""
    report = _folder(report)
    from hexray.intervene.ablation import AblateOptions, ablate, parse_sites, read_reference_prompts
    from hexray.render.files import ablation_files, check_writable
    from hexray.render.jsondoc import ablation_document

    task = _chosen_preset(preset, prompts)
    prompt, given = _or_preset(prompt, task, "prompt"), _fill_from_preset(given, task, "target", "contrast")
    if components is None and task is not None and task.components:  # a preset's "" names none
        components = task.components
    if components is None:
        raise HexRayError("missing option --components", hint=f"the {task.name} preset names none; give e.g. --components L9H6,MLP10" if task else "e.g. --components L9H6,MLP10")
    _one_source(prompt=prompt, prompts=prompts)
    options = _options(AblateOptions, given)
    refs = read_reference_prompts(reference) if reference is not None else None
    if report is not None:
        check_writable(report)
    if prompts is not None:
        return _ablate_dataset(prompts, components, refs, options, model, device, dtype, json_out, report)
    loaded = _load(model, json_out, device, dtype)
    _ensure_defaults(loaded, options.dict, False, json_out)
    sites = parse_sites(components, loaded.spec)
    with _status("Ablating...", json_out):
        result = ablate(loaded, prompt, sites, reference=refs, **_ablate_kwargs(options))
    from hexray.render.console import render_ablation

    document = ablation_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: ablation_files(result, document), lambda c: render_ablation(result, c, options.top_k), task)


def _ablate_kwargs(options) -> dict:
    kwargs = dataclasses.asdict(options)
    kwargs["k"] = kwargs.pop("top_k")
    return kwargs


@app.command("heads")
@with_options(_heads_options())
def heads_command(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text for the previous-token, duplicate-token and BOS scores (default: a built-in text).")] = None,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    **given,
) -> None:
    """Classify every attention head: previous-token, duplicate-token, induction, BOS/sink."""
    report = _folder(report)
    from hexray.analysis.heads import HeadsOptions, classify_heads
    from hexray.render.files import check_writable, heads_files
    from hexray.render.jsondoc import heads_document

    task = _chosen_preset(preset)
    prompt = _or_preset(prompt, task, "prompt")
    options = _options(HeadsOptions, given)
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    with _status("Scoring heads...", json_out):
        kwargs = {k: v for k, v in dataclasses.asdict(options).items() if k != "top_k"}
        result = classify_heads(loaded, prompt, **kwargs)
    from hexray.render.console import render_heads

    document = heads_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: heads_files(result, document), lambda c: render_heads(result, c, options.top_k), task)


@app.command("generate")
@with_options(_generation_options())
def generate_command(
    prompt: PromptOpt = None,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    cot_debug: Annotated[bool, typer.Option("--cot-debug", help="Per-step bar charts of the components over the generated steps.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines: one per token, then a final {done: true, ...} line.")] = False,
    report: ReportOpt = None,
    **given,
) -> None:
    """Generate while tracing every token: what wrote it, which steps it drew on, watched components."""
    report = _folder(report)
    from hexray.generation.tracer import GenerationOptions, TracedGeneration
    from hexray.render.files import check_writable, generation_files, write_files
    from hexray.render.console import render_generation_summary, token_line
    from hexray.render.jsondoc import generation_done_doc, token_record_doc

    task = _chosen_preset(preset)
    prompt = _or_preset(prompt, task, "prompt")
    if prompt is None:
        raise HexRayError("missing option --prompt", hint="or --preset NAME; hexray presets lists them")
    options = _options(GenerationOptions, given)
    top_k = options.top_k
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    _ensure_defaults(loaded, options.features, False, json_out)
    run = TracedGeneration(loaded, prompt, options)
    console = _console()
    if not json_out:
        console.print(Text.assemble(("Prompt ", "bold"), " ".join(repr(t) for t in loaded.token_strs(run.prompt_ids))))
    interrupted = False
    try:
        for record in run:
            if json_out:
                sys.stdout.write(json.dumps(token_record_doc(record), allow_nan=False) + "\n")
                sys.stdout.flush()
            else:
                console.print(token_line(record, top_k))
    except KeyboardInterrupt:  # stop cleanly and keep what was generated
        run.interrupted()
        interrupted = True
    result = run.result()
    done = _mark_preset(generation_done_doc(result), task)
    if report is not None:
        written = write_files(report, generation_files(result, done, top_k))
        done["report_files"] = [str(p) for p in written]
    if json_out:
        sys.stdout.write(json.dumps(done, allow_nan=False) + "\n")
    else:
        render_generation_summary(result, console, top_k, bars=cot_debug)
        _print_expected(console, task)
        if report is not None:
            console.print(f"[green]Report written to {escape(str(report))}/[/]")
    if interrupted:
        raise typer.Exit(130)


@app.command("presets")
def presets_command(json_out: JsonOpt = False) -> None:
    """List the preset tasks --preset takes: each one's prompt and the circuit the literature expects."""
    from rich.table import Table

    from hexray.presets import PRESETS

    if json_out:
        sys.stdout.write(json.dumps({"presets": [dataclasses.asdict(p) for p in PRESETS]}) + "\n")
        return
    table = Table(title="Presets (hexray trace --preset NAME)", show_lines=True)
    for column in ("name", "title", "prompt", "expected"):
        table.add_column(column, overflow="fold")
    for p in PRESETS:
        table.add_row(Text(p.name, style="bold"), Text(p.title), Text(repr(p.prompt)), Text(p.expected, style="dim"))
    _console().print(table)


@app.command("debug")
def debug_command(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Run this prompt first (as `run PROMPT`).")] = None,
    script: Annotated[Optional[Path], typer.Option("-x", "--command-file", help="Run the commands in FILE (one a line, as gdb -x) and exit.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="With -x: one JSON object per command.")] = False,
) -> None:
    """A gdb for the forward pass: breakpoints, stepping both ways, edits and continue (help inside lists the commands)."""
    from hexray.debugger.repl import interactive, run_script
    from hexray.debugger.session import Session
    from hexray.models.loading import cache_root

    lines = None
    if script is not None:
        try:
            lines = script.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise HexRayError(f"cannot read {script}: {getattr(exc, 'strerror', None) or exc}", hint="-x takes a text file of debugger commands") from None
    session = Session(_load(model, json_out or script is not None, device, dtype))
    first = [f"run {prompt}"] if prompt else []
    if lines is not None:
        raise typer.Exit(run_script(session, first + lines, json_out=json_out))
    if first:
        run_script(session, first, echo=False)
    raise typer.Exit(interactive(session, cache_root() / "debug_history"))


@app.command("serve")
def serve_command(
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    host: Annotated[str, typer.Option(help="Address to bind; anything but 127.0.0.1 exposes the model to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the lab in a web browser once the server is up.")] = False,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds a request may take (queueing included) before it answers 504.")] = 300.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest prompt, in tokens, the server takes.")] = 1024,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="A Host name besides 127.0.0.1/localhost the server answers to (repeatable; needed behind a name or on another address).")] = None,
) -> None:
    """Serve the HexRay lab (web page, REST API and WebSockets) with the model loaded once.

    Only requests addressed to a loopback name (or an --allow-host one) are answered, and
    WebSockets and POSTs from another site's pages are refused.
    """
    import math
    import socket

    import uvicorn

    from hexray.models.loading import model_key
    from hexray.server.app import create_app

    if not 0 < port < 65536:
        raise HexRayError(f"--port {port} is out of range", hint="use 1..65535")
    if not math.isfinite(time_limit) or time_limit <= 0:
        raise HexRayError(f"--time-limit must be a positive number of seconds, got {time_limit}")
    if max_tokens <= 0:
        raise HexRayError(f"--max-tokens must be positive, got {max_tokens}")
    try:  # a taken port fails now, before a model load of many seconds
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        in_use = getattr(exc, "errno", None) in (48, 98, 10048)  # EADDRINUSE on macOS, Linux, Windows
        raise HexRayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port" if in_use else "check --host: an address of this machine, e.g. 127.0.0.1") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        _stderr().print(f"[bold yellow]warning:[/] binding to {escape(host)}: anyone who can reach this address can run the model", highlight=False)
    loaded = _load(model, False, device, dtype)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    _stderr().print(f"HexRay lab for {escape(loaded.name)} on {escape(url)}  (Ctrl-C stops it)", highlight=False)
    extra_hosts = tuple(allow_host or ()) + (() if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::") else (host,))
    token = warm.new_token()  # for POST /api/cli (hexray --server): only processes that can read the discovery file hold it
    app_ = create_app(loaded, time_limit=time_limit, max_tokens=max_tokens, allowed_hosts=extra_hosts, cli_token=token, model_key=model_key(model))
    if open_browser:
        import threading

        threading.Thread(target=_open_when_listening, args=(host, port, url), daemon=True).start()
    with warm.advertise(host, port, loaded.name, token) as advertised:
        if isinstance(advertised, OSError):
            _stderr().print(f"[bold yellow]warning:[/] hexray --server cannot find this server: {escape(str(advertised))}", highlight=False)
        uvicorn.run(app_, host=host, port=port, log_level="warning")


# -- features: dictionaries, features per token, the tuned lens -------------------------------------
dict_app = typer.Typer(help="Sparse dictionaries (SAEs, transcoders): train, list, build the defaults.", no_args_is_help=True)
lens_app = typer.Typer(help="The tuned lens: train one affine translator per layer.", no_args_is_help=True)
app.add_typer(dict_app, name="dict")
app.add_typer(lens_app, name="lens")
CorpusOpt = Annotated[Optional[str], typer.Option("--corpus", help="Text to train on: a .txt/.md/.jsonl/.parquet file, a folder, a saved HF dataset, or default (Debian and Python texts).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@contextmanager
def _training_progress(quiet: bool):
    """(stage callback, should_stop) with one rich progress bar per stage; Ctrl-C asks the run to stop at the next step."""
    import signal
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    stop = threading.Event()
    names = {"corpus": "Tokenizing corpus", "harvest": "Reading activations", "train": "Training", "evaluate": "Measuring", "lens": "Training tuned lens"}
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=_stderr(), disable=quiet or not _stderr().is_terminal, transient=False)
    tasks: dict[str, int] = {}

    def stage(name: str, done: int, total: int, detail: str) -> None:
        key = f"{name}:{detail.split(' ')[0]}" if name in ("train", "evaluate") else name
        if key not in tasks:
            tasks[key] = bars.add_task(names.get(name, name) + (f" {detail.split(' ')[0]}" if key != name else ""), total=total, detail="")
        bars.update(tasks[key], completed=done, total=total, detail=detail.partition(" ")[2] if key != name else detail)

    previous = None
    if threading.current_thread() is threading.main_thread():
        def ask_to_stop(signum, frame):
            if stop.is_set():  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            stop.set()
        previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        with bars:
            yield stage, stop.is_set
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _ensure_defaults(loaded, names: str | None, tuned: bool, quiet: bool) -> None:
    """Build the embedded model's default dictionaries / tuned lens on first use, with progress bars."""
    from hexray.features.build import build_defaults, default_sites
    from hexray.features.store import model_dictionaries_root, split_names
    from hexray.features.tuned_lens import default_tuned_lens_path

    defaults = default_sites(loaded)
    if not defaults:
        return
    root = model_dictionaries_root(loaded.spec)
    missing = [n for n in split_names(names) if n in defaults and not Path(n).exists() and not (root / n).exists()]
    if not missing and not (tuned and not default_tuned_lens_path(loaded).exists()):
        return
    _stderr().print(f"Building {loaded.name}'s default dictionaries ({', '.join(defaults)}) and tuned lens: once, a few minutes on a CPU; Ctrl-C stops (a rerun resumes)", highlight=False)
    from hexray.features.build import Interrupted

    try:
        with _training_progress(quiet) as (stage, should_stop):
            build_defaults(loaded, stage=stage, should_stop=should_stop)
    except Interrupted as exc:
        raise _interrupted(exc) from None


def _quality_table(rows: list[tuple[str, dict]]):
    from rich.table import Table

    table = Table(title="Dictionary quality on held-out text", title_justify="left",
                  caption="FVU = fraction of variance unexplained; loss = next-token loss (nats) with the site spliced / zero-ablated; recovered = (zero - spliced) / (zero - clean)")
    for col in ("dictionary", "tokens", "FVU", "L0", "dead %", "loss clean", "spliced", "zeroed", "recovered"):
        table.add_column(col, justify="left" if col == "dictionary" else "right")
    for name, q in rows:
        table.add_row(name, str(q["tokens"]), f"{q['fvu']:.3f}", f"{q['l0']:.1f}", f"{q['dead_pct']:.1f}", f"{q['loss_clean']:.3f}",
                      f"{q['loss_spliced']:.3f}", f"{q['loss_zero']:.3f}", f"{q['loss_recovered']:.3f}")
    return table


def _interrupted(exc) -> typer.Exit:
    resume = f"; --resume continues from {exc.checkpoint}" if exc.checkpoint else ""
    _stderr().print(f"interrupted: {exc}{resume} (nothing was written)", highlight=False)
    return typer.Exit(130)


@dict_app.command("train")
def dict_train_command(
    site: Annotated[str, typer.Option("--site", help="resid.10 (stream entering block 10), mlp_out.10, attn_out.10, or mlp.10 (MLP in -> out, for transcoders).")],
    arch: Annotated[str, typer.Option("--arch", help="topk | batchtopk | transcoder | skip-transcoder.")] = "topk",
    latents: Annotated[int, typer.Option("--latents", help="Dictionary size.")] = 4096,
    k: Annotated[int, typer.Option("--k", help="Latents firing per token (on average, for batchtopk).")] = 32,
    tokens: Annotated[int, typer.Option("--tokens", help="Training tokens, harvested once.")] = 200_000,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the harvested tokens.")] = 1,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Tokens per optimiser step.")] = 1024,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default: 2e-4 / sqrt(latents / 16384)).")] = None,
    held_out: Annotated[int, typer.Option("--held-out", help="Held-out tokens for the quality figures.")] = 4096,
    context_size: Annotated[int, typer.Option("--context-size", help="Tokens per corpus context.")] = 128,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Format each document as a user message with the model's chat template.")] = False,
    corpus: CorpusOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default: the cache, named after the site).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing dictionary in --out.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a sparse dictionary at one site on a corpus, measure it on held-out text, and save it (SAELens layout)."""
    from hexray.features.build import Interrupted, train_dictionaries
    from hexray.features.dictionary import parse_site
    from hexray.features.store import model_dictionaries_root
    from hexray.features.train import TRAIN_ARCHS, TrainOptions

    if arch not in TRAIN_ARCHS:
        raise HexRayError(f"unknown architecture {arch!r}", hint=f"use {', '.join(TRAIN_ARCHS)}")
    for name, value, least in (("--latents", latents, 2), ("--tokens", tokens, 1), ("--epochs", epochs, 1), ("--batch-tokens", batch_tokens, 1), ("--held-out", held_out, 1)):
        if value < least:
            raise HexRayError(f"{name} must be at least {least}, got {value}")
    if k >= latents or k < 1:
        raise HexRayError(f"--k must be between 1 and --latents - 1 ({latents - 1}), got {k}", hint="k is how many latents fire per token")
    folder = _folder(out, "--out")
    loaded = _load(model, quiet or json_out, device, dtype)
    opts = TrainOptions(parse_site(site, loaded.spec, field="site"), arch, latents, k, tokens, batch_tokens, epochs, lr, seed=seed)  # type: ignore[arg-type]
    _flags.update({"site": "--site", "arch": "--arch", "latents": "--latents", "k": "--k", "tokens": "--tokens", "corpus": "--corpus", "out": "--out", "context_size": "--context-size"})
    opts.validate()
    folder = folder or model_dictionaries_root(loaded.spec) / opts.site.label
    try:
        with _training_progress(quiet or json_out) as (stage, should_stop):
            built = train_dictionaries(loaded, [opts], [folder], corpus=corpus, context_size=context_size, held_out=held_out, chat_template=chat_template,
                                       resume=resume, overwrite=force, stage=stage, should_stop=should_stop)[0]
    except Interrupted as exc:
        raise _interrupted(exc) from None
    doc = {"dictionary": str(built.folder), "site": opts.site.label, "arch": arch, "latents": latents, "k": k, "quality": built.quality.as_dict(), "seconds": built.seconds}
    if json_out:
        sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
        return
    console = _console()
    console.print(_quality_table([(built.folder.name, built.quality.as_dict())]))
    console.print(f"[green]Saved {escape(str(built.folder))}/[/] (use it with --dict {escape(str(built.folder))})")


@dict_app.command("list")
def dict_list_command(model: ModelOpt = None, json_out: JsonOpt = False) -> None:
    """The dictionaries in the cache: each one's site, size and quality."""
    from hexray.features.store import saved_dictionaries

    rows = saved_dictionaries()
    if json_out:
        sys.stdout.write(json.dumps({"dictionaries": rows}, allow_nan=False) + "\n")
        return
    from rich.table import Table

    table = Table(title="Saved dictionaries", title_justify="left")
    for col in ("name", "model", "site", "kind", "latents", "k", "FVU", "L0", "dead %", "recovered"):
        table.add_column(col)
    for r in rows:
        q = r.get("quality") or {}
        table.add_row(r["name"], r["model"], r["site"], r["kind"], str(r["latents"]), str(r["k"] or "-"),
                      *(f"{q[key]:.3f}" if isinstance(q.get(key), float) else "-" for key in ("fvu", "l0", "dead_pct", "loss_recovered")))
    _console().print(table if rows else "no dictionaries yet: hexray dict train --site resid.10 (or hexray dict defaults)")


@dict_app.command("defaults")
def dict_defaults_command(model: ModelOpt = None, quiet: QuietOpt = False, json_out: JsonOpt = False) -> None:
    """Build the embedded model's default dictionaries (resid.6, resid.12, resid.18) and tuned lens, if missing."""
    from hexray.features.build import Interrupted, build_defaults, default_sites

    loaded = _load(model, quiet or json_out)
    if not default_sites(loaded):
        raise HexRayError(f"{loaded.name} has no default dictionaries", hint="train your own: hexray dict train --site resid.10")
    try:
        with _training_progress(quiet or json_out) as (stage, should_stop):
            built = build_defaults(loaded, stage=stage, should_stop=should_stop)
    except Interrupted as exc:
        raise _interrupted(exc) from None
    if json_out:
        sys.stdout.write(json.dumps(built, allow_nan=False) + "\n")
        return
    console = _console()
    if built["dictionaries"]:
        console.print(_quality_table([(d["name"], d) for d in built["dictionaries"]]))
    console.print(f"defaults ready in {built['seconds']:.0f} s" if built["dictionaries"] or built["tuned_lens"] else "defaults already built")


@lens_app.command("train")
def lens_train_command(
    steps: Annotated[int, typer.Option("--steps", help="SGD steps.")] = 150,
    batch_contexts: Annotated[int, typer.Option("--batch-contexts", help="Contexts per step.")] = 8,
    context_size: Annotated[int, typer.Option("--context-size", help="Tokens per corpus context.")] = 128,
    held_out: Annotated[int, typer.Option("--held-out", help="Held-out tokens for the KL figures.")] = 2048,
    corpus: CorpusOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default: the cache, per model).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing tuned lens in --out.")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a tuned lens (one affine translator per layer, KL to the final logits) and show its held-out KL beside the logit lens's."""
    from hexray.features.build import Interrupted, train_lens

    for name, value in (("--steps", steps), ("--batch-contexts", batch_contexts), ("--held-out", held_out)):
        if value < 1:
            raise HexRayError(f"{name} must be at least 1, got {value}")
    folder = _folder(out, "--out")
    loaded = _load(model, quiet or json_out, device, dtype)
    _flags.update({"corpus": "--corpus", "out": "--out", "context_size": "--context-size"})
    try:
        with _training_progress(quiet or json_out) as (stage, should_stop):
            lens = train_lens(loaded, corpus=corpus, steps=steps, batch_contexts=batch_contexts, context_size=context_size, held_out=held_out,
                              out=folder, overwrite=force, stage=stage, should_stop=should_stop)
    except Interrupted as exc:
        raise _interrupted(exc) from None
    kl = lens.meta["held_out_kl_bits"]
    if json_out:
        sys.stdout.write(json.dumps({"model": loaded.name, "held_out_kl_bits": kl, "seconds": lens.meta.get("seconds")}, allow_nan=False) + "\n")
        return
    from rich.table import Table

    table = Table(title="Held-out KL to the final distribution (bits)", title_justify="left")
    for col in ("stream after", "logit lens", "tuned lens"):
        table.add_column(col, justify="right")
    from hexray.analysis.lens import row_labels

    for label, logit, tuned in zip(row_labels(loaded.spec), kl["logit"], kl["tuned"]):
        table.add_row(label, f"{logit:.3f}", f"{tuned:.3f}")
    _console().print(table)


@app.command("features")
def features_command(
    prompt: PromptOpt = None,
    dictionary: Annotated[Optional[str], typer.Option("--dict", help="Dictionaries (names such as resid.12, or folders; comma-separated).")] = None,
    k: Annotated[int, typer.Option("--k", help="Features per token.")] = 5,
    token_index: Annotated[int, typer.Option("--token-index", help="Position whose prediction the feature attribution explains.")] = -1,
    target: Annotated[Optional[str], typer.Option("--target", help="Explain this token's logit (default: the prediction).")] = None,
    contrast: Annotated[Optional[str], typer.Option("--contrast", help="Explain logit(target) - logit(contrast).")] = None,
    top_k: Annotated[int, typer.Option("--top-k-attribution", "-k", help="Rows of the attribution table.")] = 15,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    report: ReportOpt = None,
) -> None:
    """Each token's top features in a dictionary, and the prediction's attribution with the dictionary's site split into features."""
    if prompt is None:
        raise HexRayError("missing option --prompt")
    if k < 1:  # checked here: trace would name its own flag, --features-k
        raise HexRayError(f"--k must be positive, got {k}")
    trace_args = ["--prompt", prompt, "--features-k", str(k), "--token-index", str(token_index), "-k", str(top_k), "--granularity", "head"]
    trace_args += ["--dict", dictionary or "resid.12"] + (["--target", target] if target else []) + (["--contrast", contrast] if contrast else [])
    trace_args += (["--model", model] if model else []) + ["--device", device, "--dtype", dtype] + (["--json"] if json_out else []) + (["--report", report] if report else [])
    code = app(["trace", *trace_args], prog_name="hexray", standalone_mode=False)
    if isinstance(code, int) and code:
        raise typer.Exit(code)


# -- the neuroscope: hexray index build|search|info, hexray neuron|head|feature ---------------------
index_app = typer.Typer(help="The neuroscope index: top-activating examples of every neuron, head and feature (one DuckDB file).", no_args_is_help=True)
app.add_typer(index_app, name="index")
IndexOpt = Annotated[Optional[str], typer.Option("--index", help="The index file (default: the model's, in the cache; hexray index build makes it).")]


def _index_path(value: str | None, spec) -> Path:
    from hexray.neuroscope import default_index_path

    return Path(value).expanduser() if value else default_index_path(spec)


@index_app.command("build")
def index_build_command(
    units: Annotated[Optional[str], typer.Option("--units", help="Comma-separated: neurons, heads, dict:NAME (a dictionary's latents). Default: neurons,heads (with --add: the index's).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Corpus tokens to index (counted positions); with --add, tokens to add.")] = 200_000,
    context_size: Annotated[Optional[int], typer.Option("--context-size", help="Tokens per corpus context (default 128; with --add, the index's).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-activating examples kept per unit (with --add, the index's).")] = 20,
    label_tokens: Annotated[Optional[int], typer.Option("--label-tokens", help="Held-out tokens (after the indexed ones) that score each unit's automatic label (default: a tenth of --tokens; 0: no labels).")] = None,
    corpus: CorpusOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", help="The index file to write (default: the model's, in the cache); replaced only when the build completes.")] = None,
    add: Annotated[bool, typer.Option("--add", help="Extend the index with more text: the next --tokens tokens of --corpus it does not hold yet.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming a stopped build of the same index.")] = False,
    engine: Annotated[str, typer.Option("--engine", help="local (this process) or ray (Ray Data actors; pip install 'hexray[scale]').")] = "local",
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray actors, each holding the model (default 2).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="An existing Ray cluster (default: start a local one).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """One pass of a corpus through the model, keeping every unit's top examples, samples, histogram and logit effects.

    A stopped build (Ctrl-C) resumes when run again; --add extends an index with more text.
    """
    _flags.update({"corpus": "--corpus", "out": "--out", "units": "--units", "context_size": "--context-size", "top_k": "--top-k",
                   "engine": "--engine", "workers": "--workers", "address": "--ray-address"})
    if tokens < 1 or top_k < 1 or (context_size is not None and context_size < 2) or (label_tokens is not None and label_tokens < 0):
        raise HexRayError("--tokens and --top-k must be at least 1, --context-size at least 2, --label-tokens at least 0")
    if engine not in ("local", "ray"):
        raise HexRayError(f"--engine must be local or ray, got {engine!r}")
    loaded = _load(model, quiet or json_out, device, dtype)
    target = _index_path(out, loaded.spec)
    info = _build_index(loaded, target, units=units, tokens=tokens, context_size=context_size, top_k=top_k, corpus=corpus, add=add, restart=restart, label_tokens=label_tokens,
                        engine=engine, workers=workers, ray_address=ray_address, model_name=model, quiet=quiet or json_out)
    doc = {"index": str(info.path), "model": info.model, "corpus": info.corpus, "tokens": info.tokens, "units": dict(info.units),
           "dictionaries": list(info.dictionaries), "seconds": dict(info.seconds), "tokens_per_second": info.tokens_per_second, "size_bytes": info.size_bytes}
    if json_out:
        sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
        return
    added = f"Added {info.sources[-1]['tokens']:,} tokens: " if add else ""
    _console().print(f"[green]{added}Indexed {info.tokens:,} tokens[/] ({', '.join(f'{n:,} {k}' for k, n in info.units.items())}) in "
                     f"{sum(info.seconds.values()):.0f} s ({info.tokens_per_second:,.0f} tokens/s): {escape(str(info.path))} ({info.size_bytes / 1e6:.1f} MB)")


def _build_index(loaded, target: Path, *, units: str | None, tokens: int, context_size: int | None, top_k: int, corpus: str | None, add: bool, restart: bool,
                 label_tokens: int | None = None, engine: str = "local", workers: int | None = None, ray_address: str | None = None, model_name: str | None = None, quiet: bool = False):
    """Tokenize the corpus and build (or extend) the index at ``target`` with progress bars; Ctrl-C stops it (a rerun resumes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hexray.corpus.packs import token_pack
    from hexray.neuroscope import IndexBuildStopped, build_index, read_info
    from hexray.neuroscope.index import indexed_tokens, split_held_out

    if add:
        if not target.is_file():
            raise HexRayError(f"no index at {target} to add to", hint="build one first (without --add)")
        held = read_info(target)
        if context_size is not None and context_size != held.context_size:
            raise HexRayError(f"the index's contexts are {held.context_size} tokens, not {context_size}", hint="leave out --context-size with --add")
        context_size = held.context_size
        tokens += indexed_tokens(target, loaded, corpus, context_size)  # the pack starts at the corpus's start; the index skips what it holds
    context_size = context_size or 128
    held = max(1, tokens // 10) if label_tokens is None else label_tokens
    with _training_progress(quiet) as (stage, should_stop):
        both = token_pack(loaded, corpus, context_size=context_size, max_tokens=tokens + held, progress=lambda done, total: stage("corpus", done, total or tokens, ""))
        pack, held_out = split_held_out(both, tokens) if held else (both, None)
        bars = Progress(TextColumn("Indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens {task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=_stderr(), disable=quiet or not _stderr().is_terminal)
        started: dict[str, float] = {}

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            first = started.setdefault("at", now), started.setdefault("done", done)  # a resumed build counts its rate from where it resumed
            rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
            bars.update(task, completed=done, total=total, rate=f"{rate:,.0f} tokens/s" if rate else "")

        with bars:
            task = bars.add_task("index", total=pack.n_tokens, rate="")
            try:
                return build_index(loaded, pack, None if add and units is None else (units or "neurons,heads"), target, top_k=top_k, add=add, resume=not restart, held_out=held_out,
                                   engine=engine, workers=workers, address=ray_address, model_name=model_name,
                                   progress=progress, should_stop=should_stop)
            except IndexBuildStopped as exc:
                _stderr().print(f"interrupted: {exc}; run the same command again to resume (the previous index, if any, is unchanged)", highlight=False)
                raise typer.Exit(130) from None


DEFAULT_INDEX_TOKENS = 200_000


def _ensure_index(loaded, index: str | None, quiet: bool = False) -> Path:
    """The index to read: ``--index``, else the model's default; the embedded models build theirs on first use (neurons, heads, and their default dictionaries when trained)."""
    from hexray.features.build import default_sites
    from hexray.features.store import model_dictionaries_root

    path = _index_path(index, loaded.spec)
    if index is not None or path.exists() or loaded.spec.source != "embedded":
        return path
    root = model_dictionaries_root(loaded.spec)
    units = ",".join(["neurons", "heads"] + [f"dict:{site}" for site in default_sites(loaded) if (root / site).exists()])
    _stderr().print(f"Building {loaded.name}'s neuroscope index ({units} over {DEFAULT_INDEX_TOKENS:,} tokens of the default corpus): once, "
                    "about ten minutes on a CPU; Ctrl-C stops (a rerun resumes)", highlight=False)
    _build_index(loaded, path, units=units, tokens=DEFAULT_INDEX_TOKENS, context_size=None, top_k=20, corpus=None, add=False, restart=False, quiet=quiet)
    return path


def _unit_page_command(text: str, index: str | None, model: str | None, examples: int, json_out: bool, html: str | None = None) -> None:
    from hexray.neuroscope import open_index, unit_page
    from hexray.render.console import render_unit_page
    from hexray.render.files import check_page_path, write_page
    from hexray.render.html import unit_page_html
    from hexray.render.jsondoc import unit_page_doc

    if html is not None:
        check_page_path(html)  # before the model loads
    loaded = _load(model, True)
    with open_index(_ensure_index(loaded, index), loaded.spec) as opened:
        page = unit_page(opened, text)
        doc = unit_page_doc(page, opened.info)
        written = write_page(html, unit_page_html(doc)) if html is not None else None
        if json_out:
            if written is not None:
                doc["html_file"] = str(written)
            sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
            return
        render_unit_page(page, opened.info, _console(), examples=examples)
    if written is not None:
        _console().print(f"[green]Page written to {escape(str(written))}[/]")


ExamplesOpt = Annotated[int, typer.Option("--examples", "-n", help="Examples shown.")]
UnitHtmlOpt = Annotated[Optional[str], typer.Option("--html", help="Also write the page, with every stored example, as one self-contained HTML file (inline CSS, no scripts).")]


@app.command("neuron")
def neuron_command(unit: Annotated[str, typer.Argument(help="An MLP neuron: L10N1234.")], index: IndexOpt = None, model: ModelOpt = None,
                   examples: ExamplesOpt = 10, json_out: JsonOpt = False, html: UnitHtmlOpt = None) -> None:
    """A neuron's page from the index: statistics, top examples shaded by activation, samples, histogram, logit effects."""
    _unit_page_command(unit, index, model, examples, json_out, html)


@app.command("head")
def head_command(unit: Annotated[str, typer.Argument(help="An attention head: L9H6 (its output norm per token).")], index: IndexOpt = None, model: ModelOpt = None,
                 examples: ExamplesOpt = 10, json_out: JsonOpt = False, html: UnitHtmlOpt = None) -> None:
    """A head's page from the index (its activation is the norm of what it writes)."""
    _unit_page_command(unit, index, model, examples, json_out, html)


@app.command("feature")
def feature_command(unit: Annotated[str, typer.Argument(help="A dictionary latent: NAME:123 or L10F123.")], index: IndexOpt = None, model: ModelOpt = None,
                    examples: ExamplesOpt = 10, json_out: JsonOpt = False, html: UnitHtmlOpt = None) -> None:
    """A feature's page from the index (built with --units dict:NAME)."""
    _unit_page_command(unit, index, model, examples, json_out, html)


@index_app.command("search")
def index_search_command(
    prompt: PromptOpt = None,
    position: Annotated[int, typer.Option("--position", help="The token of --prompt to look up; negative counts from the end.")] = -1,
    token: Annotated[Optional[str], typer.Option("--token", help="Instead: units whose top examples centre on this token (e.g. ' Paris').")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Units shown.")] = 20,
    index: IndexOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Reverse look-up: the units that fire most at a prompt's token (relative to their own max), or that centre on a token."""
    from hexray.neuroscope import open_index, search_position, search_token
    from hexray.render.console import render_unit_hits
    from hexray.render.jsondoc import unit_hits_doc

    if (prompt is None) == (token is None):
        raise HexRayError("give --prompt (with --position) or --token, one of them")
    if limit < 1:
        raise HexRayError(f"--limit must be at least 1, got {limit}")
    loaded = _load(model, True)
    with open_index(_ensure_index(loaded, index), loaded.spec) as opened:
        if token is not None:
            hits = search_token(opened, loaded.single_token(token, role="token"), limit=limit)
            search, title = {"token": token}, f"Units whose top examples centre on {token!r}"
        else:
            found = search_position(opened, loaded, prompt, position, limit=limit)
            hits = found.hits
            search, title = {"prompt": prompt, "position": found.position, "token": found.tokens[found.position]}, f"Units firing at {found.tokens[found.position]!r} (position {found.position}), by activation / their max"
    if json_out:
        sys.stdout.write(json.dumps(unit_hits_doc(hits, search=search), allow_nan=False) + "\n")
        return
    render_unit_hits(hits, _console(), title=title)


@index_app.command("label")
def index_label_command(
    explainer: Annotated[str, typer.Option("--explainer", help="Your explainer as module:attribute (name, explain(page), simulate(label, tokens)); see hexray.neuroscope.labels.Explainer.")],
    units: Annotated[str, typer.Option("--units", help="Comma-separated units to label: L10N1234,L9H6,NAME:123.")],
    held_out_tokens: Annotated[int, typer.Option("--held-out-tokens", help="Held-out corpus tokens (after the indexed ones) its simulations are scored on.")] = 20_000,
    corpus: CorpusOpt = None,
    index: IndexOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Label units with your own explainer (e.g. an LLM you run); each label is scored by how well its simulation predicts held-out activations."""
    from hexray.corpus.packs import token_pack
    from hexray.neuroscope import read_info
    from hexray.neuroscope.index import indexed_tokens, split_held_out
    from hexray.neuroscope.labels import explain_units, load_explainer

    _flags.update({"explainer": "--explainer", "unit": "--units", "corpus": "--corpus"})
    if held_out_tokens < 1:
        raise HexRayError(f"--held-out-tokens must be at least 1, got {held_out_tokens}")
    names = [u.strip() for u in units.split(",") if u.strip()]
    if not names:
        raise HexRayError("--units names no unit", hint="e.g. --units L10N1234,L9H6")
    chosen = load_explainer(explainer)
    loaded = _load(model, True)
    path = _index_path(index, loaded.spec)
    info = read_info(path)
    have = indexed_tokens(path, loaded, corpus, info.context_size)
    both = token_pack(loaded, corpus, context_size=info.context_size, max_tokens=have + held_out_tokens)
    _, held_out = split_held_out(both, have)
    if held_out is None:
        raise HexRayError("the corpus has no text after the indexed tokens to score on", hint="give --corpus another corpus the index did not read")
    got = explain_units(path, loaded, chosen, names, held_out)
    rows = [{"unit": n, "label": x.text, "score": None if x.score != x.score else round(x.score, 4), "source": x.source} for n, x in zip(names, got)]
    if json_out:
        sys.stdout.write(json.dumps({"index": str(path), "labels": rows}, allow_nan=False) + "\n")
        return
    for r in rows:
        _console().print(f"{r['unit']:>12}  {escape(r['label'])}  [dim](score {'not measurable' if r['score'] is None else r['score']})[/]", highlight=False)


@index_app.command("info")
def index_info_command(index: IndexOpt = None, model: ModelOpt = None, json_out: JsonOpt = False) -> None:
    """What an index holds: model, corpus, tokens, units, build time, size."""
    from hexray.neuroscope import read_info

    loaded = _load(model, True)
    path = _index_path(index, loaded.spec)
    if not path.exists():
        raise HexRayError(f"no index at {path}", hint="build one: hexray index build")
    info = read_info(path)
    doc = {"index": str(info.path), "model": info.model, "corpus": info.corpus, "tokens": info.tokens, "contexts": info.contexts,
           "context_size": info.context_size, "top_k": info.top_k, "units": dict(info.units), "dictionaries": list(info.dictionaries),
           "sources": [{"corpus": x["corpus"], "tokens": x["tokens"], "first_context": x["first_context"]} for x in info.sources],
           "created": info.created, "seconds": dict(info.seconds), "size_bytes": info.size_bytes}
    if json_out:
        sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
        return
    for key, value in doc.items():
        _console().print(f"{key:>13}  {escape(str(value))}", highlight=False)


def _open_when_listening(host: str, port: int, url: str, wait: float = 60.0) -> None:
    """Open ``url`` in a browser as soon as the server accepts connections."""
    import socket
    import time
    import webbrowser

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    webbrowser.open(url)


_PASSTHROUGH = {"--help", "-h", "--version"}


def main(argv: list[str] | None = None, *, warm: bool = True) -> int:
    """Console-script entry point; returns the exit code (and exits with it when run as a script).

    ``warm=False``: never hand the command to a server (the server itself, and hexray.warm.main, which already tried).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if warm:
        from hexray.warm import dispatch  # the parameter shadows the module here

        code, args = dispatch(args)
        if code is not None:
            return code
    args = args or ["--help"]
    _flags.clear()  # the flags of this command only (a server runs many)
    if args and args[0].startswith("-") and args[0] not in _PASSTHROUGH:
        args.insert(0, "trace")  # the reference tool's `hexray --prompt ...`
    if args[:1] == ["--version"]:
        from hexray import __version__

        print(f"hexray {__version__}")
        return 0
    try:
        code = app(args, prog_name="hexray", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) inside a command comes back as a return value
            return code
    except HexRayError as exc:
        _stderr().print(f"[bold red]error:[/] {escape(exc.one_line(lambda field: spell_indexed(field, _flag_of)))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # click's usage errors: bad option, missing --prompt...
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return getattr(exc, "exit_code", 2) or 2
    except (typer.Abort, KeyboardInterrupt):
        _stderr().print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
