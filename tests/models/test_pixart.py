"""cat_pruning on tiny random-config PixArt-Sigma / PixArt-alpha transformers against the dense
diffusers path, and on a PixArtSigmaPipeline assembled from tiny components."""

from __future__ import annotations

import copy

import pytest
import torch
from pixart_models import CAPTION_DIM, IN_CHANNELS, TEXT_TOKENS, inputs, run_steps, tiny_pixart
from selfattn_oracle import SelfAttnOracle, tokens_of

import cat_pruning

# One tolerance table per dtype. The patched model runs the same operations as the unpatched
# one, but attention over compacted queries and the cached keys may change the summation
# order inside GEMMs: allow a few ulps of the output scale (|out| ~ 5 here).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
}
VARIANTS = ["sigma", "alpha"]
STEPS = 7
FULL = 3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_equals_dense(variant, dtype):
    model = tiny_pixart(variant, dtype=dtype)
    kw = inputs(variant, dtype=dtype)
    dense = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, STEPS)
    assert [s.mode for s in cat_pruning.stats(model).steps][-1] == "pruned"
    for a, b in zip(dense, patched, strict=True):
        torch.testing.assert_close(b, a, **TOL[dtype])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_steps_equal_unpatched(variant):
    model = tiny_pixart(variant)
    kw = inputs(variant, seed=5)
    dense = run_steps(model, kw, FULL)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, FULL)
    for a, b in zip(dense, patched, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cfg_pairs", [False, True])
def test_pruned_steps_match_masked_dense_oracle(variant, cfg_pairs):
    model = tiny_pixart(variant)
    oracle = copy.deepcopy(model)
    kw = inputs(variant, batch=4, seed=2)
    h, w = kw["hidden_states"].shape[-2] // 2, kw["hidden_states"].shape[-1] // 2
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=cfg_pairs)
    state = model._cat_pruning.state
    x = kw["hidden_states"]
    checked = 0
    for i in range(STEPS):
        t = torch.full((x.shape[0],), 1000.0 * (1 - i / STEPS))
        args = {**kw, "hidden_states": x, "timestep": t, "return_dict": False}
        pruned = state.mode == "pruned"
        if pruned:
            idx = state.idx.clone()
            selected = torch.zeros(x.shape[0], h * w, dtype=torch.bool).scatter_(1, idx, True)
            kv = {name: (kc.clone(), vc.clone()) for name, (kc, vc) in state.kv.items()}
            noise_before = state.noise_cache.clone()
        with torch.no_grad():
            out = model(**args)[0]
        if pruned:
            # Only the self attentions are cached; the cross attentions keep their processors.
            for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
                attn.set_processor(SelfAttnOracle(*kv[name], selected))
            with torch.no_grad():
                want = oracle(**args)[0]
            got_rows, want_rows = tokens_of(out, h, w), tokens_of(want, h, w)
            torch.testing.assert_close(got_rows[selected], want_rows[selected], **TOL[torch.float32])
            # Unselected tokens return their last computed noise (all 8 channels, learned sigma too).
            assert torch.equal(got_rows[~selected], noise_before[~selected])
            if cfg_pairs:
                assert torch.equal(idx[:2], idx[2:])
            checked += 1
        x = x - 0.1 * out[:, :IN_CHANNELS]
    assert checked == STEPS - FULL


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    model = tiny_pixart("alpha")
    kw = inputs("alpha", seed=3)
    before = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    once = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.9, full_steps=4, backend="torch")
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    twice = run_steps(model, kw, STEPS)
    for a, b in zip(once, twice, strict=True):
        assert torch.equal(a, b)
    cat_pruning.unpatch(model)
    after = run_steps(model, kw, STEPS)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert not any(type(proc).__module__.startswith("cat_pruning") for proc in processors)


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    model = tiny_pixart("sigma")
    kw = inputs("sigma", batch=6, seed=8)  # [uncond x3; cond x3]
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=True)
    out = run_steps(model, kw, STEPS)
    idx = model._cat_pruning.state.idx.clone()
    assert torch.equal(idx[:3], idx[3:])
    both = torch.cat([torch.tensor([2, 0, 1]), torch.tensor([2, 0, 1]) + 3])

    def permute(v):
        if isinstance(v, dict):
            return {k: permute(x) for k, x in v.items()}
        return v if v is None else v[both]

    cat_pruning.reset(model)
    permuted = run_steps(model, permute(kw), STEPS)
    assert torch.equal(model._cat_pruning.state.idx, idx[both])
    for a, b in zip(out, permuted, strict=True):
        torch.testing.assert_close(b, a[both], **TOL[torch.float32])


