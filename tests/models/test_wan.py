"""cat_pruning on tiny random-config Wan video transformers against the dense diffusers path."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import TOL, Family
from wan_models import IN_CHANNELS, TEXT_DIM, TEXT_TOKENS, inputs, run_steps, tiny_wan, tokens

import cat_pruning

STEPS = 6
FULL = 3
WAN = Family(run_steps, STEPS, FULL)
N = 3 * 4 * 5  # the default inputs' tokens: 3 frames of 4 x 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(WAN, tiny_wan(dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(WAN, tiny_wan(), inputs(seed=5), patch_kw=store)


def rotated(x, cos, sin):
    """x (B, L, H, D) times the complex rotation of each channel pair (2i, 2i+1), in float64: the
    rotation Wan's tables (1, L, 1, D) describe, written independently of both processors."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.complex(cos[..., 0::2].double(), sin[..., 1::2].double())
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


class OracleProcessor:
    """Dense Wan self attention in which the K (after rotation) / V rows of unselected tokens come
    from a given cache: the masked-dense oracle of docs/design.md section 3."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, :, None, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert encoder_hidden_states is None and attention_mask is None

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k = heads(attn.norm_q(attn.to_q(hidden_states))), heads(attn.norm_k(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        q, k = rotated(q, *rotary_emb), rotated(k, *rotary_emb)
        b, n = self.selected.shape[:2]
        k = torch.where(self.selected, k, self.k_cache.view(b, n, attn.heads, -1))
        v = torch.where(self.selected, v, self.v_cache.view(b, n, attn.heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(store):
    kw = inputs(batch=3, seed=2)

    def own_selections(idx):  # no CFG batch: every sample has its own selection
        assert not (torch.equal(idx[0], idx[1]) and torch.equal(idx[1], idx[2]))

    harness.check_pruned_steps_match_oracle(WAN, tiny_wan(), kw, OracleProcessor, tokens, N, extra_steps=1,
                                            check_idx=own_selections, patch_kw=store)


def run_per_token(model, kw, steps, step_fn=None, *, horizon=None, first_frame=0.0):
    """The toy loop with Wan 2.2 TI2V's per-token timestep (B, N): the first frame's tokens at
    `first_frame` times the step's timestep (WanPipeline's expand_timesteps, an image-conditioned
    first frame at 0), the others at the step's."""
    x = kw["hidden_states"]
    b, _, frames, hh, ww = x.shape
    per_frame = (hh // 2) * (ww // 2)
    scale = torch.ones(frames * per_frame)
    scale[:per_frame] = first_frame
    outs = []
    for i in range(steps):
        t = 1000.0 * (1 - i / (horizon or steps)) * scale.expand(b, -1)
        with torch.no_grad():
            out = model(**{**kw, "hidden_states": x}, timestep=t, return_dict=False)[0]
        outs.append(out)
        if step_fn is not None:
            step_fn()
        x = x - 0.1 * out
    return outs


TI2V = Family(run_per_token, STEPS, FULL)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_per_token_timestep_keep_ratio_one_equals_dense(store):
    harness.check_keep_ratio_one_equals_dense(TI2V, tiny_wan(), inputs(seed=3), TOL[torch.float32], patch_kw=store)


def test_per_token_timestep_pruned_steps_match_masked_dense_oracle():
    """Wan 2.2 TI2V: the time embedding, modulation and output shift/scale of each computed token
    come from its own timestep (the selected tokens' rows of the (B, N) timestep)."""
    kw = inputs(batch=2, seed=4)
    model = tiny_wan()
    seen = []
    model.condition_embedder.register_forward_hook(lambda m, a, out: seen.append(out[0].shape[1]))
    harness.check_pruned_steps_match_oracle(TI2V, model, kw, OracleProcessor, tokens, N, extra_steps=1,
                                            patch_kw=harness.NOISE)
    kept = cat_pruning.stats(model).tokens_kept
    assert kept < N and kept in seen and N in seen  # the time embedding ran on the K tokens' timesteps


def test_clustering_sees_frame_row_col():
    """The clustering and the regions selection get each token's (frame, row, col)."""
    model = tiny_wan()
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    run_steps(model, inputs(seed=6), FULL + 1)
    state = model._cat_pruning.state
    pos = state._token_positions(torch.device("cpu"))
    assert pos.shape == (N, 3)
    assert torch.equal(pos[21], torch.tensor([1.0, 0.0, 1.0]))  # token 21 = frame 1, row 0, col 1
    assert state.geometry.frames == 3 and cat_pruning.stats(model).num_tokens == N


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    def no_hooks_left(model):
        assert not model._forward_pre_hooks and not model.rope._forward_hooks
        assert not model.patch_embedding._forward_hooks and not model.proj_out._forward_hooks

    harness.check_unpatch_bitwise(WAN, tiny_wan(), inputs(seed=3), after_unpatch=no_hooks_left)


def test_batch_samples_are_independent():
    harness.check_samples_independent(WAN, tiny_wan(layers=1), inputs(batch=3, seed=8))


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(WAN, tiny_wan(), inputs(batch=2, frames=2, height=6, width=5, seed=10), 18)


def test_meta_device():
    harness.check_meta_device(WAN, tiny_wan, inputs(device="meta"))


def test_real_config_macs_on_meta():
    from diffusers import WanTransformer3DModel

    from cat_pruning.adapters import wan

    harness.check_real_config_macs_on_meta(WAN, WanTransformer3DModel, wan, "wan2.1-1.3b-480p", num_tokens=32760,
                                           tokens_kept=9828)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(WAN, tiny_wan(layers=1), inputs(seed=11), patch_kw=store)


def test_unsupported_cases_are_refused():
    from diffusers import FirstBlockCacheConfig

    model = tiny_wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="enable_cache"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)
    model.disable_cache()
    model.blocks[0].attn1.fuse_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        cat_pruning.patch(model)
    model.blocks[0].attn1.unfuse_projections()
    cat_pruning.patch(model, backend="torch")
    kw = inputs()
    with pytest.raises(ValueError, match=r"\(B, C, frames, height, width\)"):
        model(hidden_states=kw["hidden_states"][:, :, 0], encoder_hidden_states=kw["encoder_hidden_states"],
              timestep=torch.ones(2))


