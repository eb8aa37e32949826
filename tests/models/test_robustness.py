"""A patched pipeline survives what diffusers users do to it (issue 11), on the stock pipelines of all
five families built from tiny random components, 3 denoising steps with full_steps=2 (so the last
step is pruned). Each case is either correct (keep_ratio 1 equals the unpatched pipeline in the
same state, bitwise where the path is the dense one) or refused at once with a message that says
what to do."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from harness import F32, TOL

import cat_pruning

STEPS, FULL = 3, 2


# ---------------------------------------------------------------------- the five pipelines


def _sd3():
    from test_sd3_pipeline import tiny_pipeline

    return tiny_pipeline()


def _sd3_kwargs(steps, guidance):
    from sd3_models import JOINT_DIM, POOLED_DIM, TEXT_TOKENS

    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, TEXT_TOKENS, JOINT_DIM, generator=g), torch.randn(2, POOLED_DIM, generator=g)
    return dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
                negative_pooled_prompt_embeds=pooled[1:], height=24, width=20, num_inference_steps=steps,
                guidance_scale=3.0 if guidance is None else guidance)


def _flux():
    from test_flux import tiny_pipeline

    return tiny_pipeline()


def _flux_kwargs(steps, guidance):
    from test_flux import pipeline_kwargs

    kw = pipeline_kwargs(batch=1)
    kw.pop("generator"), kw.pop("output_type")
    return {**kw, "num_inference_steps": steps, "guidance_scale": 3.5 if guidance is None else guidance}


def _pixart():
    from test_pixart import tiny_pipeline

    return tiny_pipeline()


def _pixart_kwargs(steps, guidance):
    from pixart_models import CAPTION_DIM, TEXT_TOKENS

    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1.0] * 4 + [0.0] * (TEXT_TOKENS - 4)])
    return dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, CAPTION_DIM, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(1, TEXT_TOKENS, CAPTION_DIM, generator=g), negative_prompt=None,
                negative_prompt_attention_mask=mask, height=16, width=24, num_inference_steps=steps,
                guidance_scale=4.5 if guidance is None else guidance, use_resolution_binning=False)


def _sana():
    from test_sana import tiny_pipeline

    return tiny_pipeline()


def _sana_kwargs(steps, guidance):
    from test_sana import pipeline_kwargs

    kw = pipeline_kwargs(batch=1)
    kw.pop("generator"), kw.pop("output_type")
    return {**kw, "num_inference_steps": steps, "guidance_scale": 4.5 if guidance is None else guidance}


def _dit():
    from test_dit import tiny_pipeline

    return tiny_pipeline()


def _dit_kwargs(steps, guidance):
    return dict(class_labels=[3], num_inference_steps=steps, guidance_scale=4.0 if guidance is None else guidance)


@dataclasses.dataclass(frozen=True)
class Fam:
    name: str
    build: Callable
    kwargs: Callable  # (steps, guidance or None for the family's default) -> call kwargs, output/generator excluded
    lora_targets: tuple[str, ...]  # layers a test LoRA adapts: the patch embedding's, the output's, attention's
    pipeline_lora: bool  # the pipeline has load_lora_weights / set_adapters / fuse_lora / unload_lora_weights
    callbacks: bool  # callback_on_step_end and pipe.interrupt
    cfg: bool  # classifier-free guidance batches [uncond; cond]


FAMILIES = {
    f.name: f
    for f in (
        Fam("sd3", _sd3, _sd3_kwargs, ("pos_embed.proj", "to_q", "to_k", "to_v", "proj_out"), True, True, True),
        Fam("flux", _flux, _flux_kwargs, ("x_embedder", "to_q", "to_k", "to_v", "proj_out"), True, True, False),
        Fam("pixart", _pixart, _pixart_kwargs, ("pos_embed.proj", "to_q", "to_k", "to_v", "proj_out"), False, False,
            True),
        Fam("sana", _sana, _sana_kwargs, ("patch_embed.proj", "to_q", "to_k", "to_v", "conv_inverted", "proj_out"),
            True, True, True),
        Fam("dit", _dit, _dit_kwargs, ("to_q", "to_k", "to_v", "proj_out_2"), False, False, True),
    )
}
ALL = list(FAMILIES)
WITH_CALLBACKS = [n for n, f in FAMILIES.items() if f.callbacks]


def build(fam: Fam):
    pipe = fam.build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(fam: Fam, pipe, steps: int = STEPS, guidance: float | None = None, seed: int = 4,
        output_type: str | None = None, images: int = 1, **extra) -> torch.Tensor:
    """One generation; its latents (output_type None: the VAE, which the patch does not touch, is
    skipped where the pipeline can; DiT's always decodes)."""
    if output_type is None:
        output_type = "pt" if fam.name == "dit" else "latent"
    kw = {k: v.to(pipe.transformer.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in fam.kwargs(steps, guidance).items()}  # embeddings in the pipeline's dtype
    if images > 1 and fam.name == "sd3":  # SD3 does not repeat precomputed prompt embeddings: give them per image
        kw = {k: v.repeat(images, *[1] * (v.ndim - 1)) if k.endswith("embeds") else v for k, v in kw.items()}
    elif images > 1:
        extra["num_images_per_prompt"] = images
    out = pipe(**kw, generator=torch.Generator().manual_seed(seed), output_type=output_type, **extra).images
    return torch.as_tensor(out)  # DiTPipeline on diffusers 0.36 returns numpy for "pt"


def patch(pipe, keep_ratio: float, **kw):
    # 3-step generations: without a final full step, the last step is the pruned one these checks need
    kw.setdefault("final_full_steps", 0)
    return cat_pruning.patch(pipe, keep_ratio=keep_ratio, full_steps=FULL, backend="torch", **kw)


def modes(pipe) -> list[str]:
    return [s.mode for s in cat_pruning.stats(pipe).steps]


def state(pipe):
    return pipe.transformer._cat_pruning.state


def close(got, want, tol=F32):
    torch.testing.assert_close(got, want, **tol)


# ---------------------------------------------------------------------- layerwise casting, dtypes, devices


@pytest.mark.parametrize("family", ALL)
def test_layerwise_casting_caches_take_the_compute_dtype(family):
    """float8 storage, float32 compute, switched on after the patch (the caches are laid out at each
    generation, so before is the same): the caches hold the keys as computed (float32), and
    keep_ratio 1 equals the unpatched pipeline with the same casting."""
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 1.0)
    for p in (pipe, twin):
        p.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    want = run(fam, twin)
    close(run(fam, pipe), want)
    assert modes(pipe)[-1] == "pruned"
    store = state(pipe).cache
    caches = [t for pair in store.kv_cache.values() for t in pair] + [store.noise, *store.extra.values()]
    assert caches and all(t.dtype == torch.float32 for t in caches)
    patch(pipe, 0.5)
    pruned = run(fam, pipe)
    assert modes(pipe)[-1] == "pruned" and torch.isfinite(pruned).all() and not torch.equal(pruned, want)


@pytest.mark.parametrize("family", ALL)
def test_float64_is_refused_at_patch_and_at_the_call(family):
    fam = FAMILIES[family]
    pipe = build(fam).to(torch.float64)
    with pytest.raises(ValueError, match=r"torch\.float64.*pipe\.to\(torch\.float32\)"):
        patch(pipe, 0.5)
    assert not cat_pruning.is_patched(pipe)
    pipe.to(torch.float32)
    patch(pipe, 0.5)
    pipe.to(torch.float64)  # after the patch: refused at the first transformer call
    with pytest.raises(ValueError, match=r"torch\.float64"):
        run(fam, pipe)


@pytest.mark.parametrize("family", ALL)
def test_pipe_to_dtype_between_generations(family):
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 1.0)
    close(run(fam, pipe), run(fam, twin))
    pipe.to(torch.bfloat16), twin.to(torch.bfloat16)
    close(run(fam, pipe), run(fam, twin), TOL[torch.bfloat16])
    assert modes(pipe)[-1] == "pruned" and state(pipe).cache.noise.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("family", ALL)
