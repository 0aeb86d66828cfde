"""Writing ``--report DIR``: PNGs (and the arithmetic SVG), ``hexray.json`` and ``index.html``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from hexray.analysis.report import Report
from hexray.analysis.results import HeadClassification
from hexray.generation.results import GenerationResult
from hexray.intervene.results import AblationResult, PatchingResult
from hexray.errors import HexRayError
from hexray.render import plots
from hexray.render.html import ablation_html, generation_html, heads_html, patching_html, report_html


def _folder_path(folder: str | Path, flag: str) -> Path:
    """``folder`` as a Path: not empty (that would be the current directory), and a folder if it exists."""
    if not str(folder).strip():
        raise HexRayError(f"{flag} is empty", hint="name a folder, e.g. hexray-report")
    path = Path(folder).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise HexRayError(f"{flag} {folder} exists and is not a folder")
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise HexRayError(f"{flag} {str(folder)[:80]}: {exc.strerror}", hint="choose a shorter folder name") from None
    return path


def check_writable(folder: str | Path, flag: str = "--report") -> Path:
    """Fail early (before any model work) if ``folder`` cannot be created and written.

    Probes by creating the folder and a file in it, then removes whatever the probe created.
    """
    path = _folder_path(folder, flag)
    try:
        missing = [p for p in [path, *path.parents] if not p.exists()]
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise HexRayError(f"{flag} {str(folder)[:80]}: {exc.strerror}", hint="choose a shorter folder name") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise HexRayError(f"{flag} folder {folder} is not writable: {exc.strerror}", hint="choose a folder you can write to") from exc
    finally:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
    return path


def figures(report: Report) -> dict[str, bytes]:
    """Every figure the report's analyses call for, by file name (registry order)."""
    ctx, out = report.context, {}
    for analysis, result in report.computed():
        if analysis.figures is not None:
            out.update(analysis.figures(result, ctx))
    return out


def write_report(folder: str | Path, report: Report, document: dict) -> list[Path]:
    """The trace report: figures, ``hexray.json`` and ``index.html``."""
    files = figures(report)
    files["hexray.json"] = json.dumps(document, indent=2, allow_nan=False).encode()
    files["index.html"] = report_html(report, {k: v for k, v in files.items() if k.endswith(".png")}).encode()
    return write_files(folder, files)


def _previous_report(folder: Path) -> set[str]:
    """The files an earlier HexRay report left in ``folder``: its kinds of file, where its ``hexray.json`` is."""
    if not (folder / "hexray.json").is_file():
        return set()
    return {p.name for p in folder.iterdir() if p.is_file() and (p.name in ("hexray.json", "index.html") or p.suffix in (".png", ".svg"))}


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on the folder itself (POSIX flock on its descriptor; a no-op where that is unavailable)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_files(folder: str | Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``files`` (name -> bytes) into ``folder`` all at once: stage them, then move each in.

    Everything is rendered before this is called, so a failure leaves no half-written report. A
    file HexRay did not write is never overwritten, and an earlier report's files that this one
    does not have are removed, so no stale figure sits beside the new ``hexray.json``.
    """
    folder = _folder_path(folder, "--report")
    previous = _previous_report(folder) if folder.is_dir() else set()
    foreign = sorted(name for name in files if (folder / name).exists() and name not in previous)
    if foreign:
        raise HexRayError(f"--report {folder} already holds {', '.join(foreign[:3])}, which HexRay did not write", hint="choose an empty or new folder, or move those files away")
    for attempt in range(3):  # another writer's writability probe may remove the folder it just created
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".hexray-partial-", dir=folder))
            break
        except FileNotFoundError:
            if attempt == 2:
                raise HexRayError(f"cannot write --report folder {folder}: it keeps disappearing") from None
        except OSError as exc:
            raise HexRayError(f"cannot write --report folder {folder}: {exc.strerror}") from exc
    try:
        for name, data in files.items():
            try:
                (staging / name).write_bytes(data)
            except OSError as exc:
                raise HexRayError(f"cannot write {name} in --report {folder}: {exc.strerror}", hint="choose a shorter name or another folder") from None
        with _folder_lock(folder):  # two reports written at once into one folder do not interleave
            previous = _previous_report(folder)
            written = []
            for name in files:
                os.replace(staging / name, folder / name)
                written.append(folder / name)
            for stale in previous - set(files):
                with contextlib.suppress(OSError):
                    (folder / stale).unlink()
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_page_path(path: str | Path, flag: str = "--html") -> Path:
    """Fail early (before any model work) when ``path`` cannot be a page: empty, a folder, or in no folder there is."""
    if not str(path).strip():
        raise HexRayError(f"{flag} is empty", hint="name a file, e.g. unit.html")
    out = Path(path).expanduser()
    try:
        if out.is_dir():
            raise HexRayError(f"{flag} {path} is a folder", hint="name a file in it, e.g. unit.html")
        if not out.parent.is_dir():
            raise HexRayError(f"{flag} {path}: there is no folder {out.parent}", hint="create the folder first, or name a file in an existing one")
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise HexRayError(f"{flag} {str(path)[:80]}: {exc.strerror}", hint="choose a shorter file name") from None
    return out


def write_page(path: str | Path, html: str, flag: str = "--html") -> Path:
    """``html`` written to ``path`` at once: a temporary file beside it, then moved into place, so no reader sees half a page."""
    out = check_page_path(path, flag)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise HexRayError(f"cannot write {flag} {out}: {exc.strerror}", hint="choose a folder you can write to") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a page is read like any written file (the usual umask's mode)
        os.replace(tmp, out)
    except OSError as exc:
        raise HexRayError(f"cannot write {flag} {out}: {exc.strerror}", hint="check the disk has room and the folder is writable") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out


def _with_page(figs: dict[str, bytes], document: dict, page) -> dict[str, bytes]:
    files = dict(figs)
    files["hexray.json"] = json.dumps(document, indent=2, allow_nan=False).encode()
    files["index.html"] = page(figs).encode()
    return files


def patching_files(r: PatchingResult, document: dict, k: int) -> dict[str, bytes]:
    figs = {f"patch_{sweep.replace('-', '_')}.png": plots.patch_heatmap(r, sweep) for sweep in r.sweeps}
    if r.method == "both":
        figs["exact_vs_attribution.png"] = plots.patch_scatter(r)
    return _with_page(figs, document, lambda f: patching_html(r, f, k))


def ablation_files(r: AblationResult, document: dict) -> dict[str, bytes]:
    return _with_page({"ablation.png": plots.ablation_chart(r)}, document, lambda f: ablation_html(r, f))


def heads_files(h: HeadClassification, document: dict) -> dict[str, bytes]:
    return _with_page({"head_roles.png": plots.heads_map(h)}, document, lambda f: heads_html(h, f))


def generation_files(g: GenerationResult, document: dict, k: int) -> dict[str, bytes]:
    figs = {"reasoning_graph.png": plots.reasoning_graph_chart(g, "png"), "reasoning_graph.svg": plots.reasoning_graph_chart(g, "svg")}
    if g.steps:
        figs["cot_steps.png"] = plots.generation_steps_chart(g, k)
    return _with_page(figs, document, lambda f: generation_html(g, f))


def dataset_files(title: str, document: dict) -> dict[str, bytes]:
    """A dataset-level run's report: ``hexray.json`` and a page of its tables."""
    from hexray.render.html import dataset_html

    return _with_page({}, document, lambda f: dataset_html(title, document))
