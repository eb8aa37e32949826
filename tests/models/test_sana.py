"""cat_pruning on tiny random-config Sana transformers against the dense diffusers path."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import TOL, Family
from sana_models import CAPTION_DIM, LATENT_CHANNELS, TEXT_TOKENS, inputs, run_steps, tiny_sana

import cat_pruning

STEPS = 6
FULL = 3
SANA = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(SANA, tiny_sana(dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(SANA, tiny_sana(), inputs(seed=5), patch_kw=store)


class OracleLinearAttn:
    """Dense linear attention, sum_j (phi(q).phi(k_j)) v_j / sum_j phi(q).phi(k_j) with phi = ReLU,
    in which the K/V rows of unselected tokens come from a given cache (written with einsum,
    independently of cat_pruning's processor)."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, :, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        k = torch.where(self.selected, k, self.k_cache)
        v = torch.where(self.selected, v, self.v_cache)
        q, k, v = (t.view(b, n, attn.heads, -1).float() for t in (q, k, v))
        q, k = F.relu(q), F.relu(k)
        num = torch.einsum("bnhd,bmhd,bmhe->bnhe", q, k, v)
        den = torch.einsum("bnhd,bmhd->bnh", q, k)[..., None]
        out = (num / (den + 1e-15)).reshape(b, n, -1).to(hidden_states.dtype)
        return attn.to_out[0](out)


def oracle_conv_hook(cache, selected):
    """Depthwise conv input rows of unselected tokens replaced by the cached rows."""

    def hook(module, args):
        x = args[0]
        mixed = torch.where(selected[:, None, :], x.flatten(2), cache.transpose(1, 2))  # cache: (B, N, C)
        return (mixed.view_as(x),)

    return hook


@pytest.mark.parametrize("cfg_pairs", [False, True])
@pytest.mark.parametrize("store", harness.LINEAR_STORES.values(), ids=harness.LINEAR_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(cfg_pairs, store):
    kw = inputs(batch=4, seed=2)
    hh, w = kw["hidden_states"].shape[-2:]
    # Patch size 1: token rows are the output's pixels; one step past the horizon (timestep 0).
    # The batch halves share a selection exactly when cfg_pairs.
    harness.check_pruned_steps_match_oracle(SANA, tiny_sana(), kw, OracleLinearAttn,
                                            lambda o: o.flatten(2).transpose(1, 2), hh * w, cfg_pairs=cfg_pairs,
                                            unpaired_differ=True, extra_steps=1, conv_hook=oracle_conv_hook,
                                            patch_kw=store)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    def no_hooks_left(model):
        for block in model.transformer_blocks:
            assert not block._forward_pre_hooks and not block.ff.conv_depth._forward_pre_hooks
            assert not block.ff.conv_depth._forward_hooks
            assert not type(block.attn1.processor).__module__.startswith("cat_pruning")

    harness.check_unpatch_bitwise(SANA, tiny_sana(), inputs(seed=3), after_unpatch=no_hooks_left)


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    # [uncond x3; cond x3]
    harness.check_samples_independent(SANA, tiny_sana(layers=1), inputs(batch=6, seed=8), cfg_pairs=True)


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(SANA, tiny_sana(), inputs(batch=2, height=8, width=7, seed=10), 17)


def test_meta_device():
    harness.check_meta_device(SANA, tiny_sana, inputs(device="meta"))


def test_real_config_macs_on_meta():
    from diffusers import SanaTransformer2DModel

    from cat_pruning.adapters import sana

    harness.check_real_config_macs_on_meta(SANA, SanaTransformer2DModel, sana, "sana-1600m-1024", num_tokens=1024,
                                           tokens_kept=308, cfg_pairs=True)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(SANA, tiny_sana(layers=1), inputs(seed=11), patch_kw=store)


def tiny_pipeline():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline

    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=2,
        # four levels: 8x downsampling, so the pipeline's 32-pixel multiples give a small latent
        encoder_block_types=("ResBlock",) * 4, decoder_block_types=("ResBlock",) * 4,
        encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4,
        encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
        upsample_block_type="interpolate", downsample_block_type="stride_conv", scaling_factor=0.5,
    ).eval()
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tiny_sana(),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def pipeline_kwargs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.ones(batch, TEXT_TOKENS)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, CAPTION_DIM, generator=g), prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(batch, TEXT_TOKENS, CAPTION_DIM, generator=g),
        negative_prompt=None, negative_prompt_attention_mask=mask, height=64, width=32, num_inference_steps=6,
        guidance_scale=4.5,
        use_resolution_binning=False, output_type="pt", generator=torch.Generator().manual_seed(seed),
    )


def test_pipeline_patch_runs_twice_and_keep_ratio_one_equals_dense():
    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert "pruned" in [st.mode for st in s.steps] and s.batch == 4 and s.num_tokens == 32
        state = pipe.transformer._cat_pruning.state
        assert state.cfg_pairs and torch.equal(state.idx[:2], state.idx[2:])

    harness.check_pipeline(SANA, tiny_pipeline(), lambda pipe: pipe(**pipeline_kwargs()).images, check_pruned)


def test_unsupported_cases_are_refused():
    model = tiny_sana(layers=1)
    cat_pruning.patch(model, backend="torch")
    with pytest.raises(ValueError, match="ControlNet"):
        model(**inputs(), timestep=torch.ones(2), controlnet_block_samples=(torch.ones(1),))
    cat_pruning.unpatch(model)
    with pytest.raises(ValueError, match="fused_attention=True fuses softmax attention"):
        cat_pruning.patch(model, fused_attention=True)  # linear attention: nothing to fuse
    assert not cat_pruning.is_patched(model)
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())  # softmax self attention
    with pytest.raises(ValueError, match="linear self attention"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)