def test_pipe_to_device_between_generations(family):
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 1.0)
    run(fam, pipe)
    pipe.to("cuda"), twin.to("cuda")
    close(run(fam, pipe), run(fam, twin))
    assert state(pipe).cache.noise.device.type == "cuda" and modes(pipe)[-1] == "pruned"
    patch(pipe, 0.5)
    on_gpu = run(fam, pipe)
    pipe.to("cpu")
    close(run(fam, pipe), on_gpu.cpu(), dict(atol=1e-3, rtol=1e-3))
    assert state(pipe).cache.noise.device.type == "cpu"


# ---------------------------------------------------------------------- full_steps >= steps


@pytest.mark.parametrize("family", ALL)
def test_full_steps_not_below_the_steps_warns_and_stats_say_nothing_was_pruned(family):
    fam = FAMILIES[family]
    pipe = build(fam)
    dense = run(fam, pipe)
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=STEPS, backend="torch")
    with pytest.warns(RuntimeWarning, match=f"full_steps={STEPS} and this generation has {STEPS} denoising steps"):
        got = run(fam, pipe)
    assert torch.equal(got, dense)
    s = cat_pruning.stats(pipe)
    assert len(s.steps) == STEPS and "pruned" not in modes(pipe) and "0 pruned" in str(s)
    patch(pipe, 0.3)  # full_steps 2 < 3 steps: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(fam, pipe)
    assert modes(pipe)[-1] == "pruned"


