"""cat_pruning on tiny random-config Flux transformers against the dense diffusers path."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from flux_models import IN_CHANNELS, JOINT_DIM, POOLED_DIM, TEXT_TOKENS, inputs, run_steps, tiny_flux
from harness import TOL, Family

import cat_pruning

STEPS = 6
FULL = 3
FLUX = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(FLUX, tiny_flux(dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(FLUX, tiny_flux(), inputs(seed=5), patch_kw=store)


class OracleProcessor:
    """Dense Flux attention in which the image K (after rotation) / V rows of unselected tokens
    come from a given cache: the masked-dense oracle of docs/design.md section 3, written with
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


@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(store):
    kw = inputs(batch=3, seed=2)

    def own_selections(idx):  # no CFG batch: every sample has its own selection
        assert not (torch.equal(idx[0], idx[1]) and torch.equal(idx[1], idx[2]))

    # Outputs are token rows already; one step past the horizon (timestep 0).
    harness.check_pruned_steps_match_oracle(FLUX, tiny_flux(), kw, OracleProcessor, lambda o: o,
                                            kw["hidden_states"].shape[1], extra_steps=1, check_idx=own_selections,
                                            patch_kw=store)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    def no_hooks_left(model):
        assert not model._forward_pre_hooks and not model.pos_embed._forward_hooks

    harness.check_unpatch_bitwise(FLUX, tiny_flux(), inputs(seed=3), after_unpatch=no_hooks_left)


def test_batch_samples_are_independent():
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance")
    harness.check_samples_independent(FLUX, tiny_flux(layers=1, single_layers=1), inputs(batch=3, seed=8), keys=batched)


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(FLUX, tiny_flux(), inputs(batch=2, height=8, width=7, seed=10), 17)


def test_hidden_cache_macs_match_flop_counter():
    harness.check_hidden_cache_macs(FLUX, tiny_flux, inputs(batch=2, height=8, width=7, seed=10))


def test_meta_device():
    harness.check_meta_device(FLUX, tiny_flux, inputs(device="meta"))


def test_real_config_macs_on_meta():
    from diffusers import FluxTransformer2DModel

    from cat_pruning.adapters import flux

    harness.check_real_config_macs_on_meta(FLUX, FluxTransformer2DModel, flux, "flux1-dev-1024", num_tokens=4096,
                                           tokens_kept=1229)


@pytest.mark.parametrize("store", harness.HIDDEN_STORES.values(), ids=harness.HIDDEN_STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(FLUX, tiny_flux(layers=1, single_layers=1), inputs(seed=11), patch_kw=store)


def tiny_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = harness.tiny_vae(IN_CHANNELS // 4, levels=2, block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
                           scaling_factor=0.5, shift_factor=0.1)
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
    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert "pruned" in [st.mode for st in s.steps] and s.batch == 2 and s.num_tokens == 30

    harness.check_pipeline(FLUX, tiny_pipeline(), lambda pipe: pipe(**pipeline_kwargs()).images, check_pruned)


@pytest.mark.parametrize("patch_transformer", [False, True], ids=["pipe", "transformer"])
def test_true_cfg_runs_each_branch_as_its_own_patched_model(patch_transformer):
    """FluxPipeline's true CFG calls the transformer twice per step, in cache_context("cond") and
    ("uncond"): each branch must run exactly as a transformer patched on its own that sees only
    that branch's calls (replayed here in a bare loop), so no branch reads the other's caches."""
    import copy

    pipe = tiny_pipeline()
    reference = copy.deepcopy(pipe.transformer)
    config = dict(backend="torch", keep_ratio=0.3, full_steps=FULL, refresh_every=3, final_full_steps=0)
    cat_pruning.patch(pipe.transformer if patch_transformer else pipe, **config)
    calls = []

    def record(module, args, kwargs, output):
        calls.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                      output[0].clone()))  # fmt: skip

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    kw = pipeline_kwargs(batch=1)
    cfg = dict(true_cfg_scale=2.0, negative_prompt_embeds=kw["prompt_embeds"] + 1,
               negative_pooled_prompt_embeds=kw["pooled_prompt_embeds"] + 1)
    for _ in range(2):  # the second call starts a new generation for both branches
        calls.clear()
        pipe(**kw | {"generator": torch.Generator().manual_seed(0)}, **cfg)
        s = cat_pruning.stats(pipe)
        assert s.branches == ("cond", "uncond") and [st.mode for st in s.steps].count("pruned") >= 2
        assert len(calls) == 2 * STEPS
        for branch in (0, 1):  # cond, then uncond, in every step
            cat_pruning.patch(reference, **config, manual_steps=True)
            cat_pruning.reset(reference, num_steps=STEPS)
            for step_kwargs, want in calls[branch::2]:
                got = reference(**step_kwargs)[0]
                cat_pruning.advance(reference)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            ref_stats = cat_pruning.stats(reference)
            cat_pruning.unpatch(reference)
        assert s.macs == 2 * ref_stats.macs and s.macs_dense == 2 * ref_stats.macs_dense
        assert s.cache_bytes == 2 * ref_stats.cache_bytes
    handle.remove()
    # without true CFG only "cond" runs: the next generation releases the "uncond" buffers
    state = pipe.transformer._cat_pruning.state
    for _ in range(2):
        pipe(**kw | {"generator": torch.Generator().manual_seed(0)})
        assert cat_pruning.stats(pipe).branches == ("cond",)
    assert set(state._stores) == set(state._pools) == {"cond"}


