"""Whole training runs, from a corpus to a saved, measured artifact: what ``hexray dict train``,
``hexray lens train`` and the embedded model's first-use defaults run.

A run's output folder appears only when it is complete (the writers rename a finished temporary
folder into place); an interrupted dictionary run leaves a checkpoint beside it that ``resume``
continues from.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hexray.errors import HexRayError
from hexray.features.dictionary import Dictionary, DictSite
from hexray.features.train import Quality, TrainOptions, evaluate, harvest, train_dictionary
from hexray.models.loading import LoadedModel

# what the embedded model gets without anyone training anything: sized to build in a few minutes on two CPU cores
DEFAULT_SITES: tuple[str, ...] = ("resid.6", "resid.12", "resid.18")
DEFAULT_LATENTS, DEFAULT_K = 2048, 32
DEFAULT_TOKENS = 64_000
DEFAULT_EPOCHS = 2
DEFAULT_HELD_OUT = 2_048
DEFAULT_LENS_STEPS = 60
DEFAULT_LENS_BATCH = 2  # contexts per step
DEFAULT_LENS_STRIDE = 4  # the loss reads every 4th position: 30 vocabulary-sized products per token dominate a step on a CPU
DEFAULT_CONTEXT = 128

Stage = Callable[[str, int, int, str], None]  # (stage, done, total, detail): "corpus", "harvest", "train", "evaluate"


@dataclass(frozen=True)
class Built:
    """One finished dictionary run."""

    dictionary: Dictionary
    folder: Path
    quality: Quality
    seconds: dict[str, float]  # harvest, train, evaluate


class Interrupted(Exception):
    """A run stopped by the user; ``checkpoint`` (if any) resumes it."""

    def __init__(self, what: str, checkpoint: Path | None):
        super().__init__(what)
        self.checkpoint = checkpoint


def corpus_split(model: LoadedModel, corpus: str | Path | None, *, tokens: int, held_out: int, context_size: int,
                 chat_template: bool = False, stage: Stage | None = None):
    """(train pack, held-out pack) of about ``tokens`` and ``held_out`` counted tokens."""
    from hexray.corpus.packs import token_pack

    say = (lambda done, total: stage("corpus", done, total or tokens + held_out, "")) if stage else None
    pack = token_pack(model, corpus, context_size=context_size, max_tokens=tokens + held_out, chat_template=chat_template, progress=say)
    per_context = max(1, pack.n_tokens // max(1, pack.n_contexts))
    n_held = max(1, -(-held_out // per_context))
    if pack.n_contexts < 2:
        raise HexRayError(f"the corpus {pack.source} gave {pack.n_tokens} tokens, too few to train and measure on", hint="give a larger corpus", field="corpus")
    return pack.split(min(n_held, pack.n_contexts - 1))


def train_dictionaries(
    model: LoadedModel,
    options: list[TrainOptions],
    outs: list[Path],
    *,
    corpus: str | Path | None = None,
    context_size: int = DEFAULT_CONTEXT,
    held_out: int = DEFAULT_HELD_OUT,
    chat_template: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    stage: Stage | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Built]:
    """Train one dictionary per ``options`` entry (sharing one corpus pass), measure each, save each to its ``outs`` folder."""
    from hexray.features.formats import save_dictionary

    for opts in options:
        opts.validate()
    for out in outs:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise HexRayError(f"{out} already holds a dictionary", hint="pick another --out, or --force to replace it", field="out")
    tokens = max(o.tokens for o in options)
    train, test = corpus_split(model, corpus, tokens=tokens, held_out=held_out, context_size=context_size, chat_template=chat_template, stage=stage)
    batch = max(o.batch_tokens for o in options)
    if int(train.counted.sum()) < batch:
        raise HexRayError(f"the corpus {train.source} gave {int(train.counted.sum())} training tokens, fewer than one batch ({batch})",
                          hint="give a larger corpus, or a smaller --batch-tokens", field="corpus")
    if should_stop is not None and should_stop():  # Ctrl-C while the corpus was read
        raise Interrupted("stopped while reading the corpus", None)
    say = (lambda done, total: stage("harvest", done, total, "")) if stage else None
    harvests = harvest(model, [o.site for o in options], train.tokens, train.counted, max_tokens=tokens, progress=say, should_stop=should_stop)
    if should_stop is not None and should_stop():
        raise Interrupted("stopped while reading activations", None)
    built = []
    for opts, out, data in zip(options, outs, harvests):
        checkpoint = checkpoint_path(out)
        if not resume and checkpoint.exists():
            checkpoint.unlink()
        opts = replace(opts, tokens=data.n)
        start = time.perf_counter()

        def on_step(step, steps, fvu, label=opts.site.label):
            if stage:
                stage("train", step, steps, f"{label} FVU {fvu:.3f}")

        d, finished = train_dictionary(model, opts, data, checkpoint=checkpoint, progress=on_step, should_stop=should_stop)
        trained = time.perf_counter() - start
        if not finished:
            raise Interrupted(f"stopped training {opts.site.label}", checkpoint)
        if stage:
            stage("evaluate", 0, 1, opts.site.label)
        start = time.perf_counter()
        quality = evaluate(model, d, test.tokens, test.counted)
        measured = time.perf_counter() - start
        if stage:
            stage("evaluate", 1, 1, opts.site.label)
        d = replace(d, name=out.name, context_size=context_size, prepend_bos=model.tokenizer.bos_token_id is not None,
                    meta={**d.meta, "quality": quality.as_dict(), "density": quality.density,
                          "corpus": {"source": train.source, "key": train.key, "train_tokens": data.n, "held_out_tokens": test.n_tokens, "context_size": context_size},
                          "seconds": {"harvest": data.seconds, "train": trained, "evaluate": measured}})
        save_dictionary(d, out, spec=model.spec, overwrite=overwrite)
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
        built.append(Built(d, out, quality, {"harvest": data.seconds, "train": trained, "evaluate": measured}))
    return built


def checkpoint_path(out: Path) -> Path:
    """Where an unfinished run keeps its state: beside the output, never inside it (which appears only when done)."""
    return out.with_name(f".{out.name}.partial") / "checkpoint.pt"


def default_options(model: LoadedModel) -> list[TrainOptions]:
    from hexray.features.dictionary import parse_site

    return [TrainOptions(parse_site(s, model.spec), "topk", DEFAULT_LATENTS, DEFAULT_K, DEFAULT_TOKENS, epochs=DEFAULT_EPOCHS) for s in DEFAULT_SITES]


def default_sites(model: LoadedModel) -> tuple[str, ...]:
    """The dictionary sites the model gets on first use: the embedded model's (other models train their own)."""
    return DEFAULT_SITES if model.spec.source == "embedded" else ()


