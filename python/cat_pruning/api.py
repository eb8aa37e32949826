"""patch / unpatch / reset / advance / stats: the public entry points.

Everything a patch installs is recorded in one `_Patch` object kept in one attribute of the
transformer (and of the pipeline, when patched through one), so `unpatch` can take exactly
that back: the attention processors it replaced, the hooks it registered, the scheduler
methods it wrapped on the instance. No class and no diffusers forward body is changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cat_kernels import ops

from .adapters import Adapter, find_adapter, supported_families
from .adapters.base import get_submodule
from .compat import check_diffusers
from .config import CATConfig
from .state import CATState
from .stats import CATStats, StepStats

_ATTR = "_cat_pruning"


@dataclasses.dataclass
class _Patch:
    state: CATState
    adapter: Adapter
    transformer: nn.Module
    pipeline: Any | None
    processors: dict[str, object]  # name -> the processor that was replaced
    handles: list
    scheduler_methods: list[str]
    text_tokens: int = 0


def _split(obj: Any) -> tuple[Any | None, nn.Module]:
    """(pipeline or None, transformer) of what the user passed."""
    if isinstance(obj, nn.Module):
        return None, obj
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile'd module
        for name in ("controlnet", "image_encoder"):
            if getattr(obj, name, None) is not None:
                raise ValueError(f"cat_pruning: pipelines with a {name} are not supported yet ({type(obj).__name__})")
        if not hasattr(obj, "scheduler"):
            raise TypeError(f"{type(obj).__name__} has a transformer but no scheduler; pass the transformer instead")
        return obj, transformer
    raise TypeError(
        f"cat_pruning.patch expects a diffusers pipeline or transformer, got {type(obj).__name__}; "
        f"supported: {supported_families()}"
    )


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
            adapter reads it), or the transformer itself (call :func:`reset` before each
            generation; pass cfg_pairs=True if its batch is two CFG halves; with torch.compile,
            patch with manual_steps=True and call :func:`advance` after each step).
        config: a :class:`CATConfig`; default CATConfig().
        **overrides: fields of CATConfig to change, e.g. keep_ratio=0.5.

    Patching a patched object replaces the old patch. On any error the object is left as it was.
    """
    check_diffusers()
    config = (config or CATConfig()).replace(**overrides) if overrides else (config or CATConfig())
    pipeline, transformer = _split(obj)
    adapter = find_adapter(transformer)
    adapter.check_model(transformer)
    for path in (adapter.patch_embed, adapter.out_proj):
        get_submodule(transformer, path)
    if is_patched(obj):
        unpatch(obj)

    driver = "pipeline" if pipeline is not None else ("manual" if config.manual_steps else "auto")
    state = CATState(config, driver, lambda geometry: adapter.cache_layout(transformer, geometry),
                     cond_first=adapter.cfg_cond_first)
    attns = adapter.attention_modules(transformer)
    p = _Patch(state, adapter, transformer, pipeline, {n: a.processor for n, a in attns.items()}, [], [])
    for name, attn in attns.items():
        attn.set_processor(adapter.make_processor(state, name, attn))

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        adapter.check_call(args, kwargs)
        if state.driver == "auto" and torch.compiler.is_compiling():
            raise RuntimeError(
                "cat_pruning: a bare transformer under torch.compile cannot count its own steps; patch it "
                "with manual_steps=True and call cat_pruning.advance(transformer) after each denoising step, "
                "or patch the pipeline instead"
            )
        state.begin_forward(adapter.geometry(module, args, kwargs))
        p.text_tokens = adapter.text_tokens(module, args, kwargs)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if state.driver == "auto":
            state.advance()

    def embed_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if state.mode == "pruned":
            return _gather(state, output)
        return None

    def out_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return state.on_output(output)

    p.handles += [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook),
        get_submodule(transformer, adapter.patch_embed).register_forward_hook(embed_hook),
        get_submodule(transformer, adapter.out_proj).register_forward_hook(out_hook),
    ]
    p.handles += adapter.install_hooks(transformer, state)
    if pipeline is not None:
        _wrap_scheduler(p, pipeline)
    setattr(transformer, _ATTR, p)
    return obj


