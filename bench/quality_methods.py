"""Quality suite, the methods: what each method id means and how it is switched on around a pipeline.

- ``cat:K:F[:field=value...]``: cat_pruning.patched(pipe, CATConfig.paper(), keep_ratio=K,
  full_steps=F, **overrides) (any CATConfig field; with overrides the method is an ablation);
- peers, each a threshold or interval that quality_peers.py tunes to a MAC budget:
  ``cache-dit-dbcache``, ``cache-dit-taylorseer``, ``diffusers-fbc``, ``diffusers-taylorseer``,
  ``diffusers-magcache`` (its magnitude ratios calibrated on the tuning prompts first);
  ``peer@cat:K:F`` tunes the peer to that CAT setting's MAC fraction instead of --target-cat's,
  ``peer@mac:X`` to the fraction X;
- ``catf@cat:K:F`` / ``catf@mac:X``: CAT-F (forecast="taylor") at its best schedule for that budget
  (refresh_every and full_steps from a grid, keep_ratio solved for the budget, the best on the
  tuning prompts kept), found the same way as diffusers TaylorSeer's best warm-up, interval and order;
  ``catf-hidden@...`` / ``catf-noise@...``: the same with the grid held to one output_cache.

A method's ``session(pipe)`` is a context manager that installs it for the generations inside and
yields a per-call reset (or None). Sessions look at the transformer they get, so the same peer
runs on SD3 (transformer_blocks only) and on Flux (double- then single-stream blocks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from quality_base import Method, Session, cat_config_fields, config_overrides, no_session  # noqa: F401 - re-exported
from quality_peers import CATF_OUTPUT_CACHES, tune_catf, tune_continuous, tune_magcache, tune_taylorseer

import cat_pruning
from cat_pruning.adapters.base import opens_cache_context

# the fields in which the paper's CAT differs from patch()'s defaults (keep_ratio and full_steps are in the spec)
PAPER = {k: v for k, v in dataclasses.asdict(cat_pruning.CATConfig.paper()).items()
         if v != getattr(cat_pruning.CATConfig(), k) and k not in ("keep_ratio", "full_steps")}
FORECAST_TARGETS = ("mac:0.35", "cat:0.2:8", "cat:0.3:8", "cat:0.5:8")
DEFAULT_METHODS = [
    # CAT settings
    "cat:0.3:8", "cat:0.5:8", "cat:0.2:8", "cat:0.3:4", "cat:0.3:12",
    # ablations, all at keep_ratio 0.3, full_steps 8
    "cat:0.3:8:selection=topk", "cat:0.3:8:num_clusters=1", "cat:0.3:8:selection=cat-no-staleness",
    "cat:0.3:8:selection=random",
    "cat:0.3:8:importance_fraction=0", "cat:0.3:8:importance_fraction=0.25",
    "cat:0.3:8:importance_fraction=0.5", "cat:0.3:8:importance_fraction=1",
    # peers at matched MAC budgets: CAT's default, and (those that run) the settings below and above it
    "cache-dit-dbcache", "cache-dit-taylorseer", "diffusers-fbc", "diffusers-taylorseer",
    "cache-dit-dbcache@cat:0.2:8", "cache-dit-dbcache@cat:0.5:8",
    "diffusers-taylorseer@cat:0.2:8", "diffusers-taylorseer@cat:0.5:8",
    # CAT-F at four budgets (~35%, and CAT k=0.2 / 0.3 / 0.5's), against the peers tuned to the same
    # budgets (those at the CAT settings are above)
    *(f"catf@{t}" for t in FORECAST_TARGETS), "diffusers-taylorseer@mac:0.35", "cache-dit-dbcache@mac:0.35",
]  # fmt: skip
PEERS = ("cache-dit-dbcache", "cache-dit-taylorseer", "diffusers-fbc", "diffusers-magcache", "diffusers-taylorseer")
MAGCACHE_CONFIG = ("threshold", "max_skip_steps", "retention_ratio", "num_inference_steps", "mag_ratios", "calibrate")

def cat_method(spec: str) -> Method:
    """cat:K:F[:field=value...] -> CAT Pruning with keep_ratio K, full_steps F and CATConfig overrides."""
    parts = spec.split(":")
    if len(parts) < 3:
        raise SystemExit(f"bench quality: bad CAT method {spec!r}; expected cat:KEEP:FULL[:field=value...]")
    # the paper's CAT unless a field says otherwise: reuse of the skipped rows, no refresh steps
    overrides: dict[str, Any] = dict(keep_ratio=float(parts[1]), full_steps=int(parts[2]),
                                     **PAPER)
    extra = config_overrides(parts[3:])
    overrides.update(extra)
    cat_pruning.CATConfig().replace(**overrides)  # validate now

    name = f"CAT k={overrides['keep_ratio']:g} f={overrides['full_steps']}"
    extra = {k: v for k, v in extra.items() if PAPER.get(k) != v}
    name += "".join(f" {v}" if isinstance(v, str) else f" {k}={v:g}" for k, v in extra.items())
    return Method(spec, name, "ablation" if extra else "cat", overrides, _cat_session(overrides))


def _cat_session(params: dict[str, Any]) -> Session:
    @contextlib.contextmanager
    def session(pipe) -> Iterator[None]:
        with cat_pruning.patched(pipe, **cat_config_fields(params)):
            yield None

    return session


def parse_target(target: str) -> str:
    """A budget a method is tuned to: cat:K:F (that CAT setting's MAC fraction) or mac:X."""
    if target.startswith("mac:"):
        try:
            x = float(target[4:])
        except ValueError:
            x = -1.0
        if not 0.0 < x <= 1.0:
            raise SystemExit(f"bench quality: bad budget {target!r}; expected mac:X with X in (0, 1]")
    else:
        cat_method(target)  # validate
    return target


def catf_method(target: str, output_cache: str = "") -> Method:
    """CAT-F at its best schedule for the budget `target` (tuned by quality_peers.tune_catf), over
    both output caches or only `output_cache`."""
    suffix = f"-{output_cache}" if output_cache else ""
    name = f"CAT-F ({output_cache} cache) @ {target}" if output_cache else f"CAT-F @ {target}"
    m = Method(f"catf{suffix}@{target}", name, "catf", dict(forecast="taylor"),
               session=lambda pipe: _cat_session(m.params)(pipe), matched_to=target)  # fmt: skip
    caches = (output_cache,) if output_cache else CATF_OUTPUT_CACHES
    m.tune = lambda ctx: tune_catf(ctx, m, caches)
    return m


def _cache_dit_session(params: dict[str, Any]) -> Session:
    @contextlib.contextmanager
    def session(pipe) -> Iterator[None]:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

        tr = pipe.transformer
        calibrator = None
        if params.get("taylorseer"):
            calibrator = TaylorSeerCalibratorConfig(
                taylorseer_order=params["taylorseer_order"],
                enable_encoder_calibrator=params["enable_encoder_calibrator"],
            )
        separate_cfg = False  # a CFG batch [uncond; cond] runs in one forward (or there is none)
        if type(tr).__name__ == "WanTransformer3DModel":
            # Wan's blocks take (hidden_states, encoder_hidden_states) and return hidden_states: Pattern_2,
            # and its pipelines call the transformer once per CFG branch
            adapter = BlockAdapter(pipe=pipe, transformer=tr, blocks=tr.blocks,
                                   forward_pattern=ForwardPattern.Pattern_2)
            separate_cfg = True
        elif hasattr(tr, "single_transformer_blocks"):
            # Flux: double- then single-stream blocks, both returning (encoder_hidden_states,
            # hidden_states) in diffusers >= 0.35: Pattern_1 twice, as cache-dit's Flux adapter uses.
            adapter = BlockAdapter(pipe=pipe, transformer=tr,
                                   blocks=[tr.transformer_blocks, tr.single_transformer_blocks],
                                   forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1])
        else:
            # SD3's blocks return (encoder_hidden_states, hidden_states): cache-dit's Pattern_1,
            # as its own registered StableDiffusion3 adapter uses.
            adapter = BlockAdapter(pipe=pipe, transformer=tr, blocks=tr.transformer_blocks,
                                   forward_pattern=ForwardPattern.Pattern_1)
        cache_dit.enable_cache(
            adapter,
            cache_config=DBCacheConfig(
                Fn_compute_blocks=params["Fn_compute_blocks"],
                Bn_compute_blocks=params["Bn_compute_blocks"],
                residual_diff_threshold=params["residual_diff_threshold"],
                max_warmup_steps=params["max_warmup_steps"],
                enable_separate_cfg=separate_cfg,
            ),
            calibrator_config=calibrator,
        )  # fmt: skip
        try:
            yield None
        finally:
            cache_dit.disable_cache(pipe)

    return session