def test_true_cfg_in_a_pipeline_without_cache_context_is_refused():
    """Flux pipelines whose true CFG opens no cache_context (img2img, Kontext, ... in diffusers 0.42)
    would run both calls on one set of caches: refused when the generation starts."""
    from diffusers import FluxPipeline

    class NoContextPipeline(FluxPipeline):
        def __call__(self, *args, **kwargs):
            do_true_cfg = True  # noqa: F841 - read by the adapter, as FluxPipeline's local
            self.scheduler.set_timesteps(4)

    base = tiny_pipeline()
    pipe = NoContextPipeline(**base.components)
    cat_pruning.patch(pipe, backend="torch")
    with pytest.raises(ValueError, match="without transformer.cache_context"):
        pipe()


def test_two_branches_compile_to_few_graphs_and_match_eager():
    """Two cache_context branches per step under torch.compile(fullgraph=True): the same outputs as
    eager, a bounded number of graphs (at most twice one branch's bound), none new in a second
    generation."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = tiny_flux(layers=1, single_layers=1)
    kw = inputs(seed=13)
    branches = {"cond": kw, "uncond": {**kw, "encoder_hidden_states": kw["encoder_hidden_states"] + 1}}

    def generation(run):
        cat_pruning.reset(model, num_steps=STEPS)
        x, outs = {b: kw["hidden_states"] for b in branches}, []
        for i in range(STEPS):
            t = torch.full((2,), 1000.0 * (1 - i / STEPS))
            for b, b_kw in branches.items():
                with model.cache_context(b), torch.no_grad():
                    outs.append(run(**{**b_kw, "hidden_states": x[b]}, timestep=t, return_dict=False)[0])
                x[b] = x[b] - 0.1 * outs[-1]
            cat_pruning.advance(model)
        return outs

    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch", manual_steps=True)
    eager = generation(model)
    modes = {s.mode for s in cat_pruning.stats(model).steps}
    assert "pruned" in modes and cat_pruning.stats(model).branches == ("cond", "uncond")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    counters.clear()
    graphs = []
    for _ in range(2):
        harness.assert_all_close(generation(compiled), eager, harness.F32)
        graphs.append(counters["stats"]["unique_graphs"])
    assert 0 < graphs[0] <= 4 * len(modes), (graphs, modes)
    assert graphs[1] == graphs[0], graphs
    torch._dynamo.reset()


def test_a_branch_that_starts_late_is_refused():
    model = tiny_flux(layers=1, single_layers=1)
    cat_pruning.patch(model, backend="torch", manual_steps=True)
    cat_pruning.reset(model, num_steps=STEPS)
    kw, t = inputs(), torch.ones(2)
    with model.cache_context("cond"):
        model(**kw, timestep=t)
    cat_pruning.advance(model)
    with model.cache_context("uncond"), pytest.raises(RuntimeError, match="every guidance branch must run"):
        model(**kw, timestep=t)


def test_unsupported_cases_are_refused():
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



@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_declared_reference_rows_keep_ratio_one_equals_dense(store):
    """A bare loop whose inputs carry 6 reference rows after the 30 image tokens (as Kontext's)
    declares them with reset(reference_tokens=6): computed at every step, never selected."""
    harness.check_reference_rows(FLUX, tiny_flux, inputs(height=6, width=6), 6, patch_kw=store)


def test_kontext_reference_image_is_computed_not_pruned():
    """FluxKontextPipeline: the reference image's latents (and ids) follow the image's in every
    transformer input; the pipeline call says how many (its image_latents), every step computes
    them, only image tokens are selected, the pipeline keeps the image's rows. keep_ratio 1
    equals dense, pruned calls repeat, unpatch restores dense. (max_area: Kontext scales the
    output towards 1024² pixels otherwise.)"""
    from diffusers import FluxKontextPipeline
    from PIL import Image

    base = tiny_pipeline()
    pipe = FluxKontextPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    reference = Image.fromarray((torch.rand(16, 24, 3, generator=g) * 255).to(torch.uint8).numpy())
    rows = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(k["hidden_states"].shape[1]),
                                               with_kwargs=True)

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.num_tokens == 30 and s.reference_tokens == 24 and "pruned" in [st.mode for st in s.steps]
        assert int(pipe.transformer._cat_pruning.state.idx.max()) < 30  # only image tokens are selected

    def call(pipe):
        return pipe(**pipeline_kwargs(batch=1), image=reference, _auto_resize=False, max_area=24 * 20).images

    harness.check_pipeline(FLUX, pipe, call, check_pruned)
    assert set(rows) == {30 + 24}


def test_img2img_image_latents_are_not_reference_rows():
    """FluxImg2ImgPipeline also holds `image_latents`, for its start latents, not appended to the
    transformer input: no reference rows (30 image tokens, 30 rows), keep_ratio 1 equals dense."""
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    base = tiny_pipeline()
    pipe = FluxImg2ImgPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(24, 20, 3, generator=torch.Generator().manual_seed(5)) * 255)
                            .to(torch.uint8).numpy())  # fmt: skip

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.num_tokens == 30 and s.reference_tokens == 0 and "pruned" in [st.mode for st in s.steps]

    kw = {k: v for k, v in pipeline_kwargs(batch=1).items() if k != "generator"}
    harness.check_pipeline(FLUX, pipe, lambda p: p(**kw, image=image, strength=0.9,
                                                   generator=torch.Generator().manual_seed(0)).images, check_pruned)
