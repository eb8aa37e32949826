"""cat_pruning on tiny random-config DiT transformers (learned sigma) against the dense
diffusers path, and on a DiTPipeline assembled from tiny components ([cond; null] CFG batch)."""

from __future__ import annotations

import copy

import pytest
import torch
from dit_models import IN_CHANNELS, inputs, run_steps, tiny_dit
from selfattn_oracle import SelfAttnOracle, tokens_of

import cat_pruning

# One tolerance table per dtype; see test_sd3.py for the reasoning (a few ulps of |out| ~ 5).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
}
STEPS = 7
FULL = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_equals_dense(dtype):
    model = tiny_dit(dtype=dtype)
    kw = inputs(dtype=dtype)
    dense = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, STEPS)
    assert [s.mode for s in cat_pruning.stats(model).steps][-1] == "pruned"
    for a, b in zip(dense, patched, strict=True):
        torch.testing.assert_close(b, a, **TOL[dtype])


def test_dense_steps_equal_unpatched():
    model = tiny_dit()
    kw = inputs(seed=5)
    dense = run_steps(model, kw, FULL)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, FULL)
    for a, b in zip(dense, patched, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg_pairs", [False, True])
def test_pruned_steps_match_masked_dense_oracle(cfg_pairs):
    model = tiny_dit()
    oracle = copy.deepcopy(model)
    kw = inputs(batch=4, seed=2, cfg=cfg_pairs)
    n = kw["hidden_states"].shape[-1] // 2
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
            selected = torch.zeros(x.shape[0], n * n, dtype=torch.bool).scatter_(1, idx, True)
            kv = {name: (kc.clone(), vc.clone()) for name, (kc, vc) in state.kv.items()}
            noise_before = state.noise_cache.clone()
        with torch.no_grad():
            out = model(**args)[0]
        if pruned:
            for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
                attn.set_processor(SelfAttnOracle(*kv[name], selected))
            with torch.no_grad():
                want = oracle(**args)[0]
            got_rows, want_rows = tokens_of(out, n, n), tokens_of(want, n, n)
            torch.testing.assert_close(got_rows[selected], want_rows[selected], **TOL[torch.float32])
            # Unselected tokens return their last computed output, learned-sigma channels included.
            assert noise_before.shape[-1] == 4 * 2 * IN_CHANNELS
            assert torch.equal(got_rows[~selected], noise_before[~selected])
            if cfg_pairs:
                assert torch.equal(idx[:2], idx[2:])
            checked += 1
        x = x - 0.1 * out[:, :IN_CHANNELS]
    assert checked == STEPS - FULL


def test_cfg_pairs_are_scored_on_the_cond_half_first():
    """DiTPipeline's batch is [cond; null class]: the shared selection is the one the cond
    samples alone would get (samples never mix, so the null half cannot change it)."""
    model = tiny_dit()
    kw = inputs(batch=4, seed=8, cfg=True)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=True)
    run_steps(model, kw, STEPS)
    idx = model._cat_pruning.state.idx.clone()
    assert torch.equal(idx[:2], idx[2:])
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=False)
    run_steps(model, {k: v[:2] for k, v in kw.items()}, STEPS)
    assert torch.equal(model._cat_pruning.state.idx, idx[:2])
    run_steps(model, {k: v[2:] for k, v in kw.items()}, STEPS)
    assert not torch.equal(model._cat_pruning.state.idx, idx[:2])  # the null half would choose otherwise


def test_unpatch_is_bitwise():
    model = tiny_dit()
    kw = inputs(seed=3)
    before = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    run_steps(model, kw, STEPS)
    cat_pruning.unpatch(model)
    after = run_steps(model, kw, STEPS)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert not any(type(proc).__module__.startswith("cat_pruning") for proc in processors)


def test_stats_macs_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_dit()
    kw = inputs(batch=2, side=16, seed=10)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees
        run_steps(model, kw, STEPS)
    s = cat_pruning.stats(model)
    assert s.steps[-1].tokens == s.tokens_kept == 20
    measured = counter.get_total_flops() / 2
    assert abs(s.macs - measured) / measured < 0.02, (s.macs, measured)
    assert 0.3 < s.mac_fraction < 1.0


def test_meta_device():
    with torch.device("meta"):
        model = tiny_dit()
    kw = inputs(device="meta")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL)
    outs = run_steps(model, kw, STEPS)
    assert outs[-1].shape == (2, 8, 10, 10) and outs[-1].device.type == "meta"
    assert cat_pruning.stats(model).steps[-1].mode == "pruned"


def test_torch_compile_fullgraph_matches_eager_with_few_graphs():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_dit()
    kw = inputs(seed=11)
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


# ---------------------------------------------------------------------- the pipeline path


def tiny_pipeline():
    from diffusers import AutoencoderKL, DiTPipeline, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=IN_CHANNELS, norm_num_groups=4, sample_size=8,
    ).eval()
    return DiTPipeline(transformer=tiny_dit(sample_size=10), vae=vae, scheduler=DPMSolverMultistepScheduler())


def pipeline_call(pipe, guidance_scale=4.0, steps=7):
    return pipe(class_labels=[3, 7], guidance_scale=guidance_scale, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(4), output_type="pt").images


def test_pipeline_patch_repeatable_and_keep_ratio_one_is_dense():
    pipe = tiny_pipeline()
    dense = pipeline_call(pipe)
    cat_pruning.patch(pipe, keep_ratio=1.0, full_steps=FULL, backend="torch")
    torch.testing.assert_close(pipeline_call(pipe), dense, **TOL[torch.float32])
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=FULL, backend="torch")
    first, second = pipeline_call(pipe), pipeline_call(pipe)
    assert torch.equal(first, second)
    state = pipe.transformer._cat_pruning.state
    s = cat_pruning.stats(pipe)
    assert s.batch == 4 and s.steps[-1].mode == "pruned" and s.steps[-1].tokens == 8
    # CFG read from the pipeline call's guidance_scale; [cond x2; null x2] pairs share a selection.
    assert state.cfg_pairs and state.cond_first and torch.equal(state.idx[:2], state.idx[2:])
    pipeline_call(pipe, guidance_scale=1.0)
    assert not state.cfg_pairs and cat_pruning.stats(pipe).batch == 2
    cat_pruning.unpatch(pipe)
    assert torch.equal(pipeline_call(pipe), dense)
