"""cat_pruning on tiny random-config DiT transformers (learned sigma) against the dense
diffusers path, and on a DiTPipeline assembled from tiny components ([cond; null] CFG batch)."""

from __future__ import annotations

import harness
import pytest
import torch
from dit_models import IN_CHANNELS, OUT_CHANNELS, inputs, run_steps, tiny_dit
from harness import TOL, Family, tokens_of
from selfattn_oracle import SelfAttnOracle

import cat_pruning

STEPS = 7
FULL = 3
DIT = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(DIT, tiny_dit(dtype=dtype), inputs(dtype=dtype), TOL[dtype],)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(DIT, tiny_dit(), inputs(seed=5), patch_kw=store)


@pytest.mark.parametrize("cfg_pairs", [False, True])
@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(cfg_pairs, store):
    kw = inputs(batch=4, seed=2, cfg=cfg_pairs)
    n = kw["hidden_states"].shape[-1] // 2
    # Unselected tokens return their last computed output, learned-sigma channels included.
    harness.check_pruned_steps_match_oracle(DIT, tiny_dit(), kw, SelfAttnOracle, lambda o: tokens_of(o, n, n), n * n,
                                            cfg_pairs=cfg_pairs, noise_width=4 * 2 * IN_CHANNELS, patch_kw=store)


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
    cat_pruning.reset(model)  # a new generation of the bare loop
    run_steps(model, {k: v[2:] for k, v in kw.items()}, STEPS)
    assert not torch.equal(model._cat_pruning.state.idx, idx[:2])  # the null half would choose otherwise


def test_unpatch_is_bitwise():
    harness.check_unpatch_bitwise(DIT, tiny_dit(), inputs(seed=3), patch_twice=False)


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(DIT, tiny_dit(), inputs(batch=2, side=16, seed=10), 20)


def test_hidden_cache_macs_match_flop_counter():  # DiT's output projection is proj_out_2
    harness.check_hidden_cache_macs(DIT, tiny_dit, inputs(batch=2, side=16, seed=10))


def test_meta_device():
    harness.check_meta_device(DIT, tiny_dit, inputs(device="meta"), out_shape=(2, OUT_CHANNELS, 10, 10))


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(DIT, tiny_dit(), inputs(seed=11), patch_kw=store)


# ---------------------------------------------------------------------- the pipeline path


def tiny_pipeline():
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    vae = harness.tiny_vae(IN_CHANNELS, block_out_channels=(8,), norm_num_groups=4, sample_size=8)
    return DiTPipeline(transformer=tiny_dit(sample_size=10), vae=vae, scheduler=DPMSolverMultistepScheduler())


def pipeline_call(pipe, guidance_scale=4.0, steps=7):
    images = pipe(class_labels=[3, 7], guidance_scale=guidance_scale, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(4), output_type="pt").images
    return torch.as_tensor(images)  # diffusers 0.36's DiTPipeline returns numpy even for "pt"


def test_pipeline_patch_repeatable_and_keep_ratio_one_is_dense():
    def check_pruned(pipe):
        state = pipe.transformer._cat_pruning.state
        s = cat_pruning.stats(pipe)
        assert s.batch == 4 and s.steps[-1].mode == "pruned" and s.steps[-1].tokens == 8
        # CFG read from the pipeline call's guidance_scale; [cond x2; null x2] pairs share a selection.
        assert state.cfg_pairs and state.cond_first and torch.equal(state.idx[:2], state.idx[2:])
        pipeline_call(pipe, guidance_scale=1.0)
        assert not state.cfg_pairs and cat_pruning.stats(pipe).batch == 2

    harness.check_pipeline(DIT, tiny_pipeline(), pipeline_call, check_pruned)