def _diffusers_hook_session(params: dict[str, Any], kind: str) -> Session:
    """diffusers' FirstBlockCache / MagCache / TaylorSeer hooks on the bare transformer. SD3Transformer2DModel
    has no CacheMixin (no enable_cache, no cache_context) and the scene and photo pipelines open no
    cache context, so a context named "cond" is opened around every transformer call (the video
    pipeline opens one per CFG branch itself, as WanPipeline does), and the hooks' state is reset
    before every generation."""

    @contextlib.contextmanager
    def session(pipe) -> Iterator[Callable[[], None]]:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        tr = pipe.transformer
        registry = HookRegistry.check_if_exists_or_initialize(tr)
        handles = []
        try:
            if kind == "fbc":
                from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

                apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=params["threshold"]))
            elif kind == "magcache":
                from diffusers.hooks import MagCacheConfig, apply_mag_cache

                apply_mag_cache(tr, MagCacheConfig(**{k: params[k] for k in MAGCACHE_CONFIG}))
            else:
                from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

                apply_taylorseer_cache(
                    tr,
                    TaylorSeerCacheConfig(
                        cache_interval=params["cache_interval"],
                        disable_cache_before_step=params["disable_cache_before_step"],
                        disable_cache_after_step=params.get("disable_cache_after_step"),
                        max_order=params["max_order"],
                        taylor_factors_dtype=torch.float32,  # the model runs in fp32 here
                        cache_identifiers=params.get("cache_identifiers"),
                        use_lite_mode=params.get("use_lite_mode", False),
                    ),
                )
            registry.invalidate_child_registries_cache()
            if not opens_cache_context(type(pipe)):
                handles = [
                    tr.register_forward_pre_hook(lambda m, a, k: _set_cache_context(m, CacheContext("cond")),
                                                 with_kwargs=True),
                    tr.register_forward_hook(lambda m, a, o: _set_cache_context(m, None)),
                ]  # fmt: skip

            def reset() -> None:
                registry.reset_stateful_hooks(recurse=True)

            yield reset
        finally:
            for h in handles:
                h.remove()
            _set_cache_context(tr, None)
            for name in ("fbc_leader_block_hook", "fbc_block_hook", "taylorseer_cache", "mag_cache_leader_block_hook",
                         "mag_cache_block_hook"):  # fmt: skip
                registry.remove_hook(name, recurse=True)
            registry.invalidate_child_registries_cache()

    return session


