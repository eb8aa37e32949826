"""cat_pruning on tiny random-config Flux transformers against the dense diffusers path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from flux_models import IN_CHANNELS, JOINT_DIM, POOLED_DIM, TEXT_TOKENS, inputs, run_steps, tiny_flux

import cat_pruning

# One tolerance table per dtype. The patched model runs the same operations as the unpatched
# one, but attention over compacted queries and the cached keys may change the summation
# order inside GEMMs: allow a few ulps of the output scale (|out| ~ 5 here).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
}
STEPS = 6
FULL = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_equals_dense(dtype):
    model = tiny_flux(dtype=dtype)
    kw = inputs(dtype=dtype)
    dense = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, STEPS)
    assert [s.mode for s in cat_pruning.stats(model).steps][-1] == "pruned"
    for a, b in zip(dense, patched, strict=True):
        torch.testing.assert_close(b, a, **TOL[dtype])


def test_dense_steps_equal_unpatched():
    model = tiny_flux()
    kw = inputs(seed=5)
    dense = run_steps(model, kw, FULL)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, FULL)
    for a, b in zip(dense, patched, strict=True):
        assert torch.equal(a, b)


class OracleProcessor:
    """Dense Flux attention in which the image K (after rotation) / V rows of unselected tokens
    come from a given cache: the masked-dense oracle of DESIGN.md section 3, written with
    diffusers' own apply_rotary_emb and independently of cat_pruning's processor."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, :, None, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        b, n = self.selected.shape[:2]
        text = q.shape[1] - n
        k_img = torch.where(self.selected, k[:, text:], self.k_cache.view(b, n, attn.heads, -1))
        v_img = torch.where(self.selected, v[:, text:], self.v_cache.view(b, n, attn.heads, -1))
        k, v = torch.cat([k[:, :text], k_img], 1), torch.cat([v[:, :text], v_img], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[0](out[:, text:]), attn.to_add_out(out[:, :text])


def test_pruned_steps_match_masked_dense_oracle():
    model = tiny_flux()
    oracle = copy.deepcopy(model)
    kw = inputs(batch=3, seed=2)
    n = kw["hidden_states"].shape[1]
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    state = model._cat_pruning.state
    x = kw["hidden_states"]
    checked = 0
    for i in range(STEPS + 1):
        t = torch.full((x.shape[0],), 1.0 - i / STEPS)
        args = {**kw, "hidden_states": x, "timestep": t, "return_dict": False}
        pruned = state.mode == "pruned"
        if pruned:
            idx = state.idx.clone()
            selected = torch.zeros(x.shape[0], n, dtype=torch.bool).scatter_(1, idx, True)
            kv = {name: (kc.clone(), vc.clone()) for name, (kc, vc) in state.kv.items()}
            noise_before = state.noise_cache.clone()
        with torch.no_grad():
            out = model(**args)[0]
        if pruned:
            # no CFG batch: every sample has its own selection
            assert not (torch.equal(idx[0], idx[1]) and torch.equal(idx[1], idx[2]))
            for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
                attn.set_processor(OracleProcessor(*kv[name], selected))
            with torch.no_grad():
                want = oracle(**args)[0]
            torch.testing.assert_close(out[selected], want[selected], **TOL[torch.float32])
            assert torch.equal(out[~selected], noise_before[~selected])
            checked += 1
        x = x - 0.1 * out
    assert checked == STEPS + 1 - FULL


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    model = tiny_flux()
    kw = inputs(seed=3)
    before = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    once = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    twice = run_steps(model, kw, STEPS)
    for a, b in zip(once, twice, strict=True):
        assert torch.equal(a, b)
    cat_pruning.unpatch(model)
    after = run_steps(model, kw, STEPS)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not model._forward_pre_hooks and not model.pos_embed._forward_hooks
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert not any(type(p).__module__.startswith("cat_pruning") for p in processors)


def test_batch_samples_are_independent():
    model = tiny_flux(layers=1, single_layers=1)
    kw = inputs(batch=3, seed=8)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    out = run_steps(model, kw, STEPS)
    idx = model._cat_pruning.state.idx.clone()
    perm = torch.tensor([2, 0, 1])
    cat_pruning.reset(model)
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance")
    permuted = run_steps(model, {k: (v[perm] if k in batched else v) for k, v in kw.items()}, STEPS)
    assert torch.equal(model._cat_pruning.state.idx, idx[perm])
    for a, b in zip(out, permuted, strict=True):
        torch.testing.assert_close(b, a[perm], **TOL[torch.float32])


def test_stats_macs_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_flux()
    kw = inputs(batch=2, height=8, width=7, seed=10)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        run_steps(model, kw, STEPS)
    s = cat_pruning.stats(model)
    assert [st.mode for st in s.steps] == ["dense", "anchor", "fill"] + ["pruned"] * (STEPS - FULL)
    assert s.steps[-1].tokens == s.tokens_kept == 17
    measured = counter.get_total_flops() / 2
    assert abs(s.macs - measured) / measured < 0.02, (s.macs, measured)
    assert 0.3 < s.mac_fraction < 1.0


def test_meta_device():
    with torch.device("meta"):
        model = tiny_flux()
    kw = inputs(device="meta")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL)
    outs = run_steps(model, kw, STEPS)
    assert outs[-1].shape == kw["hidden_states"].shape and outs[-1].device.type == "meta"
    assert cat_pruning.stats(model).steps[-1].mode == "pruned"


