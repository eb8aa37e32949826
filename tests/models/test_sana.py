"""cat_pruning on tiny random-config Sana transformers against the dense diffusers path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sana_models import CAPTION_DIM, LATENT_CHANNELS, TEXT_TOKENS, inputs, run_steps, tiny_sana

import cat_pruning

# One tolerance table per dtype. The patched model runs the same operations as the unpatched
# one, but over compacted rows (and the 1x1 convs over a K x 1 map): GEMM and conv summation
# orders may change, so allow a few ulps of the output scale (|out| ~ 5 here).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
}
STEPS = 6
FULL = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_ratio_one_equals_dense(dtype):
    model = tiny_sana(dtype=dtype)
    kw = inputs(dtype=dtype)
    dense = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, STEPS)
    assert [s.mode for s in cat_pruning.stats(model).steps][-1] == "pruned"
    for a, b in zip(dense, patched, strict=True):
        torch.testing.assert_close(b, a, **TOL[dtype])


def test_dense_steps_equal_unpatched():
    model = tiny_sana()
    kw = inputs(seed=5)
    dense = run_steps(model, kw, FULL)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, FULL)
    for a, b in zip(dense, patched, strict=True):
        assert torch.equal(a, b)


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
        mixed = torch.where(selected[:, None, :], x.flatten(2), cache[..., 0])
        return (mixed.view_as(x),)

    return hook


@pytest.mark.parametrize("cfg_pairs", [False, True])
def test_pruned_steps_match_masked_dense_oracle(cfg_pairs):
    model = tiny_sana()
    oracle = copy.deepcopy(model)
    kw = inputs(batch=4, seed=2)
    h, w = kw["hidden_states"].shape[-2:]
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=cfg_pairs)
    state = model._cat_pruning.state
    x = kw["hidden_states"]
    checked = 0
    for i in range(STEPS + 1):
        t = torch.full((x.shape[0],), 1000.0 * (1 - i / STEPS))
        args = {**kw, "hidden_states": x, "timestep": t, "return_dict": False}
        pruned = state.mode == "pruned"
        if pruned:
            idx = state.idx.clone()
            selected = torch.zeros(x.shape[0], h * w, dtype=torch.bool).scatter_(1, idx, True)
            kv = {name: (kc.clone(), vc.clone()) for name, (kc, vc) in state.kv.items()}
            convs = {name: c.clone() for name, c in state.extra.items()}
            noise_before = state.noise_cache.clone()
        with torch.no_grad():
            out = model(**args)[0]
        if pruned:
            handles = []
            for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
                attn.set_processor(OracleLinearAttn(*kv[name], selected))
            for name, cache in convs.items():
                handles.append(oracle.get_submodule(name).register_forward_pre_hook(oracle_conv_hook(cache, selected)))
            with torch.no_grad():
                want = oracle(**args)[0]
            for handle in handles:
                handle.remove()
            tokens, want_tokens = (o.flatten(2).transpose(1, 2) for o in (out, want))  # patch size 1
            torch.testing.assert_close(tokens[selected], want_tokens[selected], **TOL[torch.float32])
            assert torch.equal(tokens[~selected], noise_before[~selected])
            half = x.shape[0] // 2
            assert torch.equal(idx[:half], idx[half:]) == cfg_pairs
            checked += 1
        x = x - 0.1 * out
    assert checked == STEPS + 1 - FULL


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    model = tiny_sana()
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
    for block in model.transformer_blocks:
        assert not block._forward_pre_hooks and not block.ff.conv_depth._forward_pre_hooks
        assert not block.ff.conv_depth._forward_hooks
        assert not type(block.attn1.processor).__module__.startswith("cat_pruning")


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    model = tiny_sana(layers=1)
    kw = inputs(batch=6, seed=8)  # [uncond x3; cond x3]
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=True)
    out = run_steps(model, kw, STEPS)
    idx = model._cat_pruning.state.idx.clone()
    assert torch.equal(idx[:3], idx[3:])
    perm = torch.tensor([2, 0, 1])
    both = torch.cat([perm, perm + 3])
    cat_pruning.reset(model)
    permuted = run_steps(model, {k: v[both] for k, v in kw.items()}, STEPS)
    assert torch.equal(model._cat_pruning.state.idx, idx[both])
    for a, b in zip(out, permuted, strict=True):
        torch.testing.assert_close(b, a[both], **TOL[torch.float32])


def test_stats_macs_match_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_sana()
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
        model = tiny_sana()
    kw = inputs(device="meta")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL)
    outs = run_steps(model, kw, STEPS)
    assert outs[-1].shape == kw["hidden_states"].shape and outs[-1].device.type == "meta"
    assert cat_pruning.stats(model).steps[-1].mode == "pruned"


def test_real_config_macs_on_meta():
    from diffusers import SanaTransformer2DModel

    from cat_pruning.adapters.sana import REAL_CONFIGS, real_inputs

    config, gen = REAL_CONFIGS["sana-1600m-1024"]
    with torch.device("meta"):
        model = SanaTransformer2DModel(**config).to(torch.bfloat16)
    kw = real_inputs(config, gen, "meta", torch.bfloat16)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=8, cfg_pairs=True)
    run_steps(model, kw, 10)
    s = cat_pruning.stats(model)
    assert s.num_tokens == 1024 and s.tokens_kept == 308
    assert 0.5 < s.mac_fraction < 1.0


def test_torch_compile_fullgraph_matches_eager_with_few_graphs():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_sana(layers=1)
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
    assert [st.mode for st in s.steps][-1] == "pruned" and s.batch == 4 and s.num_tokens == 32
    state = pipe.transformer._cat_pruning.state
    assert state.cfg_pairs and torch.equal(state.idx[:2], state.idx[2:])
    assert not torch.equal(first, dense)
    cat_pruning.unpatch(pipe)
    assert torch.equal(pipe(**pipeline_kwargs()).images, dense)


def test_unsupported_cases_are_refused():
    model = tiny_sana(layers=1)
    cat_pruning.patch(model, backend="torch")
    with pytest.raises(ValueError, match="ControlNet"):
        model(**inputs(), timestep=torch.ones(2), controlnet_block_samples=(torch.ones(1),))
    cat_pruning.unpatch(model)
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.transformer_blocks[0].attn1.set_processor(AttnProcessor2_0())  # softmax self attention
    with pytest.raises(ValueError, match="linear self attention"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)
