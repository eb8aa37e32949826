"""cat_pruning on tiny random-config SD3 / SD3.5 transformers against the dense diffusers path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sd3_models import inputs, run_steps, tiny_sd3

import cat_pruning

# One tolerance table per dtype. The patched model runs the same operations as the unpatched
# one, but attention over compacted queries and the cached keys may change the summation
# order inside GEMMs: allow a few ulps of the output scale (|out| ~ 10 here).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
    torch.float16: dict(atol=2e-2, rtol=5e-3),
}
VARIANTS = ["sd3", "sd35"]
STEPS = 7
FULL = 3


def patchify_mask(token_mask: torch.Tensor, height: int, width: int, p: int = 2) -> torch.Tensor:
    """(B, N) token mask -> (B, 1, H*p, W*p) pixel mask in the model's output layout."""
    m = token_mask.view(-1, 1, height, width).float()
    return F.interpolate(m, scale_factor=p, mode="nearest").bool()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keep_ratio_one_equals_dense(variant, dtype):
    model = tiny_sd3(variant, dtype=dtype)
    kw = inputs(dtype=dtype)
    dense = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, STEPS)
    assert [s.mode for s in cat_pruning.stats(model).steps][-1] == "pruned"
    for a, b in zip(dense, patched, strict=True):
        torch.testing.assert_close(b, a, **TOL[dtype])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_steps_equal_unpatched(variant):
    model = tiny_sd3(variant)
    kw = inputs(seed=5)
    dense = run_steps(model, kw, FULL)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    patched = run_steps(model, kw, FULL)
    for a, b in zip(dense, patched, strict=True):
        assert torch.equal(a, b)