def _gather(state: CATState, x: torch.Tensor) -> torch.Tensor:
    return ops.gather_tokens(x, state.idx, 1, backend=state.config.backend)


def _wrap_scheduler(p: _Patch, pipeline: Any) -> None:
    """Reset at each pipeline call (it sets the timesteps once) and advance after each step.

    Both run in the pipeline's eager loop, outside any compiled transformer."""
    scheduler = pipeline.scheduler
    set_timesteps, step = scheduler.set_timesteps, scheduler.step
    state = p.state

    @functools.wraps(set_timesteps)  # pipelines inspect its signature (retrieve_timesteps: sigmas, mu)
    def wrapped_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        state.reset()
        cfg = state.config.cfg_pairs
        state.cfg_pairs = p.adapter.cfg_pairs(pipeline) if cfg is None else cfg
        return set_timesteps(*args, **kwargs)

    @functools.wraps(step)
    def wrapped_step(*args: Any, **kwargs: Any) -> Any:
        state.advance()
        return step(*args, **kwargs)

    scheduler.set_timesteps = wrapped_set_timesteps
    scheduler.step = wrapped_step
    p.scheduler_methods = ["set_timesteps", "step"]


def unpatch(obj: Any) -> Any:
    """Remove the patch: the original processors, no hooks, the scheduler as it was. Returns obj."""
    p = _get(obj)
    if p is None:
        return obj
    for handle in p.handles:
        handle.remove()
    attns = p.adapter.attention_modules(p.transformer)
    for name, original in p.processors.items():
        attns[name].set_processor(original)
    if p.pipeline is not None:
        for method in p.scheduler_methods:
            p.pipeline.scheduler.__dict__.pop(method, None)
    p.state.reset()
    delattr(p.transformer, _ATTR)
    return obj


def is_patched(obj: Any) -> bool:
    """Whether `obj` (pipeline or transformer) carries a CAT patch."""
    return _get(obj) is not None


def reset(obj: Any) -> None:
    """Start a new generation: the next forward is step 0. Pipelines do this at every call."""
    _require(obj).state.reset()


def advance(obj: Any) -> None:
    """Mark the end of a denoising step of a bare transformer patched with manual_steps=True
    (the way to run one under torch.compile without its pipeline)."""
    state = _require(obj).state
    if state.driver != "manual":
        raise ValueError(
            f"cat_pruning.advance is for transformers patched with manual_steps=True; this one counts its steps "
            f"itself ({'through its pipeline' if state.driver == 'pipeline' else 'per forward call'})"
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
    sample, MACs against the dense model, bytes held in caches."""
    p = _require(obj)
    state, g = p.state, p.state.geometry
    n = g.num_tokens if g is not None else 0
    history = list(state.history)
    steps = [StepStats(i, mode, tokens) for i, (mode, tokens) in enumerate(history)]
    macs_of = {t: p.adapter.macs_per_sample(p.transformer, t, n, p.text_tokens) for t in {n, *(t for _, t in history)}}
    batch = g.batch if g is not None else 0
    return CATStats(
        family=p.adapter.family,
        config=state.config,
        num_tokens=n,
        tokens_kept=state.config.tokens_kept(n) if n else 0,
        batch=batch,
        steps=steps,
        macs=sum(batch * macs_of[t] for _, t in history),
        macs_dense=batch * len(history) * macs_of[n],
        cache_bytes=state.cache_bytes(),
        # A copy to the host: stats() runs after a generation, never inside a denoising step.
        recomputed=None
        if state.recomputed is None or state.recomputed.is_meta
        else state.recomputed.view(batch, g.height, g.width).cpu(),
    )