def tiny_pipeline(**components):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=2,
                           scale_factor_temporal=2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=tiny_wan(),
                       **components)


def pipeline_kwargs():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    return dict(prompt_embeds=emb, negative_prompt_embeds=emb + 1, guidance_scale=4.0, height=16, width=16,
                num_frames=9, num_inference_steps=STEPS, output_type="latent")


def test_pipeline_cfg_runs_both_branches_and_keep_ratio_one_equals_dense():
    """The stock WanPipeline (prompt embeddings given, no text encoder) with CFG: each step calls
    the transformer in cache_context("cond") and ("uncond"), each branch on its own caches;
    keep_ratio 1 equals dense, pruned calls repeat exactly, unpatch restores dense."""
    kw = pipeline_kwargs()

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.branches == ("cond", "uncond") and s.num_tokens == 5 * 4 * 4  # 9 frames, 16x16 -> 5 x 8 x 8 latent
        assert "pruned" in [st.mode for st in s.steps]

    harness.check_pipeline(WAN, tiny_pipeline(),
                           lambda pipe: pipe(**kw, generator=torch.Generator().manual_seed(0)).frames, check_pruned)


def test_two_expert_pipeline_patches_both_experts():
    """Wan 2.2 A14B: `transformer` runs the steps at or above the boundary timestep, `transformer_2`
    the others. Patching the pipeline patches both, each with its own caches (per CFG branch) and
    its own schedule over the steps it runs (its final full step included); keep_ratio 1 equals
    dense; stats(pipe) lists both experts' steps in order; unpatch restores dense bitwise."""
    steps = 10
    kw = dict(pipeline_kwargs(), num_inference_steps=steps)
    pipe = tiny_pipeline(transformer_2=tiny_wan(seed=1), boundary_ratio=0.8)

    def call():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).frames

    dense = call()
    high = int((pipe.scheduler.timesteps >= 800).sum())
    assert 3 < high < steps - 3  # both experts prune
    cat_pruning.patch(pipe, keep_ratio=1.0, full_steps=FULL, backend="torch")
    assert cat_pruning.is_patched(pipe.transformer) and cat_pruning.is_patched(pipe.transformer_2)
    torch.testing.assert_close(call(), dense, **harness.F32)
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=FULL, backend="torch", final_full_steps=1)
    pruned = call()
    assert not torch.equal(pruned, dense) and torch.equal(call(), pruned)
    parts = [cat_pruning.stats(pipe.transformer), cat_pruning.stats(pipe.transformer_2)]
    for part, n in zip(parts, (high, steps - high), strict=True):
        assert [st.mode for st in part.steps] == [part.config.mode(i, n) for i in range(n)]
        assert "pruned" in {st.mode for st in part.steps} and part.steps[-1].mode != "pruned"
        assert part.branches == ("cond", "uncond")
    both = cat_pruning.stats(pipe)
    assert both.experts == ("transformer", "transformer_2")
    assert [(st.mode, st.tokens) for st in both.steps] == [(st.mode, st.tokens) for p in parts for st in p.steps]
    assert both.macs == sum(p.macs for p in parts) and both.macs_dense == sum(p.macs_dense for p in parts)
    assert 0.3 < both.mac_fraction < 1.0
    cat_pruning.unpatch(pipe)
    assert not cat_pruning.is_patched(pipe.transformer) and not cat_pruning.is_patched(pipe.transformer_2)
    assert not {"step", "set_timesteps"} & set(vars(pipe.scheduler))
    assert torch.equal(call(), dense)