class OracleProcessor:
    """Dense joint attention in which the image K/V rows of unselected tokens come from a
    given cache: the masked-dense oracle of DESIGN.md section 3 (written independently of
    cat_pruning.processors on purpose)."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, None, :, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        k = torch.where(self.selected, k, self.k_cache)
        v = torch.where(self.selected, v, self.v_cache)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        img = attn.to_out[0](out[:, :n])
        if encoder_hidden_states is None:
            return img
        ctx = out[:, n:]
        return img, (ctx if attn.context_pre_only else attn.to_add_out(ctx))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cfg_pairs", [False, True])
def test_pruned_steps_match_masked_dense_oracle(variant, cfg_pairs):
    model = tiny_sd3(variant)
    oracle = copy.deepcopy(model)
    kw = inputs(batch=4, seed=2)
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
            for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
                attn.set_processor(OracleProcessor(*kv[name], selected))
            with torch.no_grad():
                want = oracle(**args)[0]
            pix = patchify_mask(selected, h, w).expand_as(out)
            torch.testing.assert_close(out[pix], want[pix], **TOL[torch.float32])
            # Unselected tokens return their last computed noise: the noise cache before the step.
            tokens = out.view(x.shape[0], 4, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(x.shape[0], h * w, -1)
            assert torch.equal(tokens[~selected], noise_before[~selected])
            if cfg_pairs:
                half = x.shape[0] // 2
                assert torch.equal(idx[:half], idx[half:])
            checked += 1
        x = x - 0.1 * out
    assert checked == STEPS - FULL


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    model = tiny_sd3("sd35")
    kw = inputs(seed=3)
    before = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    once = run_steps(model, kw, STEPS)
    cat_pruning.patch(model, keep_ratio=0.9, full_steps=4, backend="torch")
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=FULL, backend="torch")
    twice = run_steps(model, kw, STEPS)
    for a, b in zip(once, twice, strict=True):
        assert torch.equal(a, b)
    cat_pruning.unpatch(model)
    assert not cat_pruning.is_patched(model)
    after = run_steps(model, kw, STEPS)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert not any(type(p).__module__.startswith("cat_pruning") for p in processors)


def test_consecutive_generations_equal_fresh_ones():
    model = tiny_sd3("sd3")
    kw1, kw2 = inputs(seed=4), inputs(seed=6)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    first = run_steps(model, kw1, STEPS)
    cat_pruning.reset(model)
    second = run_steps(model, kw2, STEPS)
    fresh = tiny_sd3("sd3")
    cat_pruning.patch(fresh, keep_ratio=0.3, full_steps=FULL, backend="torch")
    again = run_steps(fresh, kw2, STEPS)
    for a, b in zip(second, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[-1], second[-1])


def test_geometry_change_starts_new_generation():
    model = tiny_sd3("sd3")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    run_steps(model, inputs(), STEPS)  # ends mid-way through pruning
    small = inputs(batch=3, height=8, width=14, seed=9)
    got = run_steps(model, small, 2)
    fresh = tiny_sd3("sd3")
    want = run_steps(fresh, small, 2)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    model = tiny_sd3("sd3", layers=2)
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

    model = tiny_sd3("sd35")
    kw = inputs(batch=2, height=16, width=16, seed=10)
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
    assert "pruned" in str(s) and s.cache_bytes > 0
    per_sample = FULL * s.num_tokens + (STEPS - FULL) * s.tokens_kept
    assert s.recomputed.shape == (2, 8, 8)
    assert torch.equal(s.recomputed.sum((1, 2)), torch.full((2,), float(per_sample)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device(variant):
    with torch.device("meta"):
        model = tiny_sd3(variant)
    kw = inputs(device="meta")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL)
    outs = run_steps(model, kw, STEPS)
    assert outs[-1].shape == kw["hidden_states"].shape and outs[-1].device.type == "meta"
    assert cat_pruning.stats(model).steps[-1].mode == "pruned"


def test_torch_compile_fullgraph_matches_eager_with_few_graphs():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_sd3("sd35", layers=2)
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


def test_bare_transformer_under_compile_without_advance_is_refused():
    torch._dynamo.reset()
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="manual_steps=True"):
        run_steps(compiled, inputs(), 1)
    with pytest.raises(ValueError, match="manual_steps"):
        cat_pruning.advance(model)
    torch._dynamo.reset()


def test_bad_config_and_unsupported_models_leave_model_unpatched():
    model = tiny_sd3("sd3", layers=1)
    for bad in (dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(full_steps=1), dict(num_clusters=0),
                dict(backend="fast")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cat_pruning.patch(model, **bad)
        assert not cat_pruning.is_patched(model)
    with pytest.raises(TypeError, match="SD3"):
        cat_pruning.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown CATConfig"):
        cat_pruning.patch(model, keep_ration=0.3)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused"):
        cat_pruning.patch(model)
    assert not cat_pruning.is_patched(model)


def test_unsupported_call_inputs_are_refused():
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, backend="torch")
    kw = inputs()
    t = torch.ones(2)
    with pytest.raises(ValueError, match="ControlNet"):
        model(**kw, timestep=t, block_controlnet_hidden_states=[torch.ones(1)])
    with pytest.raises(ValueError, match="IP-Adapter"):
        model(**kw, timestep=t, joint_attention_kwargs={"ip_adapter_image_embeds": torch.ones(1)})
    with pytest.raises(ValueError, match="cfg_pairs"):
        cat_pruning.patch(model, backend="torch", cfg_pairs=True)
        model(**inputs(batch=3), timestep=torch.ones(3))


def test_patched_context_manager():
    model = tiny_sd3("sd3", layers=1)
    with cat_pruning.patched(model, keep_ratio=0.5) as m:
        assert cat_pruning.is_patched(m)
    assert not cat_pruning.is_patched(model)


@pytest.mark.parametrize("selection", ["cat-no-staleness", "topk", "random"])
def test_selection_ablations_pick_k_unique_tokens(selection):
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", selection=selection)
    state = model._cat_pruning.state
    picks = []

    def record():  # after a fill or pruned step, idx holds the selection for the next step
        if state.history[-1][0] in ("fill", "pruned"):
            picks.append(state.idx.clone())

    run_steps(model, inputs(), STEPS, step_fn=record)
    assert len(picks) == STEPS - FULL + 1
    for idx in picks:
        assert all(len(set(row.tolist())) == state.k for row in idx)
        assert torch.equal(idx, idx.sort(1).values)
    assert any(not torch.equal(a, b) for a, b in zip(picks, picks[1:], strict=False))
    if selection == "topk":
        d = (state.noise_cache - state.anchor).norm(dim=-1)
        assert torch.equal(state.idx, d.topk(state.k).indices.sort(1).values)
