"""The ``hexray`` command line: a thin shell over :mod:`hexray.analysis` and :mod:`hexray.render`.

``hexray --prompt ...`` (the reference tool's form) is ``hexray trace --prompt ...``.
User mistakes surface as :class:`~hexray.errors.HexRayError`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from hexray.errors import HexRayError
from hexray.models.loading import load_model

app = typer.Typer(
    name="hexray",
    help="A debugger for transformer language models: see how a prediction forms, layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", envvar="HEXRAY_MODEL", help="Model: HF id, local folder, .gguf file, or an alias like gpt2-small. Default: the embedded SmolLM2-135M-Instruct.")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="The text to run through the model.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Folder for the PNG figures, hexray.json and index.html.")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="HEXRAY_DEVICE", help="cpu | cuda | cuda:N | mps | auto (CUDA, else MPS, else CPU).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", envvar="HEXRAY_DTYPE", help="float32 | bfloat16 | float16: what the model computes in (attribution accumulates in float32).")]
BosOpt = Annotated[Optional[bool], typer.Option("--prepend-bos/--no-prepend-bos", help="Force a BOS token on or off (default: the model's own tokenizer behaviour).")]

FIGURE_DEFAULT_REPORT = Path("hexray-report")


@app.callback()
def _root() -> None:
    """A debugger for transformer language models: see how a prediction forms, layer by layer."""


def _stderr() -> Console:
    return Console(stderr=True)


@contextmanager
def _status(message: str, quiet: bool):
    """A spinner on stderr for slow steps (silent when stderr is not a terminal)."""
    console = _stderr()
    if quiet or not console.is_terminal:
        yield lambda _msg: None
        return
    with console.status(message) as status:
        yield lambda msg: status.update(msg)


def _load(model: str | None, quiet: bool, device: str = "cpu", dtype: str = "float32"):
    from hexray.models.loading import resolve_device, resolve_dtype

    resolve_device(device), resolve_dtype(dtype)  # a bad flag fails before a long load
    with _status("Loading model...", quiet) as update:
        return load_model(model, progress=update, device=device, dtype=dtype)


@app.command("trace")
def trace_command(
    prompt: PromptOpt,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    target: Annotated[Optional[str], typer.Option(help="Explain this token's logit (one token, e.g. ' Mary'). Default: the prediction.")] = None,
    contrast: Annotated[Optional[str], typer.Option(help="Explain logit(target) - logit(contrast), e.g. ' John'.")] = None,
    token_index: Annotated[int, typer.Option("--token-index", help="Position whose next-token prediction to explain; negative counts from the end.")] = -1,
    granularity: Annotated[str, typer.Option(help="layer | head | neuron.")] = "layer",
    top_k_attribution: Annotated[Optional[int], typer.Option("--top-k-attribution", "-k", help="Show the top K components (default 10).")] = None,
    logit_lens: Annotated[bool, typer.Option("--logit-lens", help="Top tokens and the target's rank after every layer.")] = False,
    lens_k: Annotated[int, typer.Option("--lens-k", help="Tokens per layer in the logit lens.")] = 5,
    residual: Annotated[bool, typer.Option("--residual", help="Residual-stream trace (shown by default when no other analysis is asked for).")] = False,
    logit_debug: Annotated[bool, typer.Option("--logit-debug", help="Per-head attribution heatmap and per-layer bars (PNG in --report).")] = False,
    cot_debug: Annotated[bool, typer.Option("--cot-debug", help="Split the prompt into reasoning steps; attribute each step's last token in full context.")] = False,
    weight_heatmap: Annotated[Optional[list[str]], typer.Option("--weight-heatmap", help="Weight to plot, e.g. attn.L10.W_Q or mlp.L6.W_in (repeatable).")] = None,
    arithmetic_graph: Annotated[bool, typer.Option("--arithmetic-graph", help="Graph of how the model computed an arithmetic answer (PNG/SVG in --report).")] = False,
    save_activations: Annotated[Optional[Path], typer.Option("--save-activations", help="Write activations (safetensors + manifest.json) to this folder.")] = None,
    save_hooks: Annotated[Optional[str], typer.Option("--save-hooks", help="Comma-separated hook-name globs to save (default: residual stream per layer).")] = None,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    prepend_bos: BosOpt = None,
) -> None:
    """Trace a prompt: residual stream, direct logit attribution, logit lens, and more."""
    from hexray.analysis.report import AnalysisOptions, analyze
    from hexray.render.files import check_writable, write_report
    from hexray.render.jsondoc import report_document
    from hexray.tracing.activations import check_fired, select_hooks
    from hexray.tracing.activations import save_activations as save_acts

    asked = top_k_attribution is not None or logit_lens or logit_debug or cot_debug or weight_heatmap or arithmetic_graph or save_activations
    if report is None and (logit_debug or weight_heatmap or arithmetic_graph):
        report = FIGURE_DEFAULT_REPORT
    options = AnalysisOptions(
        target=target, contrast=contrast, token_index=token_index, granularity=granularity,  # type: ignore[arg-type]
        top_k=10 if top_k_attribution is None else top_k_attribution, logit_lens=logit_lens, lens_k=lens_k,
        residual=residual or not asked, logit_debug=logit_debug, cot=cot_debug,
        weight_specs=tuple(weight_heatmap or ()), arithmetic=arithmetic_graph, prepend_bos=prepend_bos,
    )
    options.validate()
    if save_hooks and save_activations is None:
        raise HexRayError("--save-hooks needs --save-activations DIR")
    for folder, flag in ((report, "--report"), (save_activations, "--save-activations")):
        if folder is not None:
            check_writable(folder, flag)
    loaded = _load(model, json_out, device, dtype)
    hooks = tuple(select_hooks(loaded, save_hooks)) if save_activations else ()
    with _status("Tracing...", json_out):
        result = analyze(loaded, prompt, dataclasses.replace(options, save_hooks=hooks))
        document = report_document(result)
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

    console = Console()
    render_report(result, console)
    if written:
        console.print(f"[green]Report written to {escape(str(report))}/[/] ({', '.join(p.name for p in written)})")
    if save_activations is not None:
        console.print(f"[green]Saved {len(hooks)} hook points to {escape(str(save_activations))}/[/] (read back with hexray.load_activations)")


TargetOpt = Annotated[Optional[str], typer.Option(help="Target token (one token, e.g. ' Mary').")]
ContrastOpt = Annotated[Optional[str], typer.Option(help="Contrast token: the metric is logit(target) - logit(contrast).")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="Rows in each console table.")]


def _finish(json_out: bool, report: Path | None, document: dict, files, show) -> None:
    """Print JSON or the console view, and write the report (all files at once)."""
    from hexray.render.files import write_files

    written = write_files(report, files()) if report is not None else []
    if json_out:
        if written:
            document["report_files"] = [str(p) for p in written]
        sys.stdout.write(json.dumps(document, allow_nan=False) + "\n")
        return
    console = Console()
    show(console)
    if written:
        console.print(f"[green]Report written to {escape(str(report))}/[/] ({', '.join(p.name for p in written)})")


@app.command("patch")
def patch_command(
    clean: Annotated[str, typer.Option("--clean", help="The prompt with the behaviour (e.g. the IOI sentence).")],
    corrupt: Annotated[str, typer.Option("--corrupt", help="The same prompt with the behaviour broken (same token length).")],
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    target: TargetOpt = None,
    contrast: ContrastOpt = None,
    sweep: Annotated[Optional[str], typer.Option(help="Comma-separated: heads, heads-pos, resid, attn, mlp, neurons (attribution only), or all. Default: heads,resid (attribution: all).")] = None,
    method: Annotated[str, typer.Option(help="exact | attribution | both.")] = "exact",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Patched variants per forward pass (default: what fits ~1.5 GB).")] = None,
    last_position: Annotated[bool, typer.Option("--last-position", help="Patch only the final token; the prompts may then differ in length.")] = False,
    top_k: TopKOpt = 10,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    prepend_bos: BosOpt = None,
) -> None:
    """Activation patching: which sites, patched from the clean run into the corrupt one, restore the behaviour."""
    from hexray.intervene.patching import activation_patching, parse_sweeps
    from hexray.render.files import check_writable, patching_files
    from hexray.render.jsondoc import patch_document

    parse_sweeps(sweep, method)
    if top_k <= 0:
        raise HexRayError(f"--top-k must be positive, got {top_k}")
    if batch_size is not None and batch_size <= 0:
        raise HexRayError(f"--batch-size must be positive, got {batch_size}")
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    with _status("Patching...", json_out) as update:
        result = activation_patching(
            loaded, clean, corrupt, target=target, contrast=contrast, sweeps=sweep, method=method,  # type: ignore[arg-type]
            last_position_only=last_position, batch_size=batch_size, prepend_bos=prepend_bos,
            progress=lambda done, total: update(f"Patching: {done}/{total} sites"),
        )
    from hexray.render.console import render_patching

    document = patch_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: patching_files(result, document, top_k), lambda c: render_patching(result, c, top_k))


@app.command("ablate")
def ablate_command(
    prompt: PromptOpt,
    components: Annotated[str, typer.Option("--components", "-c", help="Comma-separated: L9H6, ATTN9, MLP10, L10N1234, RESID12; add @P for one position (L9H6@-1).")],
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    mode: Annotated[str, typer.Option(help="zero | mean | resample.")] = "zero",
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Reference prompts for mean/resample, one a line (default: a built-in set).")] = None,
    samples: Annotated[int, typer.Option(help="Resample draws to average.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for resampling.")] = 0,
    target: TargetOpt = None,
    contrast: ContrastOpt = None,
    token_index: Annotated[int, typer.Option("--token-index", help="Position whose next-token distribution to compare; negative counts from the end.")] = -1,
    top_k: TopKOpt = 10,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    prepend_bos: BosOpt = None,
) -> None:
    """Ablate components together and compare the next-token distribution before and after."""
    from hexray.intervene.ablation import ablate, check_ablation_options, parse_sites, read_reference_prompts
    from hexray.render.files import ablation_files, check_writable
    from hexray.render.jsondoc import ablation_document

    check_ablation_options(mode, k=top_k, samples=samples)
    refs = read_reference_prompts(reference) if reference is not None else None
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    sites = parse_sites(components, loaded.spec)
    with _status("Ablating...", json_out):
        result = ablate(
            loaded, prompt, sites, mode=mode, reference=refs, samples=samples, seed=seed,  # type: ignore[arg-type]
            target=target, contrast=contrast, token_index=token_index, k=top_k, prepend_bos=prepend_bos,
        )
    from hexray.render.console import render_ablation

    document = ablation_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: ablation_files(result, document), lambda c: render_ablation(result, c, top_k))


@app.command("heads")
def heads_command(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text for the previous-token, duplicate-token and BOS scores (default: a built-in text).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    threshold: Annotated[float, typer.Option(help="Minimum score for a head to get a role label.")] = 0.4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Length of each random sequence (repeated once) for the induction score.")] = 25,
    sequences: Annotated[int, typer.Option("--sequences", help="Random sequences to average the induction score over.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for the random sequences.")] = 0,
    top_k: TopKOpt = 5,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    prepend_bos: BosOpt = None,
) -> None:
    """Classify every attention head: previous-token, duplicate-token, induction, BOS/sink."""
    from hexray.analysis.heads import classify_heads
    from hexray.render.files import check_writable, heads_files
    from hexray.render.jsondoc import heads_document

    if not 0 <= threshold <= 1:
        raise HexRayError(f"--threshold must be between 0 and 1, got {threshold}")
    if top_k <= 0:
        raise HexRayError(f"--top-k must be positive, got {top_k}")
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    with _status("Scoring heads...", json_out):
        result = classify_heads(loaded, prompt, threshold=threshold, seq_len=seq_len, n_sequences=sequences, seed=seed, prepend_bos=prepend_bos)
    from hexray.render.console import render_heads

    document = heads_document(result, loaded.spec)
    _finish(json_out, report, document, lambda: heads_files(result, document), lambda c: render_heads(result, c, top_k))


@app.command("generate")
def generate_command(
    prompt: PromptOpt,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default, reproducible); > 0 samples.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template to the prompt.")] = False,
    text: Annotated[Optional[str], typer.Option("--text", help="Trace this continuation of the prompt instead of generating.")] = None,
    granularity: Annotated[str, typer.Option(help="Components per token: layer | head | neuron.")] = "head",
    top_k: TopKOpt = 3,
    watch: Annotated[Optional[str], typer.Option("--watch", help="Components to watch at every token: L10N1234, L9H6, MLP10, ATTN9, RESID12.")] = None,
    watch_threshold: Annotated[Optional[float], typer.Option("--watch-threshold", help="Mark tokens where a watched value reaches this (absolute value).")] = None,
    cot_debug: Annotated[bool, typer.Option("--cot-debug", help="Per-step bar charts of the components over the generated steps.")] = False,
    graph_threshold: Annotated[float, typer.Option("--graph-threshold", help="Keep a dependency edge when it is at least this share of the step's largest.")] = 0.1,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines: one per token, then a final {done: true, ...} line.")] = False,
    report: ReportOpt = None,
) -> None:
    """Generate while tracing every token: what wrote it, which steps it drew on, watched components."""
    from hexray.generation.tracer import GenerationOptions, TracedGeneration
    from hexray.render.files import check_writable, generation_files, write_files
    from hexray.render.console import render_generation_summary, token_line
    from hexray.render.jsondoc import generation_done_doc, token_record_doc

    options = GenerationOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat, granularity=granularity,  # type: ignore[arg-type]
        top_k=top_k, watch=tuple(p.strip() for p in (watch or "").split(",") if p.strip()), watch_threshold=watch_threshold,
        text=text, graph_threshold=graph_threshold,
    )
    options.validate()
    if report is not None:
        check_writable(report)
    loaded = _load(model, json_out, device, dtype)
    run = TracedGeneration(loaded, prompt, options)
    console = Console()
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
    done = generation_done_doc(result)
    if report is not None:
        written = write_files(report, generation_files(result, done, top_k))
        done["report_files"] = [str(p) for p in written]
    if json_out:
        sys.stdout.write(json.dumps(done, allow_nan=False) + "\n")
    else:
        render_generation_summary(result, console, top_k, bars=cot_debug)
        if report is not None:
            console.print(f"[green]Report written to {escape(str(report))}/[/]")
    if interrupted:
        raise typer.Exit(130)


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
) -> None:
    """Serve the HexRay lab (web page, REST API and WebSockets) with the model loaded once."""
    import socket

    import uvicorn

    from hexray.server.app import create_app

    if not 0 < port < 65536:
        raise HexRayError(f"--port {port} is out of range", hint="use 1..65535")
    if time_limit <= 0:
        raise HexRayError(f"--time-limit must be positive, got {time_limit}")
    if max_tokens <= 0:
        raise HexRayError(f"--max-tokens must be positive, got {max_tokens}")
    try:  # a taken port fails now, before a model load of many seconds
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise HexRayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        _stderr().print(f"[bold yellow]warning:[/] binding to {escape(host)}: anyone who can reach this address can run the model", highlight=False)
    loaded = _load(model, False, device, dtype)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    _stderr().print(f"HexRay lab for {escape(loaded.name)} on {escape(url)}  (Ctrl-C stops it)", highlight=False)
    app_ = create_app(loaded, time_limit=time_limit, max_tokens=max_tokens)
    if open_browser:
        import threading

        threading.Thread(target=_open_when_listening, args=(host, port, url), daemon=True).start()
    uvicorn.run(app_, host=host, port=port, log_level="warning")


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


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (and exits with it when run as a script)."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
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
        _stderr().print(f"[bold red]error:[/] {escape(exc.one_line())}", highlight=False, soft_wrap=True)
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
