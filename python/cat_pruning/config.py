"""CATConfig: every knob of CAT Pruning in one validated dataclass."""

from __future__ import annotations

import dataclasses
import math
import numbers

from cat_kernels.backend import BACKENDS

SELECTIONS = ("regions", "cat", "cat-no-staleness", "topk", "random")
FORECASTS = ("none", "taylor")
FORECAST_FROM = ("all", "refresh", "rebase")
OUTPUT_CACHES = ("auto", "noise", "hidden")
SLOPE_DTYPES = ("float32", "cache", "float8")
KV_DTYPES = ("model", "float8", "float8-values")
FORECAST_CALIBRATIONS = ("none", "output")
IMPORTANCES = ("auto", "change", "forecast-error")
REFRESH_PHASES = ("fill", "end")


@dataclasses.dataclass(frozen=True)
class CATConfig:
    """Settings of CAT Pruning (Cheng et al., arXiv 2502.00433) and its forecasting variant CAT-F.

    The defaults are CAT-F at 59% of the dense MACs (28 steps on the shipped scene model; the
    paper's CAT: 51%): after 8 full steps, every third step and the last two steps recompute all
    tokens, and the steps in between recompute 2% of them, a spatial region where the forecast
    missed most, and read the others as a damped forecast from the last full or refresh step
    (second order for the model output, first order for the K/V rows).
    ``CATConfig.paper()`` is the paper's CAT (keep_ratio 0.3, reuse, no refresh steps).

    Knobs to touch:
        keep_ratio: share of image tokens recomputed at each pruned step, in (0, 1]. Default
            0.02 (the paper: 0.3). 1.0 recomputes everything (equals the unpatched model; useful
            as a check). With the Taylor forecast PSNR is flat from one token to about 0.3 and
            rises from 0.5 (64 images at the defaults: scene model 51.17 dB with one token,
            51.63 at 0.2, 52.70 at 0.5; photo model 51.32, 51.23, 52.57, its lowest 51.16 at
            0.1, 0.16 dB under one token, where computed_weight=1 fell 0.53; README, "Quality"):
            the forecast's error is spread over the image, so computing a fifth of it removes
            little, and at equal MACs more refresh steps measure better than more tokens.
        full_steps: denoising steps run on the whole model before pruning starts, >= 2.
            Default 8. The last two record the anchor and the first caches.
        refresh_every: every refresh_every-th step from the fill step on recomputes all tokens,
            so every forecast slope is fresh, >= 0. Default 3 (the paper: 0, never). 0 is only
            for forecast="none": with forecast="taylor" and no refresh steps the forecasts drift
            (14.7 dB against 23.2 dB for reuse on the scene model), so it is refused.
        refresh_phase: where the refresh steps are counted from: "fill" (default: refresh_offset
            or refresh_every steps after the fill step, then every refresh_every) or "end" (every
            refresh_every-th step counted back from the step before the final full steps, or
            from the second-to-last step without them, so the last refresh lands right before
            the end; refresh_offset must be 0). "end" needs the step count as final_full_steps
            does.
        final_full_steps: the last this-many denoising steps recompute all tokens (as refresh
            steps), >= 0. Default 2 (1 in the last release, 0 before). Like diffusers TaylorSeer's
            disable_cache_after_step: the last steps decide the fine detail of the image. The
            second one costs 3.5 points of MACs and is worth more than tokens at the same cost
            (the bench's 64 images, 55.4% -> 58.9% MACs: scene model 47.01 -> 50.89 dB, photo
            model 48.52 -> 51.17 (51.23 and 51.29 with computed_weight's default), where
            keep_ratio 0.1 at 59% gives 47.64 and 48.33; diffusers
            TaylorSeer tuned to that budget: 48.71 at 57.2% and 51.39 at 53.7%; README,
            "Quality"). Needs the generation's number of steps, which a patched pipeline
            knows; a bare denoising loop gives it with `cat_pruning.reset(model,
            num_steps=...)`, else its last steps run as the others (with a warning).
        refresh_offset: steps from the fill step to the first refresh step, then one every
            refresh_every steps; >= 0, 0 (default) means refresh_every. Aligning the last refresh with
            the second-to-last denoising step pays where the last step barely moves the latent
            (diffusers' flow-matching schedulers end with a step from sigma ~0.004 to 0): scene
            model, 8 prompts, keep 0.0586, full 6, refresh every 4 (44% MACs): 40.9 dB with
            refreshes at steps 9-25, 42.2 dB at 10-26. Elsewhere it measured a tie (the default
            schedule 45.9 against 45.8; 65% and 35% picks within 0.1 dB), so the default keeps
            the paper-style phase. With refresh_every 0 it must be 0.
        forecast: how a pruned step reads the image tokens it does not compute: "taylor"
            (default: a Taylor forecast from their last computations, see forecast_order and
            cat_pruning.cache) or "none" (reuse their value at their last computation, the paper).
            "taylor" needs refresh_every >= 1: without refresh steps the forecasts drift.
        backend: kernel backend, "auto" (default), "triton", "cuda" or "torch"
            (see cat_kernels.backend).

    Knobs for tinkering:
        num_clusters: spatial clusters (the regions, or the paper's per-cluster quotas), >= 1.
            Default 20.
        importance_fraction: selection="cat" only: share of K chosen by change in the later
            selections, in [0, 1]. Default 0.25; the rest goes to the stalest tokens.
        staleness_decay: not with selection="regions": decay of the per-token recompute count per
            pruned step, in [0, 1]. Default 0.5.
        kmeans_iters: Lloyd iterations of the one-off clustering, >= 0. Default 10.
        cluster_content_weight: weight of the model output in the clustering features next to
            the (row, column) position in token units, >= 0. Default 0.05, so clusters are
            compact spatial regions.
        cfg_pairs: whether the batch is [uncond; cond] halves that share one selection scored
            on the cond half. None (default): taken from the pipeline's
            `do_classifier_free_guidance`; False for a bare transformer.
        selection: how the K tokens of a pruned step are chosen. "regions" (default): whole
            spatial clusters, in the order of their mean score (see importance) times one plus
            the pruned steps since they were last computed, the last cluster in part (its tokens
            nearest to its highest-scoring one). A computed token attends to its neighbours'
            K/V rows; computed together with them, its squared error against the dense step is
            0.06-0.7 times the forecast's, while a token computed alone among forecast
            neighbours carries their K/V error and in the late steps lands further from the
            dense step than the forecast (1.0-3 times; scene model, keep 0.2). "cat": the
            paper's policy (per-cluster quotas of the largest change, the rest to the stalest
            tokens; CATConfig.paper()); ablations for the quality benchmark:
            "cat-no-staleness" (staleness slots go to the largest change), "topk" (global top-K
            by change, no clusters, no staleness), "random" (K tokens at random each step).
        importance: what the selection ranks tokens and clusters by: "change" (the paper: how
            far a token's output moved since the anchor step), "forecast-error" (how far the
            output forecast missed the token at its last computation: every token at a refresh
            step, the computed ones at a pruned step; needs forecast="taylor") or "auto"
            (default: "forecast-error" with forecast="taylor", else "change"). Ties in
            staleness (every token after a refresh step) go to the larger score first, then to
            a hash of token and step, never to the lower token index.
        forecast_damping: multiplier of the forecast step of the output cache (output_cache),
            in [0, 1]; 0 reuses the last value. Default 0.85: with the hidden cache at order 2
            (patch()'s defaults, 8 prompts outside the bench's sets) the photo model measured
            47.91 / 49.40 / 50.48 / 50.65 / 49.77 dB at 0.8 / 0.85 / 0.9 / 0.95 / 1.0 and the scene
            model 48.03 / 48.30 / 47.92 / 47.75 / 47.38: 0.85 is above 0.8 on both, in mean and
            worst image, where 0.9 and up cost the scene model's worst image 2 dB (the photo model
            alone would take 0.95). With the noise cache about 0.8 is best at forecast_order=2,
            about 0.4 at forecast_order=1.
        forecast_kv_damping: the same for the attention K/V rows and extra caches, in [0, 1]. 1 suits
            refresh steps every 2-3 steps; with longer gaps (refresh_every >= 4 or 0) about 0.5 is better
            (scene model, 8 prompts, refresh every 6 at 35% MACs: 27.9 dB at 1.0, 34.1 dB at 0.5).
            Default 1.0.
        forecast_horizon: the forecast extrapolates at most this many denoising steps past a token's
            last computation, >= 0; 0 (default): no cap.
        forecast_from: which computations a token's forecast starts from: "refresh" (default:
            only full and refresh steps, where every row sees exact context; the rows a pruned
            step computes are read by that step only), "all" (every one, the K rows of a pruned
            step included: value and slope) or "rebase" (a pruned step's rows become their
            tokens' values, the slope stays the refresh steps'). Only with forecast="taylor".
            A row computed at a pruned step attends to forecast K/V rows, so it is less exact than
            it looks: fed into the slopes over a one-step gap ("all") it makes more tokens give
            worse images (scene model, 8 prompts, keep 1 token -> 0.3: 46.4 -> 38.5 dB), and
            even as a new value only ("rebase") it loses to the forecast (-> 42.3 dB); "refresh"
            keeps the curve flat or rising (46.3 -> 47.6 dB, 49.0 at 0.5).
        forecast_order: order of the model-output (noise cache) forecast, 1 or 2. Default 2
            (64 images at the default schedule, 52% MACs: 42.89 dB at order 1 with damping 0.4,
            45.25 dB at order 2 with damping 0.8, higher on 60 of 64; README, "Quality").
            2 adds the curvature of the token's last three computations (a Newton
            extrapolation through them; cat_pruning.cache), which pays with refresh steps every
            2-3 steps and costs with longer gaps (scene model, 8 prompts outside the benchmark's
            sets, best damping of each order: at 65% MACs, refresh every 2, 47.2 dB at order 1
            and 48.4 dB at order 2 (damping 0.8); at 51%, every 3: 44.7 against 45.2; at 44%,
            every 4: 40.9 against 40.3). The K/V rows and extra caches stay first order (order
            2 there measured no better). Only with forecast="taylor".
        output_cache: what the per-token output cache holds, which a pruned step scatters its
            computed rows into and reads (reuses or forecasts) for the others: "noise" (the
            paper: the model's per-token prediction), "hidden" (the last block's hidden
            state, the input of the model's final norm; the final norm, its timestep
            modulation and the output projection then run on every token at every step, as
            diffusers' TaylorSeer does when it forecasts whole blocks) or "auto" (default:
            "hidden", except on a pipeline that gives a per-token timestep, Wan 2.2 TI2V's
            ``expand_timesteps``, where it is "noise"; ``stats()`` and the patch's config
            say which). "hidden" costs the output projection over all N tokens at a pruned
            step (a fraction of a percent of a step) and caches the model width instead of
            the output channels; the selection is then scored on the hidden state's change.
            64 images at the defaults (damping 0.8): scene model (SD3) 47.03 dB against
            46.69 with "noise", photo model (Flux) 47.20 against 45.35 (keep_ratio 0.2:
            47.47 against 46.64, 47.43 against 46.08); and only with "hidden" does no larger
            keep_ratio fall more than 0.3 dB below a smaller one on either model (README,
            "Quality"). The scene model's keep_ratio 0.75 is where "noise" is better (51.68
            against 51.05). Under context parallelism each rank keeps the whole cache, as it
            does the noise cache. "hidden" is refused with a per-token timestep (the final
            modulation is then per token): at patch time on such a pipeline, at the first
            call on a bare transformer (where "auto" cannot see the pipeline: patch the
            pipeline, or pass "noise").
        slope_dtype: what the caches' slopes are stored in: "cache" (default: each cache's own
            dtype, e.g. bf16 next to bf16 rows; the output cache's curvature and forecast slope
            too), "float32" or "float8". "cache"
            makes CAT-F's state about 2.1x the paper's reuse caches instead of 3.1x in bf16
            (Flux.1-dev 1024 px: 5.54 GiB against 8.28, the paper's 2.67); in fp32 models the
            two are the same.
            PSNR against fp32 slopes, models in bf16, the quality bench's first 16 prompts
            (bench/experiments/config_sweep.py): photo model -0.02 dB at the defaults, -0.04 at
            keep 0.2; scene model -0.08 and +0.23 (the output cache's state was fp32 then; in
            the cache's dtype against fp32, the same prompts: photo +0.00 and +0.02 dB, scene
            +0.22 and -0.10; bench/results/sweep-output-state-dtype-cpu.txt). "float8": the K/V
            slopes in e4m3 with one fp32 scale per head of each row, as kv_dtype="float8" stores
            values, next to values in the model's dtype (the extra and output caches' slopes in
            their own dtype, as with "cache"): 1.6x to 1.8x the paper's caches in bf16
            (Sana 2.0x) instead of 2.1x to 2.2x. A slope is a row's change per step, so its fp8
            rounding (3 mantissa bits) moves the forecast by a few percent of a step's change,
            not of the row. Against "cache", 16 images (README, "Cache memory"): video model
            (fp32) 0.00 dB, photo model (bf16) 0.00, scene model (bf16) +0.22 at the defaults
            and -0.43 at keep 0.2. Dequantized by plain torch ops for now: it lowers the bytes
            held, and a pruned step moves more bytes than with "cache". Only with
            forecast_from="refresh" (like kv_dtype). Only with forecast="taylor".
        forecast_calibration: "none" (default) or "output": at a pruned step the output cache's
            forecast step (base + damping x horizon x slope) is scaled, for the skipped tokens,
            by one multiplier per sample: the least-squares fit, over the step's computed
            tokens, of their exact rows against their forecasts, clamped to [0, 1.5] (1 where
            the forecast does not move). It costs no MACs. It pays where a fixed step is far
            off, and costs where the damping is tuned, because the computed tokens are chosen
            where the forecast missed most and attend to forecast K/V, so their fit is biased
            (8 prompts outside the bench's sets: photo model, order 1, damping 1, refresh every
            4 at 36.5% MACs: 41.85 dB -> 43.55 with one token, 43.83 with 10; but every 3 at 44%:
            48.37 -> 47.23, every 2 at 65%: 55.49 -> 51.86 at order 2; scene model, 35%, refresh
            every 5, order 1: 30.31 -> 33.88 at damping 1, 36.73 -> 35.16 at damping 0.4;
            patch()'s defaults: photo 49.40 -> 45.65, scene 48.30 -> 45.19). The quality bench's tuner
            tries it. With it, more tokens are not always better: the photo model's 35% pick
            (full 4, every 4 at offset 2) gives 44.77 / 45.80 / 45.83 / 45.49 / 44.98 / 45.58 /
            46.84 dB at keep 1 token / 0.02 / 0.05 / 0.1 / 0.2 / 0.3 / 0.5 (without it 40.42 /
            40.91 at 0.05 / 41.76 at 0.2 / 45.12 at 0.5: below at every keep ratio). Only with
            forecast="taylor" and forecast_from "refresh" or "rebase".
        computed_weight: how far a token computed at a pruned step moves its output (the
            output_cache row) from the forecast: the step reads forecast + w x (computed -
            forecast), with w = computed_weight + (1 - computed_weight) x K / N for K of N tokens
            computed, so w rises to 1 (the computed row alone, exact) as keep_ratio rises to 1;
            in [0, 1], default 0.5; 1: the computed row outright (before this knob). Both rows
            estimate the dense one, and the computed row's error comes from the forecast K/V
            of the tokens not computed, which shrinks as more are. With w = 1 a few computed
            tokens made the photo model's images worse (64 images, patch()'s defaults: 51.29 dB
            at one token, 50.77 at keep 0.1); with the default 51.32 and 51.16, and no larger
            keep ratio more than 0.16 dB below a smaller one on either shipped model (README,
            "Quality"). 8 prompts outside the bench's sets, keep 1 token / 0.1 / 0.3: photo
            model 52.21 / 51.69 / 52.60 dB at 1, 52.22 / 52.13 / 52.72 at 0.5 without the K / N
            term; scene model, keep 0.02 / 0.1 / 0.3: 53.33 / 53.59 / 53.12 at 1, 53.35 /
            53.61 / 53.40 at the default. Tuned with the models in fp32: in bf16 the photo
            model's keep 0.1 falls 0.35 dB under the defaults at 0.5 and 0.05 dB at 0 (32
            images; README, "Quality"). The rows the step feeds into the forecast state
            (forecast_from "all" or "rebase") are the same weighted rows. Only with
            forecast="taylor".
        kv_dtype: what the image K/V caches (and with slope_dtype="cache" their slopes) are
            stored in: "model" (default: the dtype the K projection computes in), "float8":
            e4m3 with one fp32 scale per head of each row (its largest magnitude maps to 448),
            about half the bytes of bf16 caches (Wan 2.1-14B at 480p with both CFG branches:
            the paper's caches 27 GiB instead of 50, next to 27 GiB of bf16 weights), or
            "float8-values": only V in fp8, K in the model's dtype (about 0.75x). A step
            dequantizes a layer's rows into one buffer that all layers share and attends over
            it; the rows a pruned step computes are attended exactly and stored quantized.
            "float8" is within 0.1 dB on the shipped image models; the video model loses 2.2 dB
            at the defaults, all from the keys, which "float8-values" keeps (README, "Cache
            memory"). Sana's convolution caches and the output cache keep the model's dtype.
            With forecast="taylor" only with forecast_from="refresh".
        fused_attention: a pruned step attends in one op, cat_kernels' forecast_attention: the
            selected queries against every image token's key and value, each skipped one formed
            from its cached value (and slope) while it is read, plus the computed and text rows
            (a padded prompt's text mask applied); the N image rows are neither written to a
            buffer nor concatenated. Default False. The same attention as the default path but
            for rounding (the keys are summed in another order; fp32 softmax): a GPU option,
            where the Triton kernel moves about 4-6 bytes per cached element against about 14
            (issue 21 item 2; `python bench/run.py --suite e2e --filter roofline`: SD3-medium
            1.42x -> 1.45x predicted on an H100). On the CPU it runs the extension's blocked
            implementation: mid-size SD3, eager, 1.32x against 1.29x without it (`--filter
            "wall[sd3-mid-cpu-catf-fused,eager]"`), within the noise. Dense steps keep the
            model's attention backend. Softmax attention only (Sana's linear attention refuses
            it at patch()), K/V and slopes in the model's dtype (kv_dtype="model", slope_dtype
            not "float8"), and with forecast="taylor" only forecast_from="refresh".
        manual_steps: for a bare transformer only: the caller marks the end of every denoising
            step with `cat_pruning.advance(transformer)` instead of the transformer counting its
            own forwards. Needed under torch.compile, where the count cannot be kept inside the
            compiled code without a recompile per step. Ignored for pipelines (the patch
            counts scheduler steps). Default False.
    """

    keep_ratio: float = 0.02
    full_steps: int = 8
    backend: str = "auto"
    num_clusters: int = 20
    importance_fraction: float = 0.25
    staleness_decay: float = 0.5
    kmeans_iters: int = 10
    cluster_content_weight: float = 0.05
    cfg_pairs: bool | None = None
    manual_steps: bool = False
    selection: str = "regions"
    importance: str = "auto"
    forecast: str = "taylor"
    refresh_every: int = 3
    refresh_offset: int = 0
    refresh_phase: str = "fill"
    final_full_steps: int = 2
    forecast_damping: float = 0.85
    forecast_kv_damping: float = 1.0
    forecast_horizon: float = 0.0
    forecast_from: str = "refresh"
    forecast_order: int = 2
    output_cache: str = "auto"
    slope_dtype: str = "cache"
    forecast_calibration: str = "none"
    computed_weight: float = 0.5
    kv_dtype: str = "model"
    fused_attention: bool = False

    def __post_init__(self) -> None:
        """Refuse what would run differently from what it says: a value of the wrong type is a
        TypeError, a value out of its range (or a knob that the chosen forecast ignores) a
        ValueError; each message names the field, what it takes and what it got."""
        for name, kind, ok, expected in _RULES:
            value = getattr(self, name)
            if not _KINDS[kind](value):
                raise TypeError(f"CATConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")
            if ok is not None and not ok(value):
                raise ValueError(f"CATConfig.{name} must be {expected}, got {value!r}")
        if self.refresh_every == 0 and self.refresh_offset != 0:
            raise ValueError(f"CATConfig.refresh_offset must be 0 when refresh_every is 0 (no refresh steps), "
                             f"got {self.refresh_offset!r}")
        if self.refresh_phase == "end" and self.refresh_offset != 0:
            raise ValueError(f"CATConfig.refresh_offset must be 0 with refresh_phase='end' (the phase is counted "
                             f"back from the end), got {self.refresh_offset!r}")
        if self.importance == "forecast-error" and self.forecast != "taylor":
            raise ValueError('CATConfig.importance="forecast-error" needs forecast="taylor" (reuse has no forecast '
                             'to miss); use importance="change" or "auto"')
        if self.forecast == "taylor" and self.refresh_every == 0:
            raise ValueError(
                "CATConfig.refresh_every=0 (no refresh step) with forecast=\"taylor\" lets every forecast "
                "drift from the fill step to the end (scene model: 14.7 dB against 23.2 dB for reuse); set "
                "refresh_every >= 1, or forecast=\"none\" to reuse skipped rows as the paper does")
        if self.forecast_calibration != "none" and self.forecast_from == "all":
            raise ValueError(f"CATConfig.forecast_calibration={self.forecast_calibration!r} fits the forecast on a "
                             f"pruned step's computed rows, which forecast_from=\"all\" makes the new values and "
                             f"slopes of their tokens: use forecast_from=\"refresh\" or \"rebase\"")
        float8 = (f"kv_dtype={self.kv_dtype!r}" if self.kv_dtype != "model"
                  else "slope_dtype='float8'" if self.slope_dtype == "float8" else None)  # fmt: skip
        if float8 and self.forecast == "taylor" and self.forecast_from != "refresh":
            raise ValueError(f"CATConfig.{float8} keeps the K/V forecast state as it was at the "
                             f"last full or refresh step; forecast_from={self.forecast_from!r} would update it at "
                             f"every pruned step (a requantization per step): use forecast_from=\"refresh\" (the "
                             f"default)")
        if self.fused_attention:
            unfused = (f"kv_dtype={self.kv_dtype!r}" if self.kv_dtype != "model"
                       else "slope_dtype='float8'" if self.slope_dtype == "float8"
                       else f"forecast_from={self.forecast_from!r}" if self.forecast == "taylor"
                       and self.forecast_from != "refresh" else None)  # fmt: skip
            if unfused:
                raise ValueError(f"CATConfig.fused_attention=True reads the K/V caches and slopes in the model's "
                                 f"dtype and forms each skipped row from the last full or refresh step; {unfused} "
                                 f"does not fit it: leave that knob at its default or fused_attention=False")
        if self.selection == "regions":
            for name in ("importance_fraction", "staleness_decay"):
                value, default = getattr(self, name), _DEFAULTS[name]
                if value != default:
                    raise ValueError(
                        f"CATConfig.{name}={value!r} does not apply to selection=\"regions\" (it would be ignored): "
                        f"set selection=\"cat\" or leave {name} at its default {default!r}")
        if self.forecast != "taylor":
            for name in _TAYLOR_ONLY:
                value, default = getattr(self, name), _DEFAULTS[name]
                if value != default:
                    raise ValueError(
                        f"CATConfig.{name}={value!r} only applies with forecast=\"taylor\"; with "
                        f"forecast={self.forecast!r} it would be ignored: set forecast=\"taylor\" or leave "
                        f"{name} at its default {default!r}"
                    )

    @classmethod
    def paper(cls, **overrides: object) -> CATConfig:
        """CAT Pruning as published (arXiv 2502.00433): keep_ratio 0.3, full_steps 8, skipped rows
        reused (no forecast), no refresh steps, no final full steps, the paper's token selection,
        the model's prediction cached; `overrides` change any field."""
        paper = cls(keep_ratio=0.3, full_steps=8, forecast="none", refresh_every=0, final_full_steps=0, selection="cat",
                    output_cache="noise")
        return paper.replace(**overrides)

    @property
    def needs_num_steps(self) -> bool:
        """Whether the schedule counts from the end (final_full_steps, refresh_phase "end")."""
        return bool(self.final_full_steps) or self.refresh_phase == "end"

    def mode(self, step: int, num_steps: int | None = None) -> str:
        """What denoising step `step` (from 0) of `num_steps` runs: "dense" before full_steps - 2,
        then "anchor" and "fill", then "pruned", or "refresh" refresh_offset (default
        refresh_every) steps after the fill step and every refresh_every-th step after that
        (refresh_phase "end": every refresh_every-th step counted back from the step before the
        final full steps), and in the last final_full_steps steps (both only when `num_steps` is
        known)."""
        f, every = self.full_steps, self.refresh_every
        if step < f - 2:
            return "dense"
        if step < f:
            return ("anchor", "fill")[step - (f - 2)]
        if self.final_full_steps and num_steps is not None and step >= num_steps - self.final_full_steps:
            return "refresh"
        if self.refresh_phase == "end" and num_steps is not None:  # counted back from the last refresh
            end = num_steps - 1 - max(self.final_full_steps, 1)
            return "refresh" if every and step <= end and (end - step) % every == 0 else "pruned"
        since = step - (f - 1) - (self.refresh_offset or every)  # steps since the first refresh
        return "refresh" if every and since >= 0 and since % every == 0 else "pruned"

    def tokens_kept(self, num_tokens: int) -> int:
        """K = ceil(keep_ratio * N), at least 1."""
        return max(1, min(num_tokens, math.ceil(self.keep_ratio * num_tokens - 1e-9)))

    def replace(self, **overrides: object) -> CATConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown CATConfig field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


