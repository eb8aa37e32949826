"""patch / unpatch / reset / advance / stats: the public entry points.

Everything a patch installs is recorded in one `_Patch` object kept in one attribute of the
transformer (and of the pipeline, when patched through one), so `unpatch` can take exactly
that back: the attention processors it replaced, the hooks it registered, the scheduler
methods it wrapped on the instance. No class and no diffusers forward body is changed.

Before every call (in eager code: the transformer's pre-hook, the scheduler's set_timesteps) the
patch checks what was done to the model since (`_sync`): its hooks follow the layers at their
paths (PEFT's LoRA layers take a Linear's place), a later set_attention_backend reaches the
replaced processors, a pipeline's new scheduler (or a `from_pipe` pipeline's own) is wrapped;
attention processors replaced after the patch (fuse_qkv_projections, set_attn_processor) and
float64 are refused with an error that says what to do. set_default_attn_processor (PixArt) is
the exception: the patch wraps it on the instance, and the plain processors it sets become the
ones the CAT processors fall back to in dense steps and unpatch restores.

Where generations start and steps end (the scheduler wrappers, a transformer patched on its own
following the pipeline that runs it, bare loops, one call per step) lives in
cat_pruning.generation; this module is the public API and what a patch installs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import generation
from .adapters import Adapter, find_adapter, supported_families
from .adapters.base import PathHook, compute_dtype, encoder_hidden_states_arg, get_submodule, hidden_states_arg
from .compat import check_diffusers
from .config import CATConfig
from .generation import TimestepWatch
from .parallel import NONE, Sharding, check_agreement, gather_sequence, sharding
from .state import CacheLayout, CATState, Geometry
from .stats import CATStats, StepStats

_ATTR = "_cat_pruning"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what cat_kernels' ops take
_TRANSFORMER_METHODS = ("set_default_attn_processor", "cache_context")  # wrapped on the instance where it has them
_PROCESSOR_ATTRS = ("_attention_backend", "_parallel_config")  # diffusers' per-processor settings


@dataclasses.dataclass(eq=False)
class _Patch:
    state: CATState
    adapter: Adapter
    transformer: nn.Module
    pipeline: Any | None
    processors: dict[str, object]  # name -> the processor that was replaced
    handles: list
    installed: dict[str, tuple[nn.Module, object]] = dataclasses.field(default_factory=dict)  # name -> (attn, ours)
    path_hooks: list[PathHook] = dataclasses.field(default_factory=list)
    schedulers: list = dataclasses.field(default_factory=list)  # schedulers whose methods are wrapped
    # what counts the steps outside a pipeline call: "pipeline" for a patched pipeline, else "auto" or
    # "manual"; a transformer patched on its own counts a pipeline call's steps as a pipeline (generation.follow)
    driver: str = "pipeline"
    watch: TimestepWatch = dataclasses.field(default_factory=TimestepWatch)  # bare loops' timesteps

    def sync(self, pipeline: Any | None = None) -> None:
        """Bring the patch in line with the model (for cat_pruning.generation's wrappers)."""
        _sync(self, pipeline)


def _split(obj: Any) -> tuple[Any | None, nn.Module]:
    """(pipeline or None, transformer) of what the user passed."""
    if isinstance(obj, nn.Module):
        return None, obj
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile'd module
        if not hasattr(obj, "scheduler"):
            raise TypeError(f"{type(obj).__name__} has a transformer but no scheduler; pass the transformer instead")
        return obj, transformer
    raise TypeError(
        f"cat_pruning.patch expects a diffusers pipeline or transformer, got {type(obj).__name__}; "
        f"supported: {supported_families()}"
    )


def _models(obj: Any) -> tuple[Any | None, list[nn.Module]]:
    """(pipeline or None, the transformers a patch of `obj` covers): a pipeline's experts
    (generation.experts), or the transformer passed."""
    pipeline, transformer = _split(obj)
    return pipeline, (generation.experts(pipeline) if pipeline is not None else [transformer])


def _get(obj: Any) -> _Patch | None:
    _, transformer = _split(obj)
    return getattr(transformer, _ATTR, None)


def _require(obj: Any) -> _Patch:
    p = _get(obj)
    if p is None:
        raise ValueError(f"{type(obj).__name__} is not patched; call cat_pruning.patch first")
    return p


def patch(obj: Any, config: CATConfig | None = None, **overrides: Any) -> Any:
    """Accelerate a diffusers pipeline or transformer with CAT Pruning; returns `obj`.

    Args:
        obj: a pipeline with a supported `.transformer` (its state resets at every call and the
            CFG pairing follows whether that call runs classifier-free guidance, as the family's
            adapter reads it), or the transformer itself. A transformer patched on its own runs
            every call of a pipeline that holds it as that pipeline patched would (found in eager
            code; a compiled one, after one eager call). In a bare denoising loop call
            :func:`reset` before each generation (a loop whose timestep moves back without it is
            reset with a warning where the timestep is on the CPU, refused a few steps late on
            CUDA: cat_pruning.generation); pass cfg_pairs=True if its batch is two CFG halves;
            with torch.compile, patch with manual_steps=True and call :func:`advance` after each
            step.
        config: a :class:`CATConfig`; default CATConfig().
        **overrides: fields of CATConfig to change, e.g. keep_ratio=0.5.

    A pipeline with two experts (Wan 2.2 A14B's transformer and transformer_2) gets both patched,
    each with its own caches and schedule over the steps it runs.

    Patching a patched object replaces the old patch. On any error the object is left as it was.
    """
    if config is not None and not isinstance(config, CATConfig):
        hint = " (for this dict: CATConfig(**d) or patch(obj, **d))" if isinstance(config, dict) else ""
        raise TypeError(f"cat_pruning.patch: config must be a CATConfig, got {type(config).__name__}; pass "
                        f"CATConfig(...) or keyword arguments, e.g. patch(pipe, keep_ratio=0.3){hint}")
    check_diffusers()
    config = (config or CATConfig()).replace(**overrides) if overrides else (config or CATConfig())
    pipeline, models = _models(obj)
    adapters = [find_adapter(model) for model in models]
    for name in ("controlnet", "image_encoder"):
        if pipeline is not None and getattr(pipeline, name, None) is not None and name not in adapters[0].components:
            raise ValueError(f"cat_pruning: pipelines with a {name} are not supported yet ({type(pipeline).__name__})")
    configs = []
    for adapter, model in zip(adapters, models, strict=True):
        adapter.check_model(model)
        if config.fused_attention and not adapter.softmax_attention:
            raise ValueError(f"cat_pruning: fused_attention=True fuses softmax attention; {adapter.family} "
                             f"attends linearly, with nothing to fuse: pass fused_attention=False")
        _check_dtype(_model_dtype(model))
        configs.append(_resolve_output_cache(config, adapter, pipeline))
        for path in (adapter.patch_embed, adapter.out_proj):
            get_submodule(model, path)
    unpatch(obj)
    for adapter, model, model_config in zip(adapters, models, configs, strict=True):
        _install(adapter, model, pipeline, model_config)
    return obj


def _resolve_output_cache(config: CATConfig, adapter: Adapter, pipeline: Any | None) -> CATConfig:
    """`config` with output_cache "auto" resolved for this model: "noise" where the pipeline gives
    one timestep per token (the final modulation is then per token), else "hidden"; an explicit
    "hidden" there is refused."""
    per_token = adapter.per_token_timestep(pipeline)
    if config.output_cache == "hidden" and per_token:
        raise ValueError(f"cat_pruning: output_cache=\"hidden\" needs one timestep per sample, but "
                         f"{type(pipeline).__name__} gives one per token (expand_timesteps): the final modulation "
                         f"is then per token; pass output_cache=\"noise\" or \"auto\"")
    if config.output_cache == "auto":
        return config.replace(output_cache="noise" if per_token else "hidden")
    return config


def _install(adapter: Adapter, transformer: nn.Module, pipeline: Any | None, config: CATConfig) -> None:
    """Patch one transformer (checked by patch(), its output_cache resolved)."""
    shard = sharding(transformer, adapter.family, adapter.supports_parallel)
    driver = "pipeline" if pipeline is not None else ("manual" if config.manual_steps else "auto")
    hidden = config.output_cache == "hidden"

    def layout(geometry: Geometry, shard: Sharding) -> CacheLayout:
        layout = adapter.cache_layout(transformer, geometry, shard)
        return adapter.hidden_layout(transformer, layout) if hidden else layout

    state = CATState(config, driver, layout, cond_first=adapter.cfg_cond_first)
    attns = adapter.attention_modules(transformer)
    p = _Patch(state, adapter, transformer, pipeline, {n: a.processor for n, a in attns.items()}, [], driver=driver)
    for name, attn in attns.items():
        processor = adapter.make_processor(state, name, attn)
        for attr in _PROCESSOR_ATTRS:
            # enable_parallelism and set_attention_backend set these on every processor that has
            # them; _sync hands them on to the replaced processor, which the CAT processors run
            # in their dense steps and take the backend from.
            if hasattr(attn.processor, attr):
                setattr(processor, attr, getattr(attn.processor, attr))
        attn.set_processor(processor)
        p.installed[name] = (attn, processor)
    state.shard = shard

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        adapter.check_call(args, kwargs)
        compiling = torch.compiler.is_compiling()
        if compiling:
            if state.driver == "auto":
                raise RuntimeError(
                    "cat_pruning: a bare transformer under torch.compile cannot count its own steps; patch it "
                    "with manual_steps=True and call cat_pruning.advance(transformer) after each denoising step, "
                    "or patch the pipeline instead"
                )
        else:  # compiled code is synced by the eager set_timesteps / reset before each generation
            running = generation.running_pipeline(p)
            if pipeline is None:
                generation.follow(p, running)
            _sync(p, running if state.driver == "pipeline" else None)
            generation.check_branch(state)
            if state.driver != "auto":
                generation.count_forward(state)
        if hidden:
            adapter.check_hidden_cache(args, kwargs)
        geometry = dataclasses.replace(adapter.geometry(module, args, kwargs),
                                       text=adapter.text_tokens(module, args, kwargs))
        if state.reference_rows:  # the pipeline call said its input carries reference rows
            geometry = geometry.with_reference(state.reference_rows)
        _check_dtype(geometry.dtype)
        if not compiling and state.driver != "pipeline" and geometry.device.type != "meta":
            # a bare loop: a step whose timestep moves back starts a generation (cat_pruning.generation)
            new_geometry = state.geometry is not None and state.geometry != geometry
            p.watch.observe(state.step, kwargs.get("timestep"), new_geometry, lambda r: generation.restart(p, r))
        if not torch.compiler.is_compiling() and state.geometry is None and state.shard is not NONE:
            check_agreement(state.shard, _generation_summary(state, geometry, args, kwargs))
        state.begin_forward(geometry)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if state.driver == "auto":
            state.advance()

    def embed_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # under context parallelism an adapter may gather at the model's input, before diffusers' split
        if state.mode == "pruned" and (state.shard.cp_world == 1 or not adapter.gathers_at_input):
            return adapter.gather_embedding(state, output)
        return None

    def out_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return state.on_output(output)

    def hidden_hook(module: nn.Module, args: tuple) -> tuple | None:
        # output_cache="hidden": the last block's rows -> every row, before the final norm
        shard = state.shard
        if shard.cp_world == 1:
            return (state.on_output(args[0]), *args[1:])
        if state.mode == "dense":  # nothing cached: each rank's rows go on as they are
            return None
        # Under context parallelism each rank holds a contiguous share of the rows (diffusers gathers
        # them after the output projection): the store gets every rank's, in order, and each rank
        # goes on with its share of the full rows.
        full = state.on_output(gather_sequence(args[0], shard))
        share = full.shape[1] // shard.cp_world
        return (full[:, shard.cp_rank * share:(shard.cp_rank + 1) * share], *args[1:])

    p.handles += [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook),
    ]
    # By path: LoRA may wrap these layers (Flux's x_embedder, every proj_out) after the patch.
    output = PathHook(adapter.final_norm, hidden_hook, pre=True) if hidden else PathHook(adapter.out_proj, out_hook)
    p.path_hooks += [PathHook(adapter.patch_embed, embed_hook), output]
    for hook in adapter.install_hooks(transformer, state):
        (p.path_hooks if isinstance(hook, PathHook) else p.handles).append(hook)
    for hook in p.path_hooks:
        hook.attach(transformer)
    if pipeline is not None:
        generation.wrap_scheduler(p, pipeline.scheduler)
    _wrap_transformer(p)
    setattr(transformer, _ATTR, p)