@pytest.mark.parametrize("variant", VARIANTS)
def test_stats_macs_match_flop_counter(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_pixart(variant)
    kw = inputs(variant, batch=2, height=16, width=16, seed=10)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls the counter sees (CPU flash attention is not counted).
    with counter, sdpa_kernel(SDPBackend.MATH):
        run_steps(model, kw, STEPS)
    s = cat_pruning.stats(model)
    assert [st.mode for st in s.steps] == ["dense", "anchor", "fill"] + ["pruned"] * (STEPS - FULL)
    assert s.steps[-1].tokens == s.tokens_kept == 20
    measured = counter.get_total_flops() / 2
    assert abs(s.macs - measured) / measured < 0.02, (s.macs, measured)
    assert 0.3 < s.mac_fraction < 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device(variant):
    with torch.device("meta"):
        model = tiny_pixart(variant)
    kw = inputs(variant, device="meta")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL)
    outs = run_steps(model, kw, STEPS)
    assert outs[-1].shape == (2, 8, 12, 10) and outs[-1].device.type == "meta"
    assert cat_pruning.stats(model).steps[-1].mode == "pruned"


def test_torch_compile_fullgraph_matches_eager_with_few_graphs():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_pixart("alpha")
    kw = inputs("alpha", seed=11)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    eager = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", manual_steps=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    counters.clear()
    outs = []
    for _ in range(2):
        cat_pruning.reset(model)
        outs.append(run_steps(compiled, kw, STEPS, step_fn=lambda: cat_pruning.advance(model)))
    for gen in outs:
        for a, b in zip(eager, gen, strict=True):
            torch.testing.assert_close(b, a, **TOL[torch.float32])
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 6, graphs
    torch._dynamo.reset()


def test_unsupported_inputs_and_models_are_refused():
    model = tiny_pixart("sigma", layers=1)
    cat_pruning.patch(model, backend="torch")
    kw = inputs("sigma")
    with pytest.raises(ValueError, match="attention_mask"):
        model(**kw, timestep=torch.ones(2), attention_mask=torch.ones(2, 30))
    cat_pruning.unpatch(model)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)


# ---------------------------------------------------------------------- the pipeline path


def tiny_pipeline():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=IN_CHANNELS, norm_num_groups=4, sample_size=8,
    ).eval()
    # No text encoder: the prompt embeddings are passed directly.
    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny_pixart("sigma"),
                               scheduler=DPMSolverMultistepScheduler())


def pipeline_call(pipe, guidance_scale=4.5, steps=7):
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1.0] * 4 + [0.0] * (TEXT_TOKENS - 4)])
    return pipe(
        prompt_embeds=torch.randn(1, TEXT_TOKENS, CAPTION_DIM, generator=g), prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(1, TEXT_TOKENS, CAPTION_DIM, generator=g),
        negative_prompt=None, negative_prompt_attention_mask=mask, height=16, width=24, num_inference_steps=steps,
        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(4), use_resolution_binning=False,
        output_type="pt",
    ).images


def test_pipeline_patch_repeatable_and_keep_ratio_one_is_dense():
    pipe = tiny_pipeline()
    dense = pipeline_call(pipe)
    cat_pruning.patch(pipe, keep_ratio=1.0, full_steps=FULL, backend="torch")
    torch.testing.assert_close(pipeline_call(pipe), dense, **TOL[torch.float32])
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=FULL, backend="torch")
    first, second = pipeline_call(pipe), pipeline_call(pipe)
    assert torch.equal(first, second)
    s = cat_pruning.stats(pipe)
    assert s.batch == 2 and s.steps[-1].mode == "pruned" and s.steps[-1].tokens == 29
    state = pipe.transformer._cat_pruning.state
    assert state.cfg_pairs and torch.equal(state.idx[0], state.idx[1])  # from the pipeline's CFG local
    pipeline_call(pipe, guidance_scale=1.0)
    assert not state.cfg_pairs and cat_pruning.stats(pipe).batch == 1
    cat_pruning.unpatch(pipe)
    assert torch.equal(pipeline_call(pipe), dense)