# ------------------------------------------------------------------ validation rules of CATConfig


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _unit(v: float) -> bool:
    return 0.0 <= v <= 1.0  # False for NaN


_KINDS = {
    "number": _is_number,
    "int": _is_int,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: v is True or v is False,  # not 0 / 1 or other objects equal to them
    "bool or None": lambda v: v is None or v is True or v is False,
}

# (field, kind (a wrong one is a TypeError), value check (a failed one is a ValueError), what it takes)
_RULES = (
    ("keep_ratio", "number", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("full_steps", "int", lambda v: v >= 2, "an int >= 2"),
    ("backend", "str", lambda v: v in BACKENDS, f"one of {BACKENDS}"),
    ("num_clusters", "int", lambda v: 1 <= v <= 1023, "an int in [1, 1023]"),
    ("importance_fraction", "number", _unit, "a number in [0, 1]"),
    ("staleness_decay", "number", _unit, "a number in [0, 1]"),
    ("kmeans_iters", "int", lambda v: v >= 0, "an int >= 0"),
    ("cluster_content_weight", "number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("cfg_pairs", "bool or None", None, "None, True or False"),
    ("manual_steps", "bool", None, "True or False"),
    ("selection", "str", lambda v: v in SELECTIONS, f"one of {SELECTIONS}"),
    ("importance", "str", lambda v: v in IMPORTANCES, f"one of {IMPORTANCES}"),
    ("forecast", "str", lambda v: v in FORECASTS, f"one of {FORECASTS}"),
    ("refresh_every", "int", lambda v: v >= 0, "an int >= 0"),
    ("refresh_offset", "int", lambda v: v >= 0, "an int >= 0"),
    ("refresh_phase", "str", lambda v: v in REFRESH_PHASES, f"one of {REFRESH_PHASES}"),
    ("final_full_steps", "int", lambda v: v >= 0, "an int >= 0"),
    ("forecast_damping", "number", _unit, "a number in [0, 1]"),
    ("forecast_kv_damping", "number", _unit, "a number in [0, 1]"),
    ("forecast_horizon", "number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("forecast_from", "str", lambda v: v in FORECAST_FROM, f"one of {FORECAST_FROM}"),
    ("forecast_order", "int", lambda v: v in (1, 2), "1 or 2"),
    ("output_cache", "str", lambda v: v in OUTPUT_CACHES, f"one of {OUTPUT_CACHES}"),
    ("slope_dtype", "str", lambda v: v in SLOPE_DTYPES, f"one of {SLOPE_DTYPES}"),
    ("forecast_calibration", "str", lambda v: v in FORECAST_CALIBRATIONS, f"one of {FORECAST_CALIBRATIONS}"),
    ("computed_weight", "number", _unit, "a number in [0, 1]"),
    ("kv_dtype", "str", lambda v: v in KV_DTYPES, f"one of {KV_DTYPES}"),
    ("fused_attention", "bool", None, "True or False"),
)
# the knobs of the Taylor forecast, which forecast="none" (reuse) does not read
_TAYLOR_ONLY = ("forecast_damping", "forecast_kv_damping", "forecast_horizon", "forecast_from", "forecast_order",
                "slope_dtype", "forecast_calibration", "computed_weight")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CATConfig)}