def _generation_summary(state: CATState, geometry: Any, args: tuple, kwargs: dict) -> dict[str, float]:
    """What the ranks of a model-parallel group must agree on, at a generation's first call."""
    cfg = state.config
    summary = dict(image_tokens=geometry.num_tokens, batch=geometry.batch, keep_ratio=cfg.keep_ratio,
                   full_steps=cfg.full_steps, refresh_every=cfg.refresh_every, forecast=cfg.forecast == "taylor")
    inputs = {"hidden_states": hidden_states_arg(args, kwargs),
              "encoder_hidden_states": encoder_hidden_states_arg(args, kwargs)}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor):
            summary[f"{name} shape"] = float(x.shape[1])
            summary[f"{name} sum"] = float(x.double().sum())  # eager, once per generation
    return summary


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model computes in (diffusers' ModelMixin.dtype knows layerwise casting)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((t.dtype for t in model.parameters() if t.is_floating_point()), None)


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(
            f"cat_pruning: the transformer runs in {dtype}; CAT Pruning supports float32, float16 and bfloat16. "
            "Convert it (e.g. pipe.to(torch.float32)) or call cat_pruning.unpatch first"
        )


def _sync(p: _Patch, pipeline: Any | None = None) -> None:
    """Bring the patch in line with what was done to the model since the last call (eager code).

    Hooks follow the modules at their paths (LoRA loaded or unloaded after the patch); a later
    set_attention_backend reaches the replaced processors; a pipeline scheduler that is not
    wrapped (swapped after the patch, or a from_pipe copy given its own) is wrapped now and the
    generation starts. Attention processors replaced after the patch (fuse_qkv_projections,
    set_attn_processor) are refused: the CAT caches would no longer be filled."""
    for hook in p.path_hooks:
        hook.attach(p.transformer)
    _check_dtype(compute_dtype(get_submodule(p.transformer, p.adapter.out_proj)))  # pipe.to(float64) since
    for name, (attn, ours) in p.installed.items():
        if attn.processor is not ours:
            raise ValueError(
                f"cat_pruning: the attention processor of {name} was replaced after cat_pruning.patch() (by "
                f"{type(attn.processor).__name__}: fuse_qkv_projections, set_attn_processor, ...), so CAT's caches "
                "would not be filled. Change processors before patching: cat_pruning.unpatch(pipe) (keeps the new "
                "processors), then patch again (fused QKV projections are not supported: unfuse them first)"
            )
        if getattr(attn, "fused_projections", False):  # Flux fuses without changing processors
            raise ValueError(
                f"cat_pruning: {name} has fused QKV projections (fuse_qkv_projections() after cat_pruning.patch()); "
                "CAT does not support them: call unfuse_qkv_projections() first, or cat_pruning.unpatch(pipe) to "
                "run fused without CAT"
            )
        for attr in _PROCESSOR_ATTRS:
            if hasattr(ours, attr) and getattr(ours.original, attr, None) is not getattr(ours, attr):
                setattr(ours.original, attr, getattr(ours, attr))
    shard = sharding(p.transformer, p.adapter.family, p.adapter.supports_parallel)  # enable_parallelism since?
    if shard != p.state.shard:  # the same object otherwise: compiled code guards on it
        p.state.shard = shard
    if pipeline is not None and not generation.wraps(p, pipeline.scheduler):
        generation.wrap_scheduler(p, pipeline.scheduler)
        generation.start_generation(p, pipeline)


def _wrap_transformer(p: _Patch) -> None:
    """Two transformer methods, wrapped on the instance where the model has them:

    - set_default_attn_processor (PixArt; diffusers' test mixins call it after construction) swaps
      every attention processor for a plain one: take those as the processors the CAT processors
      fall back to in their dense steps and unpatch restores, and put the CAT processors back;
    - cache_context(name) (diffusers' CacheMixin; pipelines that call the transformer once per
      guidance branch open one around each call): the calls inside run on that branch's caches
      and selection (cat_pruning.generation.enter_branch)."""
    set_default = getattr(p.transformer, "set_default_attn_processor", None)
    if set_default is not None:

        @functools.wraps(set_default)
        def wrapped_set_default_attn_processor(*args: Any, **kwargs: Any) -> Any:
            out = set_default(*args, **kwargs)
            _adopt_processors(p)
            return out

        setattr(wrapped_set_default_attn_processor, generation.MARK, p)
        p.transformer.set_default_attn_processor = wrapped_set_default_attn_processor
    cache_context = getattr(p.transformer, "cache_context", None)
    if cache_context is not None:

        @functools.wraps(cache_context)
        @contextlib.contextmanager
        def wrapped_cache_context(name: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with cache_context(name, *args, **kwargs) as value:
                generation.enter_branch(p, name)
                yield value

        setattr(wrapped_cache_context, generation.MARK, p)
        p.transformer.cache_context = wrapped_cache_context


def _adopt_processors(p: _Patch) -> None:
    """The processors that replaced the CAT processors become their fallbacks, if the adapter can
    stand in for them (Sana's takes only its linear attention)."""
    replaced = {name: attn.processor for name, (attn, ours) in p.installed.items() if attn.processor is not ours}
    if not replaced:
        return
    try:
        p.adapter.check_model(p.transformer)
    except ValueError:
        return  # processors CAT cannot stand in for: the next call refuses them (_sync says what to do)
    for name, processor in replaced.items():
        attn, ours = p.installed[name]
        ours.original = processor
        p.processors[name] = processor
        for attr in _PROCESSOR_ATTRS:  # the attention backend settings follow the new processor
            if hasattr(processor, attr):
                setattr(ours, attr, getattr(processor, attr))
            else:
                vars(ours).pop(attr, None)
        attn.set_processor(ours)


def _patches(obj: Any) -> list[_Patch]:
    """The patches of what the user passed: a pipeline's experts', or the transformer's."""
    return [p for p in (getattr(m, _ATTR, None) for m in _models(obj)[1]) if p is not None]


def unpatch(obj: Any) -> Any:
    """Remove the patch: the original processors, no hooks, the scheduler as it was. Returns obj."""
    for p in _patches(obj):
        _remove(p)
    return obj


def _remove(p: _Patch) -> None:
    for handle in [*p.handles, *p.path_hooks]:
        handle.remove()
    originals = {id(ours): p.processors[name] for name, (_, ours) in p.installed.items()}
    for name, (attn, ours) in p.installed.items():
        if attn.processor is ours:  # one replaced since (fuse_qkv_projections, ...) stays
            attn.set_processor(p.processors[name])
    # fuse_qkv_projections() after the patch saved the CAT processors for unfuse_qkv_projections()
    saved = getattr(p.transformer, "original_attn_processors", None)
    if isinstance(saved, dict):
        for key, processor in saved.items():
            saved[key] = originals.get(id(processor), processor)
    for scheduler in p.schedulers:
        generation.unwrap_scheduler(p, scheduler)
    for method in _TRANSFORMER_METHODS:
        if getattr(vars(p.transformer).get(method), generation.MARK, None) is p:
            del p.transformer.__dict__[method]
    p.state.release()
    delattr(p.transformer, _ATTR)


def is_patched(obj: Any) -> bool:
    """Whether `obj` (pipeline or transformer) carries a CAT patch."""
    return _get(obj) is not None


def reset(obj: Any, num_steps: int | None = None, reference_tokens: int = 0) -> None:
    """Start a new generation: the next forward is step 0. Pipelines do this at every call (also
    when only their transformer is patched); a bare denoising loop calls it before each generation.

    Args:
        num_steps: the generation's number of denoising steps, which CATConfig.final_full_steps
            needs to find the last steps (a pipeline knows it); None (default): not known.
        reference_tokens: rows at the end of every image input of this generation that are not
            image tokens: reference images appended to the image's (FLUX.2's image editing). Every
            step computes them; they are never selected or cached. A pipeline call says it itself
            (Flux2Pipeline's image argument), and so do Qwen-Image's calls (img_shapes); a bare
            FLUX.2 transformer cannot tell them from image tokens, so a loop that passes them
            gives their number here (0, the default: none).
    """
    if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
        raise ValueError(f"cat_pruning.reset: num_steps must be an int >= 1 or None, got {num_steps!r}")
    if not isinstance(reference_tokens, int) or isinstance(reference_tokens, bool) or reference_tokens < 0:
        raise ValueError(f"cat_pruning.reset: reference_tokens must be an int >= 0, got {reference_tokens!r}")
    _require(obj)
    for p in _patches(obj):
        _sync(p)
        if p.pipeline is None:
            generation.start_bare_generation(p, num_steps)
        else:
            p.state.reset(num_steps)
        p.state.reference_rows = reference_tokens


def advance(obj: Any) -> None:
    """Mark the end of a denoising step of a bare transformer patched with manual_steps=True
    (the way to run one under torch.compile without its pipeline)."""
    p = _require(obj)
    state = p.state
    if p.driver != "manual":
        raise ValueError(
            f"cat_pruning.advance is for transformers patched with manual_steps=True; this one counts its steps "
            f"itself ({'through its pipeline' if p.driver == 'pipeline' else 'per forward call'})"
        )
    if state.driver == "pipeline":  # its last forward ran inside a pipeline call (generation.follow)
        if generation.running_pipeline(p) is not None:
            return  # that call's scheduler.step counts its steps
        raise ValueError(
            "cat_pruning.advance: this transformer last ran inside a pipeline call, which counted its steps; call "
            "cat_pruning.reset(transformer) before each generation of a bare denoising loop"
        )
    state.advance()


@contextlib.contextmanager
def patched(obj: Any, config: CATConfig | None = None, **overrides: Any) -> Iterator[Any]:
    """`with cat_pruning.patched(pipe, keep_ratio=0.3): ...` patches inside the block only."""
    patch(obj, config, **overrides)
    try:
        yield obj
    finally:
        unpatch(obj)


def stats(obj: Any) -> CATStats:
    """What the last (or current) generation computed: per step mode and image tokens per
    sample, MACs against the dense model, bytes held in caches. For a pipeline of two experts
    (Wan 2.2 A14B), both: their steps in the order they ran, MACs and caches summed."""
    _require(obj)
    parts = [_stats(p) for p in _patches(obj)]
    if len(parts) == 1:
        return parts[0]
    ran = [part for part in parts if part.steps]
    steps = [StepStats(i, s.mode, s.tokens) for i, s in enumerate(s for part in ran for s in part.steps)]
    maps = [part.recomputed for part in ran if part.recomputed is not None]
    same = len({m.shape for m in maps}) == 1
    return dataclasses.replace(ran[0] if ran else parts[0], steps=steps, macs=sum(part.macs for part in parts),
                               macs_dense=sum(part.macs_dense for part in parts),
                               cache_bytes=sum(part.cache_bytes for part in parts),
                               recomputed=sum(maps) if maps and same else None,
                               experts=tuple(generation.EXPERTS[:len(parts)]))


def _step_macs(p: _Patch, rows: int, dense_rows: int, text: int) -> int:
    """MACs of one forward for one sample that computes `rows` of `dense_rows` rows beside `text`
    text tokens; with output_cache="hidden" the output projection runs on every row."""
    macs = p.adapter.macs_per_sample(p.transformer, rows, dense_rows, text)
    if p.state.config.output_cache == "hidden":
        macs += (dense_rows - rows) * p.adapter.head_macs_per_row(p.transformer)
    return macs


def _stats(p: _Patch) -> CATStats:
    """stats() of one patched transformer."""
    state = p.state
    branches, macs, macs_dense = [], 0, 0
    for name in state.each_branch():  # guidance branches (cache_context): each its own calls
        g, history = state.geometry, list(state.history)
        n, batch, reference, text = (g.num_tokens, g.batch, g.reference, g.text) if g is not None else (0, 0, 0, 0)
        # rows a step computed: under context parallelism a pruned step also computes the repeats
        # that pad its K tokens to a multiple of the ranks (state.padding); every step computes the
        # reference rows (an edit model's reference image) besides its image tokens
        padding = state.padding if g is not None else 0
        rows = [(tokens + padding if mode == "pruned" else tokens) + reference for mode, tokens in history]
        dense_rows = n + reference
        macs_of = {t: _step_macs(p, t, dense_rows, text) for t in {dense_rows, *rows}}
        macs += sum(batch * macs_of[t] for t in rows)
        macs_dense += batch * len(history) * macs_of[dense_rows]
        if not branches:  # the first branch's steps, geometry and token map ("cond" before "uncond")
            steps = [StepStats(i, mode, tokens) for i, (mode, tokens) in enumerate(history)]
            first = dict(num_tokens=n, tokens_kept=state.tokens_kept(n) if n else 0, batch=batch, steps=steps,
                         padded_rows=padding, reference_tokens=reference,
                         # A copy to the host: stats() runs after a generation, never inside a denoising step.
                         recomputed=None if state.recomputed is None or state.recomputed.is_meta
                         else state.recomputed.view(batch, *g.grid).cpu())  # fmt: skip
        branches.append(name)
    return CATStats(family=p.adapter.family, config=state.config, macs=macs, macs_dense=macs_dense,
                    cache_bytes=state.cache_bytes(), branches=tuple(b for b in branches if b), **first)