# ---------------------------------------------------------------------- LoRA in every order


def lora_weights(fam: Fam, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A random LoRA (rank 2, both factors non-zero) on fam.lora_targets, as peft's state dict."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = fam.build().transformer
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=list(fam.lora_targets), init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="x")
    return {k: scale * v for k, v in get_peft_model_state_dict(model, adapter_name="x").items()}


def load_lora(fam: Fam, pipe, weights: dict[str, torch.Tensor], name: str) -> None:
    """What a user does: the pipeline's load_lora_weights, or peft's injection where the pipeline
    has no LoRA loader (PixArt, DiT)."""
    if fam.pipeline_lora:
        pipe.load_lora_weights({f"transformer.{k}": v for k, v in weights.items()}, adapter_name=name)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = LoraConfig(r=2, lora_alpha=2, target_modules=list(fam.lora_targets))
    inject_adapter_in_model(config, pipe.transformer, adapter_name=name)
    set_peft_model_state_dict(pipe.transformer, weights, adapter_name=name)


def unload_lora(fam: Fam, pipe) -> None:
    if fam.pipeline_lora:
        pipe.unload_lora_weights()
    else:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(pipe.transformer)


@pytest.mark.parametrize("family", ALL)
def test_lora_before_or_after_patch(family):
    """LoRA loaded before or after the patch (on the patch embedding, attention and the output layer,
    the seams CAT hooks): keep_ratio 1 equals the unpatched pipeline with the same LoRA, the two
    orders prune identically, and unloading gives the base pipeline back."""
    fam = FAMILIES[family]
    weights = lora_weights(fam, seed=5)
    base = build(fam)
    before = build(fam)
    load_lora(fam, before, weights, "a")
    want = run(fam, before)  # the unpatched pipeline with the LoRA
    patch(before, 1.0)
    close(run(fam, before), want)
    patch(before, 0.5)
    pruned = run(fam, before)

    after = build(fam)
    patch(after, 1.0)
    load_lora(fam, after, weights, "a")
    close(run(fam, after), want)
    assert modes(after)[-1] == "pruned"
    patch(after, 0.5)  # re-patching a LoRA model is the first order again; the next one is the second
    late = build(fam)
    patch(late, 0.5)
    load_lora(fam, late, weights, "a")
    assert torch.equal(run(fam, late), pruned)
    assert not torch.equal(pruned, want)
    unload_lora(fam, late)
    cat_pruning.patch(late, keep_ratio=1.0, full_steps=FULL, backend="torch")
    close(run(fam, late), run(fam, base))


