"""Traced generation: every new token with what wrote it, one incremental (KV-cached) pass each.

Each step runs only the new token through the model, reusing the cache of earlier keys and values,
and captures at that one position what direct attribution needs (head outputs, MLP outputs or
neurons, the final-norm scale), the attention patterns, and each layer's values. From those:

- the token's own logit split into components (exact, as in the core's attribution);
- the logit the heads moved from each earlier position ("routed" attribution): head h at query
  q writes ``sum_k A[h,q,k] v_k W_O[h]``, so source k's share of the logit is
  ``A[h,q,k] (v_k W_O[h]) . d``, which sums over k to the head's attribution.

Use :class:`TracedGeneration`: iterate it for :class:`TokenRecord` s as they are produced, then
call :meth:`TracedGeneration.result` (also after an interruption) for steps and the graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hexray.analysis.attribution import attribution_hooks, direct_logit_attribution, logit_direction, residual_direction, write_directions
from hexray.analysis.results import GRANULARITIES, PromptRef
from hexray.errors import HexRayError
from hexray.analysis.features import dictionary_hooks, feature_attribution, site_latents
from hexray.features.store import load_named
from hexray.generation.results import GenerationResult, StopReason, TokenFeature, TokenRecord
from hexray.generation.steps import reasoning_steps
from hexray.models.loading import LoadedModel
from hexray.options import Option, options_class
from hexray.tracing import sites
from hexray.tracing.engine import IncrementalRun, Trace, tokenize_prompt
from hexray.tracing.sites import Component, parse_components


GENERATION_OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", int, 32, "Tokens to generate.", short="-n", api_le=1024),
    Option("temperature", float, 0.0, "0 = greedy (default, reproducible); > 0 samples.", ge=0),
    Option("seed", int | None, None, "Seed for sampling.", ge=0, le=2**63 - 1),
    Option("chat", bool, False, "Apply the model's chat template to the prompt."),
    Option("text", str | None, None, "Trace this continuation of the prompt instead of generating."),
    Option("granularity", str, "head", "Components per token: layer | head | neuron.", choices=GRANULARITIES, unknown="unknown granularity {value!r}"),
    Option("top_k", int, 3, "Components shown per token.", short="-k", gt=0, api_le=100),
    Option("watch", tuple[str, ...], (), "Components to watch at every token: L10N1234, L9H6, MLP10, ATTN9, RESID12 (comma-separated).", short=None),
    Option("watch_threshold", float | None, None, "Mark tokens where a watched value reaches this (absolute value)."),
    Option("graph_threshold", float, 0.1, "Keep a dependency edge when it is at least this share of the step's largest.", ge=0, le=1),
    Option("features", str | None, None, "Dictionaries (names such as resid.12, or folders; comma-separated): stream each new token's top features."),
    Option("features_k", int, 5, "Features shown per token with --features.", gt=0, api_le=64),
    Option("stop_at_eos", bool, True, "Stop at the end-of-text token.", flag="", api=False),
)


def _check_generation(o) -> None:
    if o.text is None and o.max_new_tokens <= 0:
        raise HexRayError(f"{{field}} must be positive, got {o.max_new_tokens}", field="max_new_tokens")
    if o.text is not None and not o.text.strip():
        raise HexRayError("{field} is empty", hint="give the continuation to trace", field="text")
    if 0 < o.temperature < 1e-3:  # dividing logits by less overflows to inf
        raise HexRayError(f"{{field}} must be 0 (greedy) or at least 0.001, got {o.temperature:g}", field="temperature")


GenerationOptions = options_class("GenerationOptions", GENERATION_OPTIONS, check=_check_generation, doc="The options of ``hexray generate`` and ``/api/generate``.")


def watch_value(component: Component, model: LoadedModel, acts: dict[str, torch.Tensor]) -> float:
    """A watched component's activation at the traced position.

    Neurons: their post-activation value. Heads: the norm of what they write (``|z_h W_O[h]|``).
    MLP / attention layers and the residual stream: the norm of their output.
    """
    c = component
    if c.kind == "neuron":
        return float(acts[sites.mlp_post(c.layer)][-1, c.neuron])
    if c.kind == "head":
        return float((acts[sites.head_z(c.layer)][-1, c.head] @ model.W_O[c.layer][c.head]).norm())
    return float(acts[sites.component_hook(c)][-1].norm())


class TracedGeneration:
    """Generate (or trace a given continuation) token by token; iterate for records."""

    def __init__(self, model: LoadedModel, prompt: str, options: GenerationOptions = GenerationOptions()):
        options.validate()
        self.model, self.prompt, self.options = model, prompt, options
        spec = model.spec
        self.watched = parse_components(",".join(options.watch), spec) if options.watch else ()
        for c in self.watched:
            if c.kind in ("embed", "bias") or (c.kind == "resid" and c.layer >= spec.n_layers):
                raise HexRayError(f"cannot watch {c.name}", hint="watch heads, neurons, MLP/ATTN layers or RESID0..RESID{}".format(spec.n_layers - 1))
        self.prompt_ids = self._prompt_ids()
        self.forced = None
        if options.text is not None:
            self.forced = model.tokenizer(options.text, add_special_tokens=False)["input_ids"]
            if not self.forced:
                raise HexRayError("{field} produced no tokens", field="text")
        n_new = len(self.forced) if self.forced is not None else options.max_new_tokens
        if len(self.prompt_ids) + n_new > spec.n_ctx:
            raise HexRayError(
                f"the prompt ({len(self.prompt_ids)} tokens) plus {n_new} new tokens is past {model.name}'s context of {spec.n_ctx}",
                hint="lower {field} or shorten the prompt", field="max_new_tokens",
            )
        self.dictionaries = load_named(options.features, spec, field="features") if options.features else ()
        self.hooks = (
            dictionary_hooks(spec, self.dictionaries)
            | attribution_hooks(spec, options.granularity)
            | {sites.attn_pattern(layer) for layer in range(spec.n_layers)}
            | {sites.head_v(layer) for layer in range(spec.n_layers)}
            | {sites.component_hook(c) for c in self.watched}
        )
        self.records: list[TokenRecord] = []
        self._scores: list[np.ndarray] = []
        self._components: tuple[Component, ...] | None = None
        self._value_buffer = torch.zeros(spec.n_layers, len(self.prompt_ids) + n_new, spec.n_kv_heads, spec.d_head, device=model.device)
        self._n_values = 0
        self._W_O = torch.stack(model.W_O)  # [layers, heads, d_head, d_model]
        self.stop_reason: StopReason = "text_end" if self.forced is not None else "max_new_tokens"
        self._started = False

    def _prompt_ids(self) -> list[int]:
        model = self.model
        if self.options.chat:
            if not getattr(model.tokenizer, "chat_template", None):
                raise HexRayError(f"{model.name} has no chat template", hint="turn {field} off", field="chat")
            if not self.prompt or not self.prompt.strip():
                raise HexRayError("{field}: the prompt is empty", hint="give {field} some text", field="prompt")
            out = model.tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}], add_generation_prompt=True, tokenize=True)
            ids = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
            return ids
        ids, _ = tokenize_prompt(model, self.prompt)
        return ids

    def __iter__(self) -> Iterator[TokenRecord]:
        if self._started:
            raise RuntimeError("a TracedGeneration runs once")  # a HexRay bug
        self._started = True
        model, opts = self.model, self.options
        gen = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
        eos = self.model.eos_ids() if opts.stop_at_eos and self.forced is None else set()
        n_new = len(self.forced) if self.forced is not None else opts.max_new_tokens
        tokens = torch.tensor([self.prompt_ids])
        run = IncrementalRun(model)
        position = len(self.prompt_ids) - 1
        for index in range(n_new):
            acts, logits = self._step(run, tokens)
            logits = logits.float()  # [d_vocab] at the predicting position
            if self.forced is not None:
                next_id = int(self.forced[index])
            elif opts.temperature == 0:
                next_id = int(logits.argmax())
            else:
                probs = torch.softmax(logits.double() / opts.temperature, -1)
                next_id = int(torch.multinomial(probs, 1, generator=gen))
            record = self._record(index, position, next_id, logits, acts)
            self.records.append(record)
            yield record
            if next_id in eos:
                self.stop_reason = "eos"
                return
            tokens = torch.tensor([[next_id]])
            position += 1

    def _step(self, run: IncrementalRun, tokens: torch.Tensor):
        """One (incremental) forward pass; activations at the last position only, values in full."""
        logits, store = run.step(tokens, self.hooks)
        acts = {}
        for hook, x in store.items():
            if hook.point == "pattern":
                acts[hook] = x[:, -1:, :]  # [heads, 1, k]
            elif hook.point == "v":  # [new, kv_heads, d_head] appended to this layer's values
                self._value_buffer[hook.layer, self._n_values : self._n_values + x.shape[0]] = x
            else:
                acts[hook] = x[-1:]
        self._n_values += tokens.shape[1]
        return acts, logits[-1]

    def _record(self, index: int, position: int, next_id: int, logits: torch.Tensor, acts: dict[str, torch.Tensor]) -> TokenRecord:
        model, opts, spec = self.model, self.options, self.model.spec
        one = Trace(model.name, self.prompt, (next_id,), ("",), ((0, 0),), logits[None], acts)
        attribution = direct_logit_attribution(model, one, position=0, target=next_id, granularity=opts.granularity)
        if self._components is None:
            self._components = tuple(sorted((c.component for c in attribution.components), key=_component_order))
            self._column = {c: i for i, c in enumerate(self._components)}
        row = np.zeros(len(self._components), dtype=np.float32)
        for c in attribution.components:
            row[self._column[c.component]] = c.score
        self._scores.append(row)

        u, _ = logit_direction(model, next_id, None)
        d = residual_direction(model, one, 0, u)  # [d_model]
        d_attn = torch.stack(write_directions(model, acts, 0, d)[0])  # [layers, d_model]
        n_src = position + 1
        values = self._value_buffer[:, :n_src]  # [layers, k, kv_heads, d_head]
        patterns = torch.stack([_left_pad(acts[sites.attn_pattern(layer)][:, 0, :], n_src) for layer in range(spec.n_layers)])  # [layers, heads, k]
        wo_d = torch.einsum("lhjm,lm->lhj", self._W_O, d_attn)  # [layers, heads, d_head]
        group = spec.n_heads // spec.n_kv_heads
        per_value = torch.einsum("lkgd,lgjd->lkgj", values, wo_d.view(spec.n_layers, spec.n_kv_heads, group, -1))  # [layers, k, kv, group]
        routed = torch.einsum("lhk,lkh->k", patterns, per_value.reshape(spec.n_layers, n_src, spec.n_heads))
        attention = patterns.sum((0, 1)) / (spec.n_layers * spec.n_heads)
        features = self._features(one, attribution) if self.dictionaries else ()
        watch = {c.name: watch_value(c, model, acts) for c in self.watched}
        threshold = opts.watch_threshold
        crossed = tuple(name for name, v in watch.items() if threshold is not None and abs(v) >= threshold)
        return TokenRecord(
            index=index,
            position=position,
            id=next_id,
            token=model.token_str(next_id),
            prob=attribution.target.prob,
            logit=attribution.target.logit,
            top=attribution.top(opts.top_k),
            reconstruction_error=attribution.reconstruction_error,
            source_dla=routed.cpu().numpy(),
            source_attention=attention.cpu().numpy(),
            watch=watch,
            crossed=crossed,
            features=features,
        )

    def _features(self, one: Trace, attribution) -> tuple[TokenFeature, ...]:
        """Each dictionary's top latents at the predicting position, with their exact share of the token's logit."""
        split = feature_attribution(self.model, one, attribution, self.dictionaries)
        share = {(c.component.layer, c.component.site, c.component.feature): c.score for c in split.components if c.component.kind == "feature"}
        out = []
        for d in self.dictionaries:
            a = site_latents(self.model, one, d)[0][0]  # [d_sae]
            values, index = a.topk(min(self.options.features_k, d.d_sae))
            out.extend(TokenFeature(d.name or d.site.label, d.feature_label(f), f, v, share.get((d.site.layer, d.site.kind, f), 0.0))
                       for v, f in zip(values.tolist(), index.tolist()) if v > 0)
        return tuple(out)

    def result(self) -> GenerationResult:
        """Everything traced so far, with reasoning steps and their graph."""
        model, opts = self.model, self.options
        ids = tuple(r.id for r in self.records)
        components = self._components or ()
        scores = np.stack(self._scores) if self._scores else np.zeros((0, len(components)), dtype=np.float32)
        text = model.tokenizer.decode(list(ids)) if ids else ""
        rule, steps, graph = reasoning_steps(model, self.records, components, scores, self.prompt_ids, top_k=opts.top_k, graph_threshold=opts.graph_threshold)
        return GenerationResult(
            ref=PromptRef(model.name, self.prompt, tuple(model.token_strs(self.prompt_ids)), tuple(self.prompt_ids)),
            chat=opts.chat,
            generated_ids=ids,
            text=text,
            granularity=opts.granularity,
            records=tuple(self.records),
            components=components,
            scores=scores,
            stop_reason=self.stop_reason,
            rule=rule,
            steps=steps,
            graph=graph,
            watch_threshold=opts.watch_threshold,
        )

    def interrupted(self) -> None:
        """Mark the run as stopped by the user (Ctrl-C); :meth:`result` still works."""
        self.stop_reason = "interrupted"


def _left_pad(pattern: torch.Tensor, n_keys: int) -> torch.Tensor:
    """A sliding-window layer's cache keeps only its last keys: [heads, w] -> [heads, n_keys], zeros before."""
    return torch.nn.functional.pad(pattern, (n_keys - pattern.shape[-1], 0)) if pattern.shape[-1] < n_keys else pattern


_KIND_ORDER = {"embed": 0, "head": 1, "attn": 1, "neuron": 2, "mlp": 2, "bias": 3}


def _component_order(c: Component) -> tuple:
    return (c.layer if c.layer is not None else (-1 if c.kind == "embed" else 10**6), _KIND_ORDER[c.kind], c.head or 0, c.neuron or 0)


def generate_traced(model: LoadedModel, prompt: str, options: GenerationOptions = GenerationOptions()) -> GenerationResult:
    """Run a whole traced generation and return its result (the non-streaming API)."""
    run = TracedGeneration(model, prompt, options)
    for _ in run:
        pass
    return run.result()


def plain_greedy(hf_model, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Untraced greedy generation with a plain Hugging Face model (the reference for tests and benchmarks).

    Pass a model the bridge never wrapped: booting the bridge replaces the HF model's modules, so
    the bridged model's own ``generate`` is no independent reference.
    """
    config = hf_model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    device = hf_model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([list(token_ids)], device=device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, len(token_ids) :].tolist()
