"""cat_pruning on tiny random-config Qwen-Image transformers against the dense diffusers path."""

from __future__ import annotations

import sys

import harness
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from harness import TOL, Family
from qwen_models import inputs, run_steps, tiny_qwen

import cat_pruning
from cat_pruning.adapters.qwenimage import MIN_DIFFUSERS

if tuple(int(p) for p in __import__("diffusers").__version__.split(".")[:2]) < MIN_DIFFUSERS:
    pytest.skip("Qwen-Image is supported from diffusers 0.42 on (the patch refuses older)", allow_module_level=True)

STEPS = 6
FULL = 3
QWEN = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(QWEN, tiny_qwen(dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(QWEN, tiny_qwen(), inputs(seed=5), patch_kw=store)


class OracleProcessor:
    """Dense Qwen-Image attention in which the image K (after rotation) / V rows of unselected
    tokens come from a given cache: the masked-dense oracle of docs/design.md section 3, written
    with diffusers' own apply_rotary_emb_qwen and text mask, independently of cat_pruning's processor."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, :, None, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        img_freqs, txt_freqs = image_rotary_emb
        q, k = (apply_rotary_emb_qwen(x, img_freqs, use_real=False) for x in (q, k))
        cq, ck = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (cq, ck))
        b, n = self.selected.shape[:2]
        reference = hidden_states.shape[1] - n  # reference-image rows after the image's: always computed
        selected = F.pad(self.selected, (0, 0, 0, 0, 0, reference), value=True)
        k = torch.where(selected, k, F.pad(self.k_cache.view(b, n, attn.heads, -1), (0, 0, 0, 0, 0, reference)))
        v = torch.where(selected, v, F.pad(self.v_cache.view(b, n, attn.heads, -1), (0, 0, 0, 0, 0, reference)))
        mask = torch.cat([encoder_hidden_states_mask, torch.ones(b, n + reference, dtype=torch.bool)], 1)
        mask = mask[:, None, None, :]
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
        text = encoder_hidden_states.shape[1]
        return attn.to_out[0](out[:, text:]), attn.to_add_out(out[:, :text])


@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(store):
    kw = inputs(batch=3, seed=2)

    def own_selections(idx):  # no CFG batch: every sample has its own selection
        assert not (torch.equal(idx[0], idx[1]) and torch.equal(idx[1], idx[2]))

    harness.check_pruned_steps_match_oracle(QWEN, tiny_qwen(), kw, OracleProcessor, lambda o: o,
                                            kw["hidden_states"].shape[1], extra_steps=1, check_idx=own_selections,
                                            patch_kw=store)


# Reference images (the Edit models): a 3x2 and a 2x2 grid after the 6x5 image, 10 rows always computed
REFERENCE = ((3, 2), (2, 2))


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_reference_images_keep_ratio_one_equals_dense(store, zero_cond_t):
    harness.check_keep_ratio_one_equals_dense(QWEN, tiny_qwen(zero_cond_t=zero_cond_t), inputs(reference=REFERENCE),
                                              TOL[torch.float32], patch_kw=store)


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_reference_images_pruned_steps_match_masked_dense_oracle(store, zero_cond_t):
    """The reference rows are computed at every step, never selected or cached: the oracle
    computes them in full; the image's rows of the output are checked (the pipelines drop the
    reference rows), the reference rows come back in their place, as the model computed them."""
    kw = inputs(batch=2, seed=12, reference=REFERENCE)
    n = 30
    rows = []

    def check_idx(idx):
        assert int(idx.max()) < n  # only image tokens are selected

    model = tiny_qwen(zero_cond_t=zero_cond_t)
    model.register_forward_hook(lambda m, a, out: rows.append(out[0].shape[1]))
    harness.check_pruned_steps_match_oracle(QWEN, model, kw, OracleProcessor, lambda o: o[:, :n], n,
                                            extra_steps=1, check_idx=check_idx, patch_kw=store)
    assert set(rows) == {n + 10}  # every call returns the image's and the reference rows
    s = cat_pruning.stats(model)
    assert s.num_tokens == n and s.reference_tokens == 10 and "(+ 10 reference tokens" in str(s)


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["edit", "edit-2511"])
def test_reference_images_stats_macs_match_flop_counter(zero_cond_t):
    kw = inputs(batch=2, height=8, width=7, seed=10, padded=False, reference=REFERENCE)
    harness.check_macs_match_flop_counter(QWEN, tiny_qwen(zero_cond_t=zero_cond_t), kw, 17)


def test_reference_images_torch_compile_fullgraph_matches_eager_with_few_graphs():
    """2511's reference conditioning (zero_cond_t: the modulate_index pre-hooks) under
    torch.compile(fullgraph=True)."""
    harness.check_compile_fullgraph(QWEN, tiny_qwen(layers=1, zero_cond_t=True), inputs(seed=11, reference=REFERENCE))


def test_the_text_mask_reaches_the_pruned_steps():
    """Padding text tokens are masked on pruned steps as on dense ones: changing what a masked
    token holds changes nothing."""
    kw = inputs(batch=2, seed=6)
    assert not kw["encoder_hidden_states_mask"][1].all()
    other = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"].clone()}
    other["encoder_hidden_states"][1, ~kw["encoder_hidden_states_mask"][1]] += 5.0
    outs = []
    for args in (kw, other):
        model = tiny_qwen()
        cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
        outs.append(run_steps(model, args, STEPS))
        assert "pruned" in {s.mode for s in cat_pruning.stats(model).steps}
    harness.assert_all_close([o[1] for o in outs[0]], [o[1] for o in outs[1]], harness.F32)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    def no_hooks_left(model):
        assert not model._forward_pre_hooks and not model.pos_embed._forward_hooks

    harness.check_unpatch_bitwise(QWEN, tiny_qwen(), inputs(seed=3), after_unpatch=no_hooks_left)


def test_batch_samples_are_independent():
    batched = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask")
    harness.check_samples_independent(QWEN, tiny_qwen(layers=1), inputs(batch=3, seed=8), keys=batched)


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(QWEN, tiny_qwen(), inputs(batch=2, height=8, width=7, seed=10, padded=False),
                                          17)


def test_meta_device():
    harness.check_meta_device(QWEN, tiny_qwen, inputs(device="meta"))


def test_real_config_macs_on_meta():
    from diffusers import QwenImageTransformer2DModel

    from cat_pruning.adapters import qwenimage

    harness.check_real_config_macs_on_meta(QWEN, QwenImageTransformer2DModel, qwenimage, "qwen-image-1328",
                                           num_tokens=6889, tokens_kept=2067)
    edit = harness.check_real_config_macs_on_meta(QWEN, QwenImageTransformer2DModel, qwenimage,
                                                  "qwen-image-edit-2511-1024", num_tokens=4096, tokens_kept=1229)
    assert edit.reference_tokens == 4096


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(QWEN, tiny_qwen(layers=1), inputs(seed=11), patch_kw=store)


def test_unsupported_cases_are_refused():
    from diffusers import FirstBlockCacheConfig

    model = tiny_qwen()  # first-block cache needs two blocks
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="enable_cache"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)
    model.disable_cache()
    cat_pruning.patch(model, backend="torch")
    kw, t = inputs(), torch.ones(2)
    with pytest.raises(ValueError, match="a 6x5 token grid and 30 reference tokens for 30 rows"):
        model(**{**kw, "img_shapes": [[(1, 6, 5), (1, 6, 5)]] * 2}, timestep=t)
    with pytest.raises(ValueError, match="ControlNet"):
        model(**kw, timestep=t, controlnet_block_samples=[torch.ones(1)])
    model._parallel_config = object()  # as after enable_parallelism (no parallel config CAT would read)
    with pytest.raises(ValueError, match="reference images .* model parallelism are not supported yet"):
        model(**inputs(reference=REFERENCE), timestep=t)
    del model._parallel_config
    cat_pruning.unpatch(model)
    layered = tiny_qwen(layers=1)
    layered.register_to_config(use_layer3d_rope=True)
    with pytest.raises(ValueError, match="use_layer3d_rope"):
        cat_pruning.patch(layered)


def tiny_pipeline():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=tiny_qwen())


def test_pipeline_true_cfg_runs_both_branches_and_keep_ratio_one_equals_dense():
    """The stock QwenImagePipeline (prompt embeddings given, no text encoder) with true CFG: each
    step calls the transformer in cache_context("cond") and ("uncond"), each branch on its own
    caches; keep_ratio 1 equals dense, pruned calls repeat exactly, unpatch restores dense."""
    from qwen_models import JOINT_DIM, TEXT_TOKENS

    g = torch.Generator().manual_seed(5)
    emb = torch.randn(1, TEXT_TOKENS, JOINT_DIM, generator=g)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    mask[0, -2:] = 0  # padded prompt
    kw = dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=emb + 1,
              negative_prompt_embeds_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long), true_cfg_scale=3.0,
              height=48, width=40, num_inference_steps=STEPS, output_type="latent")  # fmt: skip

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.branches == ("cond", "uncond") and s.num_tokens == 30 and "pruned" in [st.mode for st in s.steps]

    harness.check_pipeline(QWEN, tiny_pipeline(),
                           lambda pipe: pipe(**kw, generator=torch.Generator().manual_seed(0)).images, check_pruned)


@pytest.mark.parametrize("cls_name", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_edit_pipeline_reference_tokens_are_computed_not_pruned(cls_name, monkeypatch):
    """The stock Qwen-Image-Edit pipelines (prompt embeddings given, no text encoder or
    processor) with true CFG: the reference image's latents follow the image's in every call,
    every step computes them, the pipeline drops their rows; keep_ratio 1 equals dense, pruned
    calls repeat exactly, unpatch restores dense. The pipelines size the reference to about 1024²
    pixels; here to 32x32 (4x4 tokens) to keep the test small."""
    import diffusers
    from PIL import Image
    from qwen_models import JOINT_DIM, TEXT_TOKENS

    module = sys.modules[getattr(diffusers, cls_name).__module__]
    sized = module.calculate_dimensions  # (target area, ratio) -> width, height (, ...)
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: sized(32 * 32, ratio))
    base = tiny_pipeline()
    pipe = getattr(diffusers, cls_name)(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                                        processor=None, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1, TEXT_TOKENS, JOINT_DIM, generator=g)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())
    kw = dict(image=image, prompt_embeds=emb, prompt_embeds_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long),
              negative_prompt_embeds=emb + 1, negative_prompt_embeds_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long),
              true_cfg_scale=3.0, height=48, width=40, num_inference_steps=STEPS, output_type="latent")  # fmt: skip
    rows = []
    pipe.transformer.register_forward_hook(lambda m, a, k, out: rows.append(k["hidden_states"].shape[1]),
                                           with_kwargs=True)

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.branches == ("cond", "uncond") and s.num_tokens == 30 and s.reference_tokens == 16
        assert "pruned" in [st.mode for st in s.steps]

    harness.check_pipeline(QWEN, pipe, lambda p: p(**kw, generator=torch.Generator().manual_seed(0)).images,
                           check_pruned)
    assert set(rows) == {30 + 16}  # the pipeline always passes the image's and the reference's latents