def build_defaults(model: LoadedModel, *, stage: Stage | None = None, should_stop: Callable[[], bool] | None = None,
                   tokens: int = DEFAULT_TOKENS, held_out: int = DEFAULT_HELD_OUT, lens_steps: int = DEFAULT_LENS_STEPS) -> dict:
    """Train the default dictionaries and tuned lens that are missing; what was built, with timings."""
    from hexray.features.store import model_dictionaries_root
    from hexray.features.tuned_lens import default_tuned_lens_path

    root = model_dictionaries_root(model.spec)
    todo = [replace(o, tokens=tokens) for o in default_options(model) if not (root / o.site.label).exists()]
    out: dict = {"dictionaries": [], "tuned_lens": None}
    start = time.perf_counter()
    if todo:
        built = train_dictionaries(model, todo, [root / o.site.label for o in todo], held_out=held_out, stage=stage, should_stop=should_stop, resume=True)
        out["dictionaries"] = [{"name": b.folder.name, "folder": str(b.folder), **b.quality.as_dict(), "seconds": b.seconds} for b in built]
    if not default_tuned_lens_path(model).exists():
        lens = train_lens(model, steps=lens_steps, stage=stage, should_stop=should_stop)
        out["tuned_lens"] = {"folder": str(default_tuned_lens_path(model)), **{k: v for k, v in lens.meta.items() if k in ("tokens", "steps", "seconds")}}
    out["seconds"] = time.perf_counter() - start
    return out


def train_lens(model: LoadedModel, *, corpus: str | Path | None = None, steps: int = DEFAULT_LENS_STEPS, batch_contexts: int = DEFAULT_LENS_BATCH,
               stride: int = DEFAULT_LENS_STRIDE,
               context_size: int = DEFAULT_CONTEXT, held_out: int = DEFAULT_HELD_OUT, out: Path | None = None, overwrite: bool = False,
               stage: Stage | None = None, should_stop: Callable[[], bool] | None = None):
    """Train, measure (held-out KL per layer, tuned vs logit lens) and save a tuned lens; the lens."""
    from hexray.features.tuned_lens import default_tuned_lens_path, lens_kl, save_tuned_lens, train_tuned_lens

    folder = out or default_tuned_lens_path(model)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise HexRayError(f"{folder} already holds a tuned lens", hint="pick another --out, or --force to replace it", field="out")
    tokens = steps * batch_contexts * context_size
    train, test = corpus_split(model, corpus, tokens=tokens, held_out=held_out, context_size=context_size, stage=stage)
    positions = torch.arange(context_size)
    thinned = train.counted & (positions % stride == (stride - 1))  # distinct contexts matter more than neighbouring positions
    start = time.perf_counter()
    lens = train_tuned_lens(model, train.tokens, thinned, steps=steps, batch_contexts=batch_contexts,
                            progress=(lambda s, n, loss: stage("lens", s, n, f"KL {loss:.3f}")) if stage else None, should_stop=should_stop)
    if lens.meta.get("stopped_early"):
        raise Interrupted("stopped training the tuned lens", None)
    trained = time.perf_counter() - start
    if stage:
        stage("evaluate", 0, 1, "tuned lens")
    measured = test.counted & (torch.arange(test.tokens.shape[1]) % stride == (stride - 1))  # thinned like training: the vocabulary products dominate
    tuned, logit = lens_kl(model, lens, test.tokens, measured), lens_kl(model, None, test.tokens, measured)
    lens = replace(lens, meta={**lens.meta, "stride": stride, "held_out_kl_bits": {"tuned": [float(x) for x in tuned], "logit": [float(x) for x in logit]},
                               "corpus": {"source": train.source, "key": train.key, "held_out_tokens": int(measured.sum())}, "seconds": trained})
    save_tuned_lens(lens, folder)
    return lens