@pytest.mark.parametrize("family", [n for n, f in FAMILIES.items() if f.pipeline_lora])
def test_lora_adapters_fuse_unfuse_unload_after_patch(family):
    """patch, then load two adapters, set_adapters with weights, fuse_lora, unfuse_lora,
    unload_lora_weights: at every state keep_ratio 1 equals the unpatched pipeline in that state."""
    fam = FAMILIES[family]
    one, two = lora_weights(fam, seed=5), lora_weights(fam, seed=6)
    pipe, twin = build(fam), build(fam)
    patch(pipe, 1.0)
    steps = [
        lambda p: (load_lora(fam, p, one, "one"), load_lora(fam, p, two, "two")),
        lambda p: p.set_adapters(["one", "two"], adapter_weights=[0.7, 0.4]),
        lambda p: p.fuse_lora(),
        lambda p: p.unfuse_lora(),
        lambda p: p.unload_lora_weights(),
    ]
    for step in steps:
        step(pipe), step(twin)
        close(run(fam, pipe), run(fam, twin))
        assert modes(pipe)[-1] == "pruned"
    patch(pipe, 0.5)
    load_lora(fam, pipe, one, "one")
    pipe.fuse_lora()
    assert torch.isfinite(run(fam, pipe)).all() and modes(pipe)[-1] == "pruned"


# ---------------------------------------------------------------------- attention processors and backends


def attention(pipe) -> dict:
    return pipe.transformer._cat_pruning.adapter.attention_modules(pipe.transformer)


@pytest.mark.parametrize("family", ALL)
def test_processors_replaced_after_patch_are_refused_at_the_next_call(family):
    """set_attn_processor (or fuse_qkv_projections) after the patch: the next call raises; unpatch
    then keeps the user's processors."""
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 0.5)
    run(fam, pipe)
    name, attn = next(iter(attention(pipe).items()))
    stock = type(attn.processor.original)
    attn.set_processor(stock())
    with pytest.raises(ValueError, match=f"processor of {name} was replaced after cat_pruning.patch"):
        run(fam, pipe)
    cat_pruning.unpatch(pipe)
    assert type(attn.processor) is stock
    assert torch.equal(run(fam, pipe), run(fam, twin))


def test_set_default_attn_processor_after_patch_becomes_the_fallback():
    """PixArt's set_default_attn_processor() after the patch (diffusers' test mixins call it): the
    plain processor is what the dense steps run and unpatch leaves, the cache processors stay; at
    keep_ratio 1 the pipeline equals the patched one without the call and the unpatched one with it."""
    from diffusers.models.attention_processor import AttnProcessor

    fam = FAMILIES["pixart"]
    pipe, twin, plain, dense = build(fam), build(fam), build(fam), build(fam)
    patch(pipe, 1.0), patch(twin, 1.0)
    # all three steps dense (before the anchor and fill steps): the unpatched computation
    cat_pruning.patch(dense, keep_ratio=0.5, full_steps=STEPS + 2, backend="torch")
    for p in (pipe, plain, dense):
        p.transformer.set_default_attn_processor()
    want = run(fam, plain)
    with pytest.warns(RuntimeWarning, match="no step is pruned"):
        assert torch.equal(run(fam, dense), want)
    assert modes(dense) == ["dense"] * STEPS
    got = run(fam, pipe)
    assert modes(pipe)[-1] == "pruned"
    # AttnProcessor and AttnProcessor2_0 (and the pruned steps, which run SDPA) round differently:
    # 2.5e-3 apart after the 3 steps on latents up to ~1500
    tol = dict(atol=5e-3, rtol=1e-4)
    close(got, run(fam, twin), tol)
    close(got, want, tol)
    for attn in attention(pipe).values():
        assert type(attn.processor).__module__.startswith("cat_pruning")
        assert type(attn.processor.original) is AttnProcessor
    patch(pipe, 0.5)
    assert torch.isfinite(run(fam, pipe)).all() and modes(pipe)[-1] == "pruned"
    cat_pruning.unpatch(pipe)
    assert all(type(p) is AttnProcessor for p in pipe.transformer.attn_processors.values())
    assert "set_default_attn_processor" not in vars(pipe.transformer)
    assert torch.equal(run(fam, pipe), want)