def test_real_config_macs_on_meta():
    from diffusers import FluxTransformer2DModel

    from cat_pruning.adapters.flux import REAL_CONFIGS, real_inputs

    config, gen = REAL_CONFIGS["flux1-dev-1024"]
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    kw = real_inputs(config, gen, "meta", torch.bfloat16)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=8)
    run_steps(model, kw, 10)
    s = cat_pruning.stats(model)
    assert s.num_tokens == 4096 and s.tokens_kept == 1229
    assert 0.5 < s.mac_fraction < 1.0


def test_torch_compile_fullgraph_matches_eager_with_few_graphs():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_flux(layers=1, single_layers=1)
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


def tiny_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=IN_CHANNELS // 4, norm_num_groups=8, sample_size=32, scaling_factor=0.5, shift_factor=0.1,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux(),
    )


def pipeline_kwargs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=g),
        height=24, width=20, num_inference_steps=6, guidance_scale=3.5, output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    )


def test_pipeline_patch_runs_twice_and_keep_ratio_one_equals_dense():
    pipe = tiny_pipeline()
    dense = pipe(**pipeline_kwargs()).images
    cat_pruning.patch(pipe, keep_ratio=1.0, full_steps=FULL, backend="torch")
    full = pipe(**pipeline_kwargs()).images
    torch.testing.assert_close(full, dense, **TOL[torch.float32])
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=FULL, backend="torch")
    first = pipe(**pipeline_kwargs()).images
    second = pipe(**pipeline_kwargs()).images
    assert torch.equal(first, second)
    s = cat_pruning.stats(pipe)
    assert [st.mode for st in s.steps][-1] == "pruned" and s.batch == 2 and s.num_tokens == 30
    assert not torch.equal(first, dense)
    cat_pruning.unpatch(pipe)
    assert torch.equal(pipe(**pipeline_kwargs()).images, dense)


def test_unsupported_cases_are_refused():
    pipe = tiny_pipeline()
    cat_pruning.patch(pipe, backend="torch")
    kw = pipeline_kwargs(batch=1)
    with pytest.raises(ValueError, match="true CFG"):
        pipe(**kw, true_cfg_scale=2.0, negative_prompt_embeds=kw["prompt_embeds"] + 1,
             negative_pooled_prompt_embeds=kw["pooled_prompt_embeds"] + 1)
    cat_pruning.unpatch(pipe)

    from diffusers import FirstBlockCacheConfig

    model = tiny_flux(layers=1, single_layers=1)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="enable_cache"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)
    model.disable_cache()
    cat_pruning.patch(model, backend="torch")
    kw, t = inputs(), torch.ones(2)
    with pytest.raises(ValueError, match="ControlNet"):
        model(**kw, timestep=t, controlnet_block_samples=[torch.ones(1)])
    with pytest.raises(ValueError, match="IP-Adapter"):
        model(**kw, timestep=t, joint_attention_kwargs={"ip_adapter_image_embeds": torch.ones(1)})
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="enable_cache"):
        model(**kw, timestep=t)
    model.disable_cache()
    cat_pruning.unpatch(model)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused"):
        cat_pruning.patch(model)
