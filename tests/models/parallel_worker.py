"""One rank of the model-parallel tests (test_parallel.py): runs under torch.distributed.run with
the gloo backend on the CPU, one short Flux generation per scenario, and saves what it got.

    python -m torch.distributed.run --nproc_per_node 2 parallel_worker.py OUT_DIR SCENARIO...

Also imported by the test for the one-process references (same pipeline, inputs and settings).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

import cat_pruning

STEPS = 6
TEXT = 8  # text tokens: a multiple of the 2 ranks (diffusers splits them too)
# full_steps 3 (step 0 dense, 1 anchor, 2 fill), then pruned, pruned, refresh (every 3)
# K = 12 of 30 tokens; the noise cache named (the default "auto" is the hidden one, scenario "hidden")
# the last step in full (not the default two): 6 steps give two pruned steps
SETTINGS = dict(keep_ratio=0.4, full_steps=3, refresh_every=3, final_full_steps=1, backend="torch",
                output_cache="noise")
# K = 9 of 30 tokens: not a multiple of the 2 ranks, so a pruned step computes 10 rows, one a repeat
PADDED = {"pad": dict(SETTINGS, keep_ratio=0.3),  # the Taylor forecast (the default): its pos map
          "pad-reuse": dict(SETTINGS, keep_ratio=0.3, forecast="none"),  # the K/V and output scatters
          "pad-refresh": dict(SETTINGS, keep_ratio=0.3, forecast_from="refresh"),  # scatters into the reads
          "pad-rebase1": dict(SETTINGS, keep_ratio=0.3, forecast_from="rebase", forecast_order=1),  # and the bases
          "pad-rebase": dict(SETTINGS, keep_ratio=0.3, forecast_from="rebase"),  # and the order-2 span
          "hidden": dict(SETTINGS, output_cache="hidden"),  # the cache at the final norm's input
          "float8": dict(SETTINGS, kv_dtype="float8"),  # fp8 K/V rows, scaled per head
          "float8-reuse": dict(SETTINGS, forecast="none", kv_dtype="float8"),
          # pruned steps attending in one op: the padding's repeated rows attended once
          "pad-fused": dict(SETTINGS, keep_ratio=0.3, fused_attention=True)}


def build(family: str = "flux"):
    """The tiny stock pipeline of a family: "flux" (FluxPipeline), "flux2" (Flux2Pipeline), "qwen"
    (QwenImagePipeline), "wan" (WanPipeline) or "ti2v" (WanPipeline with Wan 2.2 TI2V's per-token
    timestep)."""
    if family in ("wan", "ti2v"):
        from test_wan import tiny_pipeline

        pipe = tiny_pipeline(expand_timesteps=family == "ti2v")
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if family == "flux2":
        from test_flux2 import tiny_pipeline
    elif family == "qwen":
        from test_qwenimage import tiny_pipeline
    else:
        from test_flux import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_kwargs(pipe) -> dict:
    """Prompt embeddings of TEXT tokens (fixed seed) in the form the pipeline takes them, and an
    image size of 6 x 5 = 30 tokens (Wan: 3 frames of 2 x 5 tokens, given as latents: its pipeline
    takes sizes in multiples of 16 pixels)."""
    g = torch.Generator().manual_seed(100)
    name = type(pipe).__name__
    if name == "Flux2Pipeline":
        from flux2_models import JOINT_DIM

        return dict(prompt_embeds=torch.randn(1, TEXT, JOINT_DIM, generator=g), guidance_scale=4.0, height=24,
                    width=20)
    if name == "QwenImagePipeline":  # true CFG (a call per branch); the prompt padded: the text mask matters
        from qwen_models import JOINT_DIM

        mask = torch.ones(1, TEXT, dtype=torch.long)
        mask[0, -3:] = 0
        return dict(prompt_embeds=torch.randn(1, TEXT, JOINT_DIM, generator=g), prompt_embeds_mask=mask,
                    negative_prompt_embeds=torch.randn(1, TEXT, JOINT_DIM, generator=g),
                    negative_prompt_embeds_mask=torch.ones(1, TEXT, dtype=torch.long), true_cfg_scale=3.0,
                    height=48, width=40)
    if name == "WanPipeline":  # CFG: a call per branch
        from wan_models import IN_CHANNELS, TEXT_DIM

        return dict(prompt_embeds=torch.randn(1, TEXT, TEXT_DIM, generator=g),
                    negative_prompt_embeds=torch.randn(1, TEXT, TEXT_DIM, generator=g), guidance_scale=4.0,
                    latents=torch.randn(1, IN_CHANNELS, 3, 4, 10, generator=g), height=16, width=16)
    from flux_models import JOINT_DIM, POOLED_DIM

    return dict(prompt_embeds=torch.randn(1, TEXT, JOINT_DIM, generator=g),
                pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g), guidance_scale=3.5, height=24,
                width=20)


def generate(pipe, seed: int = 0) -> dict:
    """Latents of one generation and, per step, the tokens the next step computes (when CAT
    selected any)."""
    picks, noise = [], []

    def record(pipeline, i, t, kwargs):
        patch = getattr(pipeline.transformer, "_cat_pruning", None)
        if patch is not None and patch.state.history[-1][0] in ("fill", "pruned", "refresh"):  # it selected
            picks.append(patch.state.idx.clone())
        return kwargs

    def record_noise(module, args, kwargs, output):  # the noise prediction of every step
        noise.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    handle = pipe.transformer.register_forward_hook(record_noise, with_kwargs=True)
    repeats = _watch_repeats(pipe)
    latents = pipe(
        **_call_kwargs(pipe), num_inference_steps=STEPS, output_type="latent",
        generator=torch.Generator().manual_seed(seed), callback_on_step_end=record, return_dict=False,
    )[0]
    handle.remove()
    out = {"latents": latents, "picks": picks, "noise": noise, "repeats": repeats}
    patch = getattr(pipe.transformer, "_cat_pruning", None)
    if patch is not None:
        stats = cat_pruning.stats(pipe)
        out.update(modes=[s.mode for s in stats.steps], tokens_kept=stats.tokens_kept,
                   tokens=[s.tokens for s in stats.steps], recomputed=stats.recomputed, macs=stats.macs,
                   padded_rows=stats.padded_rows, branches=len(stats.branches or ()) or 1)
    return out


def _watch_repeats(pipe) -> list[float]:
    """At every pruned step whose selection is padded (context parallelism, K not a multiple of
    the ranks), how far the rows the cache store gets for the repeated tokens (every attention
    layer's K and V, and the model output) are from the rows of the tokens they repeat (0: equal
    bitwise, what makes the store's scatters of a repeated token write one value twice)."""
    patch = getattr(pipe.transformer, "_cat_pruning", None)
    seen: list[bool] = []
    if patch is None:
        return seen
    state = patch.state

    def check(rows):  # (B, K', C): the selection's rows in order, then the repeats
        if state.mode == "pruned" and state.padding:
            repeated = torch.arange(state.padding) % state.kept  # _set_selection repeats the first tokens
            seen.append(float((rows[:, state.kept:] - rows[:, repeated]).abs().max()))

    def watch(store):
        kv, output = store.kv, store.output

        def checked_kv(name, key, value):
            check(key)
            check(value)
            return kv(name, key, value)

        def checked_output(out):
            check(out)
            return output(out)

        store.kv, store.output, store.watched = checked_kv, checked_output, True

    def pre_hook(module, args, kwargs):  # the store of the branch about to run (FluxPipeline: "cond")
        if not getattr(state.cache, "watched", False):
            watch(state.cache)

    pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return seen


def _config(kind: str):
    from diffusers import ContextParallelConfig, TensorParallelConfig

    world = dist.get_world_size()
    if kind == "cp":
        return ContextParallelConfig(ulysses_degree=world)
    if kind == "ring":
        return ContextParallelConfig(ring_degree=world)
    import diffusers.hooks.tensor_parallel as tp  # diffusers refuses CPU meshes; gloo runs DTensor fine

    if "cpu" not in tp._SUPPORTED_TP_DEVICES:
        tp._SUPPORTED_TP_DEVICES = (*tp._SUPPORTED_TP_DEVICES, "cpu")
    return TensorParallelConfig(tp_degree=world)


def run(scenario: str) -> dict:
    """`{cp,tp}-{dense,one,after,before}`: model parallelism alone, with CAT keep_ratio 1, with CAT
    patched after or before enable_parallelism; `cp-disagree`: rank-dependent seeds; `ring`:
    ring attention; `sd3`: a family without a plan. A `+VARIANT` suffix runs the settings
    PADDED[VARIANT] instead of SETTINGS (`cp-after+pad`); a `FAMILY/` prefix, that family's
    pipeline (`flux2/cp-after`; Flux.1 without one)."""
    rank = dist.get_rank()
    family, _, scenario = scenario.rpartition("/")
    scenario, _, variant = scenario.partition("+")
    settings = PADDED[variant] if variant else SETTINGS
    if scenario == "sd3":
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ContextParallelInput
        from test_sd3_pipeline import tiny_pipeline

        pipe = tiny_pipeline()
        pipe.transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=dist.get_world_size()),
            cp_plan={"": {"hidden_states": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)}})
        cat_pruning.patch(pipe, **SETTINGS)
        return {}
    pipe = build(family or "flux")
    kind, _, how = scenario.partition("-")
    if how == "before":
        cat_pruning.patch(pipe, **settings)
    pipe.transformer.enable_parallelism(config=_config(kind))
    if how in ("after", "disagree") or kind == "ring":
        cat_pruning.patch(pipe, **settings)
    elif how == "one":
        cat_pruning.patch(pipe, **{**SETTINGS, "keep_ratio": 1.0})
    return generate(pipe, seed=rank if how == "disagree" else 0)


def main() -> None:
    out_dir, scenarios = sys.argv[1], sys.argv[2:]
    torch.accelerator.device_count = lambda: 1  # diffusers divides by it; the CPU reports 0
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # every collective is bounded
    rank = dist.get_rank()
    results = {}
    for scenario in scenarios:
        try:
            results[scenario] = run(scenario)
        except Exception as err:  # the test checks which scenarios must fail, and how
            results[scenario] = {"error": f"{type(err).__name__}: {err}",
                                 "trace": traceback.format_exc(limit=4)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