# Sana's fuse_qkv_projections fuses nothing in diffusers 0.42.1 (its attention is not an
# AttentionModuleMixin) and DiT has none.
@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_fuse_qkv_projections_after_patch_is_refused(family):
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 0.5)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"fuse_qkv_projections.*(unfuse them first|unfuse_qkv_projections\(\) first)"):
        run(fam, pipe)
    cat_pruning.unpatch(pipe)  # the user's fused processors stay: the pipeline runs as fused unpatched
    twin.transformer.fuse_qkv_projections()
    try:
        want = run(fam, twin)
    except AttributeError as err:  # diffusers 0.42.1: SD3.5's image-only attn2 fails with the fused processor
        with pytest.raises(AttributeError, match=str(err)):
            run(fam, pipe)
    else:
        assert torch.equal(run(fam, pipe), want)
    pipe.transformer.unfuse_qkv_projections()  # restores the stock processors, not CAT's
    assert not any(type(p).__module__.startswith("cat_pruning") for p in pipe.transformer.attn_processors.values())


@pytest.mark.parametrize("family", ALL)
def test_attention_backend_set_before_or_after_patch(family):
    """set_attention_backend before the patch, and another one after it, reach the processors CAT
    runs (Flux's dispatch); keep_ratio 1 equals the unpatched pipeline with the same backend."""
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    try:
        for p in (pipe, twin):
            p.transformer.set_attention_backend("_native_math")
        patch(pipe, 1.0)
        close(run(fam, pipe), run(fam, twin))
        for p in (pipe, twin):
            p.transformer.set_attention_backend("native")
        close(run(fam, pipe), run(fam, twin))
        assert modes(pipe)[-1] == "pruned"
        for attn in attention(pipe).values():
            stock = attn.processor.original
            assert getattr(stock, "_attention_backend", "native") == "native"
    finally:
        twin.transformer.set_attention_backend("native")  # diffusers also sets a process-wide default


# ---------------------------------------------------------------------- offloading


@pytest.mark.parametrize("family", ALL)
def test_model_cpu_offload_before_and_after_patch(family):
    fam = FAMILIES[family]
    twin, before, after = build(fam), build(fam), build(fam)
    twin.enable_model_cpu_offload(device="cpu")
    want = run(fam, twin)
    before.enable_model_cpu_offload(device="cpu")
    patch(before, 1.0)
    patch(after, 1.0)
    after.enable_model_cpu_offload(device="cpu")
    for pipe in (before, after):
        close(run(fam, pipe), want)
        assert modes(pipe)[-1] == "pruned"
    patch(after, 0.5)
    assert torch.isfinite(run(fam, after)).all() and modes(after)[-1] == "pruned"


