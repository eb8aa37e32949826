"""cat_pruning on tiny random-config SD3 / SD3.5 transformers against the dense diffusers path."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from harness import TOL, Family, tokens_of
from sd3_models import inputs, run_steps, tiny_sd3

import cat_pruning

VARIANTS = ["sd3", "sd35"]
STEPS = 7
FULL = 3
SD3 = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(variant, dtype, store):
    harness.check_keep_ratio_one_equals_dense(SD3, tiny_sd3(variant, dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(variant, store):
    harness.check_dense_steps_equal_unpatched(SD3, tiny_sd3(variant), inputs(seed=5), patch_kw=store)


class OracleProcessor:
    """Dense joint attention in which the image K/V rows of unselected tokens come from a
    given cache: the masked-dense oracle of docs/design.md section 3 (written independently of
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
@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(variant, cfg_pairs, store):
    kw = inputs(batch=4, seed=2)
    hh, w = kw["hidden_states"].shape[-2] // 2, kw["hidden_states"].shape[-1] // 2
    # Token rows of the (B, 4, 2h, 2w) output: the selected ones cover exactly the selected 2x2 pixel patches.
    harness.check_pruned_steps_match_oracle(SD3, tiny_sd3(variant), kw, OracleProcessor, lambda o: tokens_of(o, hh, w),
                                            hh * w, cfg_pairs=cfg_pairs, patch_kw=store)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    harness.check_unpatch_bitwise(SD3, tiny_sd3("sd35"), inputs(seed=3), detour=dict(keep_ratio=0.9, full_steps=4))


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
    harness.assert_all_equal(second, again)
    assert not torch.equal(first[-1], second[-1])


def test_geometry_change_starts_new_generation():
    model = tiny_sd3("sd3")
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    run_steps(model, inputs(), STEPS)  # ends mid-way through pruning
    small = inputs(batch=3, height=8, width=14, seed=9)
    got = run_steps(model, small, 2)
    fresh = tiny_sd3("sd3")
    want = run_steps(fresh, small, 2)
    harness.assert_all_equal(got, want)


def test_cfg_batch_pairs_share_selection_and_samples_are_independent():
    # [uncond x3; cond x3]
    harness.check_samples_independent(SD3, tiny_sd3("sd3", layers=2), inputs(batch=6, seed=8), cfg_pairs=True)


def test_stats_macs_match_flop_counter():
    s = harness.check_macs_match_flop_counter(SD3, tiny_sd3("sd35"), inputs(batch=2, height=16, width=16, seed=10), 20)
    assert "pruned" in str(s) and s.cache_bytes > 0
    per_sample = sum(st.tokens for st in s.steps)  # every token of the dense and refresh steps, K of the pruned
    # one of the steps after FULL is a refresh step
    assert per_sample == (FULL + 1) * s.num_tokens + (STEPS - FULL - 1) * s.tokens_kept
    assert s.recomputed.shape == (2, 8, 8)
    assert torch.equal(s.recomputed.sum((1, 2)), torch.full((2,), float(per_sample)))


def test_hidden_cache_macs_match_flop_counter():
    harness.check_hidden_cache_macs(SD3, lambda: tiny_sd3("sd35"), inputs(batch=2, height=16, width=16, seed=10))


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device(variant):
    harness.check_meta_device(SD3, lambda: tiny_sd3(variant), inputs(device="meta"))


# forecast_calibration fits the output forecast on the step's own rows, which the masked-dense
# oracle cannot preview; that it compiles without a host sync is checked here
COMPILE_STORES = {**harness.STATEFUL_STORES,
                  "forecast-calibrated": dict(forecast="taylor", refresh_every=2, forecast_calibration="output")}


@pytest.mark.parametrize("store", COMPILE_STORES.values(), ids=COMPILE_STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(SD3, tiny_sd3("sd35", layers=2), inputs(seed=11), patch_kw=store)


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


@pytest.mark.parametrize("selection", ["regions", "cat", "cat-no-staleness", "topk", "random"])
def test_selections_pick_k_unique_tokens(selection):
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", selection=selection)
    state = model._cat_pruning.state
    picks = []

    def record():  # after a fill, refresh or pruned step, idx holds the selection for the next step
        if state.history[-1][0] in ("fill", "refresh", "pruned"):
            picks.append(state.idx.clone())

    run_steps(model, inputs(), STEPS, step_fn=record)
    assert len(picks) == STEPS - FULL + 1
    for idx in picks:
        assert all(len(set(row.tolist())) == state.k for row in idx)
        assert torch.equal(idx, idx.sort(1).values)
    assert any(not torch.equal(a, b) for a, b in zip(picks, picks[1:], strict=False))
    if selection == "regions":  # whole clusters but at most one
        sizes = torch.bincount(state.labels[0], minlength=state.num_clusters)
        for idx in picks:
            taken = torch.bincount(state.labels[0, idx[0]], minlength=state.num_clusters)
            assert int(((taken > 0) & (taken < sizes)).sum()) <= 1, (taken, sizes)
    if selection == "topk":  # the default importance with the Taylor forecast: the forecast's miss
        d = (state.cache.noise - (state.predicted if state.by_error else state.anchor)).norm(dim=-1)
        assert torch.equal(state.idx, d.topk(state.k).indices.sort(1).values)


@pytest.mark.parametrize("forecast_from", ["all", "refresh"])
def test_importance_by_forecast_error_keeps_each_tokens_last_forecast(forecast_from):
    """importance="forecast-error": after a refresh step every token's recorded prediction is the
    forecast that step would have read (previewed between the steps); after a pruned step the
    tokens it computed get theirs (where their rows enter the store), the others keep theirs."""
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, refresh_every=2, forecast_from=forecast_from,
                      importance="forecast-error", backend="torch")
    state = model._cat_pruning.state
    seen, checked = [], []

    def record():
        mode = state.history[-1][0]
        if seen and mode in ("refresh", "pruned"):
            checked.append(mode)
            preview, predicted, idx = seen[-1]
            want = predicted.clone()
            if mode == "refresh":
                want = preview
            elif forecast_from == "all":
                rows = idx[..., None].expand(-1, -1, want.shape[-1])
                want.scatter_(1, rows, preview.gather(1, rows))
            assert torch.equal(state.predicted, want), mode
        if state.allocated and state.mode in ("refresh", "pruned"):
            seen.append((state.cache.skipped_output(), state.predicted.clone(), state.idx.clone()))

    run_steps(model, inputs(), STEPS + 3, step_fn=record)
    assert checked == ["pruned", "refresh", "pruned", "refresh", "pruned", "refresh", "pruned"]


def test_final_full_steps_needs_and_uses_the_step_count():
    """final_full_steps: a bare loop gives the step count with reset(num_steps=...); its last
    steps then run every token; without the count they run as scheduled otherwise, with a warning."""
    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, refresh_every=3, final_full_steps=2, backend="torch")
    state = model._cat_pruning.state
    cat_pruning.reset(model, num_steps=STEPS + 2)
    run_steps(model, inputs(), STEPS + 2)
    modes = [m for m, _ in state.history]
    assert modes[-3:] == ["pruned", "refresh", "refresh"] and modes.count("pruned") == 3, modes
    cat_pruning.reset(model)
    with pytest.warns(RuntimeWarning, match="num_steps"):  # the last steps cannot be found: said, not hidden
        run_steps(model, inputs(), STEPS + 2)
    assert [m for m, _ in state.history][-2:] == ["pruned", "refresh"]
    with pytest.raises(ValueError, match="num_steps"):
        cat_pruning.reset(model, num_steps=0)