def i2v_inputs(seed: int = 9):
    """Wan 2.1 image-to-video: the cross attentions take CLIP image tokens besides the text
    (diffusers' processor splits the context at 512 text tokens), and every call's latent carries
    the conditioning channels after its own (`condition`, added by run_i2v)."""
    g = torch.Generator().manual_seed(seed)
    kw = inputs(batch=2, seed=seed)
    return dict(kw, condition=torch.randn(kw["hidden_states"].shape, generator=g),
                encoder_hidden_states=torch.randn(2, 512, TEXT_DIM, generator=g),
                encoder_hidden_states_image=torch.randn(2, 5, 8, generator=g))


def run_i2v(model, kw, steps, step_fn=None, *, horizon=None):
    """The toy loop on the latent, each call given [latent; condition] channels."""
    rest = {k: v for k, v in kw.items() if k != "condition"}

    def call(hidden_states, **args):
        return model(hidden_states=torch.cat([hidden_states, kw["condition"]], 1), **args)

    return run_steps(call, rest, steps, step_fn, horizon=horizon)


I2V = Family(run_i2v, STEPS, FULL)


def tiny_i2v(**kw):
    return tiny_wan(in_channels=2 * IN_CHANNELS, image_dim=8, added_kv_proj_dim=24, **kw)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_image_to_video_keep_ratio_one_equals_dense(store):
    harness.check_keep_ratio_one_equals_dense(I2V, tiny_i2v(), i2v_inputs(), TOL[torch.float32], patch_kw=store)


def test_image_to_video_pruned_steps_match_masked_dense_oracle():
    harness.check_pruned_steps_match_oracle(I2V, tiny_i2v(), i2v_inputs(), OracleProcessor, tokens, N, extra_steps=1)


def test_image_to_video_pipeline_with_its_image_encoder():
    """The stock WanImageToVideoPipeline (Wan 2.1 I2V, prompt embeddings given) with a tiny CLIP
    image encoder: its image tokens reach the cross attentions only, so the pipeline is patched
    with it; keep_ratio 1 equals dense, pruned calls repeat exactly, unpatch restores dense. A
    controlnet on a pipeline is still refused."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    base = tiny_pipeline()
    torch.manual_seed(1)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # latents (4 channels), the first-frame mask (2: the VAE's temporal factor) and the condition (4)
    transformer = tiny_wan(in_channels=2 * IN_CHANNELS + 2, image_dim=8, added_kv_proj_dim=24)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                                   image_processor=processor, image_encoder=encoder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy())
    kw = dict(pipeline_kwargs(), image=image)
    images = []
    transformer.register_forward_pre_hook(
        lambda m, a, k: images.append(k["encoder_hidden_states_image"].shape), with_kwargs=True)

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.branches == ("cond", "uncond") and s.num_tokens == 5 * 4 * 4
        assert "pruned" in [st.mode for st in s.steps]

    harness.check_pipeline(WAN, pipe, lambda p: p(**kw, generator=torch.Generator().manual_seed(0)).frames,
                           check_pruned)
    assert set(images) == {torch.Size([1, 5, 8])}  # the CLIP tokens reached every call
    base.controlnet = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="pipelines with a controlnet are not supported"):
        cat_pruning.patch(base)


@pytest.mark.parametrize("output_cache", ["hidden", "auto"])
def test_hidden_output_cache_refuses_a_per_token_timestep(output_cache):
    """A bare transformer cannot know its pipeline's expand_timesteps: "auto" is "hidden" there,
    refused at the first call with a per-token timestep."""
    model = tiny_wan()
    cat_pruning.patch(model, full_steps=FULL, backend="torch", output_cache=output_cache)
    assert cat_pruning.stats(model).config.output_cache == "hidden"
    with pytest.raises(ValueError, match='"hidden".*needs one timestep per sample.*patch the pipeline.*"noise"'):
        run_per_token(model, inputs(seed=3), 1)


def test_output_cache_auto_follows_the_pipelines_timestep():
    """"auto" is the hidden cache, except on a pipeline that gives a per-token timestep (Wan 2.2
    TI2V's expand_timesteps), where it is the noise cache and the generation equals one patched
    with "noise"; "hidden" on such a pipeline is refused at patch time, leaving it unpatched."""
    kw = pipeline_kwargs()

    def generate(pipe):
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).frames

    for expand, want in ((False, "hidden"), (True, "noise")):
        pipe = tiny_pipeline(expand_timesteps=expand)
        pipe.set_progress_bar_config(disable=True)
        cat_pruning.patch(pipe, full_steps=FULL, backend="torch")
        assert cat_pruning.stats(pipe).config.output_cache == want
        if expand:
            auto = generate(pipe)
            assert "pruned" in [st.mode for st in cat_pruning.stats(pipe).steps]
            cat_pruning.patch(pipe, full_steps=FULL, backend="torch", output_cache="noise")
            assert torch.equal(generate(pipe), auto)
            cat_pruning.unpatch(pipe)
            with pytest.raises(ValueError, match='"hidden" needs one timestep per sample.*WanPipeline.*"noise"'):
                cat_pruning.patch(pipe, output_cache="hidden")
            assert not cat_pruning.is_patched(pipe)