def peer_method(spec: str, warmup: int, arch: str = "SD3") -> Method:
    """A peer with its starting knobs; arch "Flux" also hooks the single-stream blocks."""
    if spec in ("cache-dit-dbcache", "cache-dit-taylorseer"):
        ts = spec == "cache-dit-taylorseer"
        params: dict[str, Any] = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.1,
                                      max_warmup_steps=warmup)  # fmt: skip
        if ts:
            params.update(taylorseer=True, taylorseer_order=1, enable_encoder_calibrator=True)
        m = Method(spec, "cache-dit DBCache" + (" + TaylorSeer" if ts else "") + " F1B0", "peer", params,
                   session=lambda pipe: _cache_dit_session(m.params)(pipe), data_dependent=True)  # fmt: skip
        if ts:
            m.variants = [
                ("cache-dit's default TaylorSeer calibrator (encoder calibrator on)", {}),
                ("enable_encoder_calibrator=False", dict(enable_encoder_calibrator=False)),
            ]
        m.tune = lambda ctx: tune_continuous(ctx, m, "residual_diff_threshold", 0.005, 5.0)
        m.probe_params = dict(residual_diff_threshold=5.0)
        return m
    if spec == "diffusers-fbc":
        m = Method(
            spec,
            "diffusers FirstBlockCache",
            "peer",
            dict(threshold=0.1),
            session=lambda pipe: _diffusers_hook_session(m.params, "fbc")(pipe),
            data_dependent=True,
        )
        m.tune = lambda ctx: tune_continuous(ctx, m, "threshold", 0.005, 5.0)
        m.probe_params = dict(threshold=5.0)
        return m
    if spec == "diffusers-magcache":
        # the probe skips all it may: ratios of 1 accumulate no error (MagCacheConfig interpolates
        # them to the steps), num_inference_steps and the ratios are set by the tuning
        m = Method(spec, "diffusers MagCache", "peer",
                   dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=28,
                        mag_ratios=[1.0] * 28, calibrate=False),
                   session=lambda pipe: _diffusers_hook_session(m.params, "magcache")(pipe))  # fmt: skip
        m.tune = lambda ctx: tune_magcache(ctx, m)
        m.probe_params = dict(threshold=100.0)
        return m
    if spec == "diffusers-taylorseer":
        params = dict(cache_interval=3, disable_cache_before_step=warmup, max_order=1)
        m = Method(
            spec,
            "diffusers TaylorSeer",
            "peer",
            params,
            session=lambda pipe: _diffusers_hook_session(m.params, "taylorseer")(pipe),
        )
        # Whole blocks first (a step-level cache like cache-dit's), then diffusers' lite mode, then
        # the attention and feed-forward submodules of every block (its norms and gates still run;
        # diffusers' default hooks attention only, which cannot come near CAT's MAC budget).
        if arch == "Wan":  # blocks.N: self attention, cross attention, feed-forward
            m.variants = [
                ("cache_identifiers=[blocks.N] (whole blocks)",
                 dict(cache_identifiers=[r"blocks\.\d+"], use_lite_mode=False)),
                ("use_lite_mode=True", dict(cache_identifiers=None, use_lite_mode=True)),
                ("cache_identifiers=[blocks.N.(attn1|attn2|ffn)]",
                 dict(cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"], use_lite_mode=False)),
            ]  # fmt: skip
        elif arch == "Flux":  # re.fullmatch: the single-stream blocks need their own names
            m.variants = [
                ("cache_identifiers=[(single_)transformer_blocks.N] (whole blocks)",
                 dict(cache_identifiers=[r"(single_)?transformer_blocks\.\d+"], use_lite_mode=False)),
                ("use_lite_mode=True", dict(cache_identifiers=None, use_lite_mode=True)),
                ("cache_identifiers=[(single_)transformer_blocks.N.(attn|ff|ff_context|proj_mlp)]",
                 dict(cache_identifiers=[r"(single_)?transformer_blocks\.\d+\.(attn|ff|ff_context|proj_mlp)"],
                      use_lite_mode=False)),
            ]  # fmt: skip
        else:
            m.variants = [
                ("cache_identifiers=[transformer_blocks.N] (whole blocks)",
                 dict(cache_identifiers=[r"transformer_blocks\.\d+"], use_lite_mode=False)),
                ("use_lite_mode=True", dict(cache_identifiers=None, use_lite_mode=True)),
                ("cache_identifiers=[transformer_blocks.N.(attn|ff|ff_context)]",
                 dict(cache_identifiers=[r"transformer_blocks\.\d+\.(attn|ff|ff_context)"], use_lite_mode=False)),
            ]  # fmt: skip
        m.tune = lambda ctx: tune_taylorseer(ctx, m, warmup)
        return m
    raise SystemExit(f"bench quality: unknown method {spec!r}; peers are {PEERS}, CAT is cat:K:F[:field=value]")


def make_methods(opts: argparse.Namespace) -> list[Method]:
    out = []
    for spec in opts.methods:
        if spec == "dense":
            continue
        if spec.startswith("cat:"):
            out.append(cat_method(spec))
            continue
        peer, _, target = spec.partition("@")  # peer@cat:K:F / peer@mac:X: tuned to that MAC fraction
        if peer in ("catf", *(f"catf-{c}" for c in CATF_OUTPUT_CACHES)):
            if not target:
                raise SystemExit(f"bench quality: {peer} needs a budget: {peer}@cat:K:F or {peer}@mac:X")
            out.append(catf_method(parse_target(target), peer.partition("-")[2]))
            continue
        m = peer_method(peer, opts.peer_warmup, getattr(opts, "arch", "SD3"))
        if target:
            m.id, m.name, m.matched_to = spec, f"{m.name} @ {parse_target(target)}", target
        out.append(m)
    return out

