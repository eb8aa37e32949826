"""cat_pruning on tiny random-config PixArt-Sigma / PixArt-alpha transformers against the dense
diffusers path, and on a PixArtSigmaPipeline assembled from tiny components."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import TOL, Family, tokens_of
from pixart_models import CAPTION_DIM, IN_CHANNELS, OUT_CHANNELS, TEXT_TOKENS, inputs, run_steps, tiny_pixart
from selfattn_oracle import SelfAttnOracle

import cat_pruning

VARIANTS = ["sigma", "alpha"]
STEPS = 7
FULL = 3
PIXART = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(variant, dtype, store):
    harness.check_keep_ratio_one_equals_dense(PIXART, tiny_pixart(variant, dtype=dtype), inputs(variant, dtype=dtype),
                                              TOL[dtype], patch_kw=store)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(variant, store):
    harness.check_dense_steps_equal_unpatched(PIXART, tiny_pixart(variant), inputs(variant, seed=5), patch_kw=store)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cfg_pairs", [False, True])
@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(variant, cfg_pairs, store):
    kw = inputs(variant, batch=4, seed=2)
    hh, w = kw["hidden_states"].shape[-2] // 2, kw["hidden_states"].shape[-1] // 2
    # Only the self attentions are cached; the cross attentions keep their processors. Unselected
    # tokens return their last computed noise (all 8 channels, learned sigma too).
    harness.check_pruned_steps_match_oracle(PIXART, tiny_pixart(variant), kw, SelfAttnOracle,
                                            lambda o: tokens_of(o, hh, w), hh * w, cfg_pairs=cfg_pairs, patch_kw=store)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    harness.check_unpatch_bitwise(PIXART, tiny_pixart("alpha"), inputs("alpha", seed=3),
                                  detour=dict(keep_ratio=0.9, full_steps=4))


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    # [uncond x3; cond x3]
    harness.check_samples_independent(PIXART, tiny_pixart("sigma"), inputs("sigma", batch=6, seed=8), cfg_pairs=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stats_macs_match_flop_counter(variant):
    kw = inputs(variant, batch=2, height=16, width=16, seed=10)
    harness.check_macs_match_flop_counter(PIXART, tiny_pixart(variant), kw, 20)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device(variant):
    harness.check_meta_device(PIXART, lambda: tiny_pixart(variant), inputs(variant, device="meta"),
                              out_shape=(2, OUT_CHANNELS, 12, 10))


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(PIXART, tiny_pixart("alpha"), inputs("alpha", seed=11), patch_kw=store)


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
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    torch.manual_seed(0)
    vae = harness.tiny_vae(IN_CHANNELS, block_out_channels=(8,), norm_num_groups=4, sample_size=8)
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
    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.batch == 2 and s.steps[-1].mode == "pruned" and s.steps[-1].tokens == 29
        state = pipe.transformer._cat_pruning.state
        assert state.cfg_pairs and torch.equal(state.idx[0], state.idx[1])  # from the pipeline's CFG local
        pipeline_call(pipe, guidance_scale=1.0)
        assert not state.cfg_pairs and cat_pruning.stats(pipe).batch == 1

    harness.check_pipeline(PIXART, tiny_pipeline(), pipeline_call, check_pruned)