@pytest.mark.parametrize("family", ALL)
def test_sequential_cpu_offload_before_and_after_patch(family):
    fam = FAMILIES[family]
    twin, before, after = build(fam), build(fam), build(fam)
    twin.enable_sequential_cpu_offload(device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        want = run(fam, twin)
    except TypeError as err:  # accelerate 1.15 with torch 2.14 fails moving parameters back to meta, unpatched too
        pytest.skip(f"sequential offload fails on the unpatched pipeline here: {err}")
    before.enable_sequential_cpu_offload(device=twin._offload_device)
    patch(before, 1.0)
    patch(after, 1.0)
    after.enable_sequential_cpu_offload(device=twin._offload_device)
    for pipe in (before, after):
        close(run(fam, pipe).cpu(), want.cpu())
        assert modes(pipe)[-1] == "pruned"


# ---------------------------------------------------------------------- what a pipeline call can ask for


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart", "sana"])
def test_num_images_per_prompt_with_cfg_and_latent_output(family):
    """Two images per prompt: the batch is [uncond x2; cond x2] (Flux: no CFG batch), pairs share a
    selection; decoded images (output_type="pt") equal the unpatched ones too."""
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    patch(pipe, 1.0)
    close(run(fam, pipe, images=2), run(fam, twin, images=2))
    close(run(fam, pipe, output_type="pt"), run(fam, twin, output_type="pt"))
    patch(pipe, 0.5)
    images = run(fam, pipe, images=2)
    assert images.shape[0] == 2 and modes(pipe)[-1] == "pruned"
    st, s = state(pipe), cat_pruning.stats(pipe)
    assert s.batch == (4 if fam.cfg else 2) and st.cfg_pairs == fam.cfg
    if fam.cfg:
        assert torch.equal(st.idx[:2], st.idx[2:])
    assert run(fam, pipe, output_type="pt").shape[1] == 3 and modes(pipe)[-1] == "pruned"


def _edit_latents(pipe, i, t, kw):
    return {"latents": kw["latents"] * 0.9}


def _raise_at_step_1(pipe, i, t, kw):
    if i == 1:
        raise KeyboardInterrupt("stop")
    return {}


def _interrupt_at_step_1(pipe, i, t, kw):
    pipe._interrupt = i >= 0  # diffusers' pipe.interrupt: the remaining steps are skipped
    return {}


@pytest.mark.parametrize("family", ALL)
def test_callbacks_interrupts_and_exceptions_leave_no_state(family):
    """A callback that edits the latents (keep_ratio 1 equals unpatched with the same callback); a
    generation stopped by an exception in a callback, or by pipe.interrupt, then a normal one: the
    normal one equals a fresh run bitwise."""
    fam = FAMILIES[family]
    pipe, twin = build(fam), build(fam)
    if fam.callbacks:
        patch(pipe, 1.0)
        close(run(fam, pipe, callback_on_step_end=_edit_latents), run(fam, twin, callback_on_step_end=_edit_latents))
        assert modes(pipe)[-1] == "pruned"
    elif family == "pixart":  # the older callback(step, t, latents) may edit the latents in place
        patch(pipe, 1.0)

        def scale(i, t, latents):
            latents.mul_(0.9)

        close(run(fam, pipe, callback=scale), run(fam, twin, callback=scale))
    patch(pipe, 0.5)
    fresh = run(fam, pipe)
    if fam.callbacks:
        stoppers = [dict(callback_on_step_end=_raise_at_step_1), dict(callback_on_step_end=_interrupt_at_step_1)]
    elif family == "pixart":
        def stop(i, t, latents):
            raise KeyboardInterrupt("stop")

        stoppers = [dict(callback=stop)]
    else:  # DiTPipeline has no callbacks: stop it from inside the transformer's second step
        calls = []

        def stop(module, args, kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("stop")

        handle = pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        stoppers = [dict()]
    for extra in stoppers:
        try:
            run(fam, pipe, **extra)
        except KeyboardInterrupt:
            pass
        else:
            assert extra["callback_on_step_end"] is _interrupt_at_step_1
            assert len(cat_pruning.stats(pipe).steps) == 1
        pipe._interrupt = False
        if family == "dit":
            handle.remove()
        assert torch.equal(run(fam, pipe), fresh)


# ---------------------------------------------------------------------- shared transformers and schedulers


@pytest.mark.parametrize("family", ALL)
def test_from_pipe_and_a_new_scheduler_share_the_patch(family):
    """DiffusionPipeline.from_pipe shares the patched transformer (and its scheduler, or a new one):
    each call reads its own pipeline's guidance and counts its own steps; replacing pipe.scheduler
    after the patch also works."""
    fam = FAMILIES[family]
    pipe = build(fam)
    patch(pipe, 0.5)
    want = run(fam, pipe)
    run(fam, pipe, guidance=1.0)  # leaves pipe without CFG
    shared = type(pipe).from_pipe(pipe)
    assert shared.transformer is pipe.transformer and shared.scheduler is pipe.scheduler
    shared.set_progress_bar_config(disable=True)
    assert torch.equal(run(fam, shared), want)
    assert state(pipe).cfg_pairs == fam.cfg and modes(pipe)[-1] == "pruned"
    own = type(pipe).from_pipe(pipe, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    own.set_progress_bar_config(disable=True)
    assert torch.equal(run(fam, own), want) and modes(pipe)[-1] == "pruned"
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    assert torch.equal(run(fam, pipe), want) and modes(pipe)[-1] == "pruned"
    cat_pruning.unpatch(pipe)
    for p in (pipe, shared, own):
        assert not {"step", "set_timesteps"} & set(vars(p.scheduler))

