"""cat_pruning on tiny random-config FLUX.2 transformers against the dense diffusers path."""

from __future__ import annotations

import harness
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from flux2_models import JOINT_DIM, TEXT_TOKENS, inputs, run_steps, tiny_flux2
from harness import TOL, Family

import cat_pruning

STEPS = 6
FULL = 3
FLUX2 = Family(run_steps, STEPS, FULL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_keep_ratio_one_equals_dense(dtype, store):
    harness.check_keep_ratio_one_equals_dense(FLUX2, tiny_flux2(dtype=dtype), inputs(dtype=dtype), TOL[dtype],
                                              patch_kw=store)


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_dense_steps_equal_unpatched(store):
    harness.check_dense_steps_equal_unpatched(FLUX2, tiny_flux2(), inputs(seed=5), patch_kw=store)


class OracleProcessor:
    """Dense FLUX.2 attention (double-stream and the fused single-stream blocks) in which the image
    K (after rotation) / V rows of unselected tokens come from a given cache: the masked-dense
    oracle of docs/design.md section 3, written with diffusers' own apply_rotary_emb and
    independently of cat_pruning's processors."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, :, None, None]

    def __call__(self, attn, hidden_states, *args):
        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        # the two attention modules call their processor with positional arguments
        single = hasattr(attn, "to_qkv_mlp_proj")
        encoder_hidden_states, _, image_rotary_emb = (None, *args) if single else args
        if single:
            qkv, mlp = attn.to_qkv_mlp_proj(hidden_states).split(
                [3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor], dim=-1)
            q, k, v = (heads(x) for x in qkv.chunk(3, dim=-1))
        else:
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
        k_img = torch.where(self.selected, k[:, text:], self.k_cache.view(b, n, -1, attn.head_dim))
        v_img = torch.where(self.selected, v[:, text:], self.v_cache.view(b, n, -1, attn.head_dim))
        k, v = torch.cat([k[:, :text], k_img], 1), torch.cat([v[:, :text], v_img], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        if single:
            return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
        return attn.to_out[0](out[:, text:]), attn.to_add_out(out[:, :text])


@pytest.mark.parametrize("store", harness.STATEFUL_STORES.values(), ids=harness.STATEFUL_STORES.keys())
def test_pruned_steps_match_masked_dense_oracle(store):
    kw = inputs(batch=3, seed=2)

    def own_selections(idx):  # no CFG batch: every sample has its own selection
        assert not (torch.equal(idx[0], idx[1]) and torch.equal(idx[1], idx[2]))

    harness.check_pruned_steps_match_oracle(FLUX2, tiny_flux2(), kw, OracleProcessor, lambda o: o,
                                            kw["hidden_states"].shape[1], extra_steps=1, check_idx=own_selections,
                                            patch_kw=store)


def test_unpatch_is_bitwise_and_patch_twice_equals_once():
    def no_hooks_left(model):
        assert not model._forward_pre_hooks and not model.pos_embed._forward_hooks

    harness.check_unpatch_bitwise(FLUX2, tiny_flux2(), inputs(seed=3), after_unpatch=no_hooks_left)


def test_batch_samples_are_independent():
    batched = ("hidden_states", "encoder_hidden_states", "guidance")
    harness.check_samples_independent(FLUX2, tiny_flux2(layers=1, single_layers=1), inputs(batch=3, seed=8),
                                      keys=batched)


def test_stats_macs_match_flop_counter():
    harness.check_macs_match_flop_counter(FLUX2, tiny_flux2(), inputs(batch=2, height=8, width=7, seed=10), 17)


def test_meta_device():
    harness.check_meta_device(FLUX2, tiny_flux2, inputs(device="meta"))


def test_real_config_macs_on_meta():
    from diffusers import Flux2Transformer2DModel

    from cat_pruning.adapters import flux2

    harness.check_real_config_macs_on_meta(FLUX2, Flux2Transformer2DModel, flux2, "flux2-dev-1024", num_tokens=4096,
                                           tokens_kept=1229)
    edit = harness.check_real_config_macs_on_meta(FLUX2, Flux2Transformer2DModel, flux2, "flux2-dev-1024-reference",
                                                  num_tokens=4096, tokens_kept=1229)
    assert edit.reference_tokens == 4096


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_torch_compile_fullgraph_matches_eager_with_few_graphs(store):
    harness.check_compile_fullgraph(FLUX2, tiny_flux2(layers=1, single_layers=1), inputs(seed=11), patch_kw=store)


def tiny_pipeline(cls_name: str = "Flux2Pipeline", **extra):
    """A stock FLUX.2 pipeline around a tiny transformer and a tiny VAE; prompts come as
    embeddings (no text encoder)."""
    import diffusers
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                             sample_size=32).eval()
    pipe = getattr(diffusers, cls_name)(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                        tokenizer=None, transformer=tiny_flux2(), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(batch: int = 2, seed: int = 0) -> dict:
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=torch.Generator().manual_seed(seed + 100)),
        height=24, width=20, num_inference_steps=6, guidance_scale=4.0, output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    )


def test_pipeline_patch_runs_twice_and_keep_ratio_one_equals_dense():
    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert "pruned" in [st.mode for st in s.steps] and s.batch == 2 and s.num_tokens == 30

    harness.check_pipeline(FLUX2, tiny_pipeline(), lambda pipe: pipe(**pipeline_kwargs()).images, check_pruned)


def test_pipeline_reference_images_are_computed_not_pruned():
    """Flux2Pipeline with reference images: their latents (and ids) follow the image's in every
    transformer input; every step computes them, they are never selected, the pipeline keeps the
    image's rows of the output. keep_ratio 1 equals dense (the reference rows' rotary rows follow
    the selected ones), pruned calls repeat, unpatch restores dense."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    references = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
                  for h, w in ((64, 96), (64, 64))]  # fmt: skip
    pipe = tiny_pipeline()
    rows = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: rows.append(k["hidden_states"].shape[1]),
                                               with_kwargs=True)

    def check_pruned(pipe):
        s = cat_pruning.stats(pipe)
        assert s.num_tokens == 30 and s.reference_tokens == rows[-1] - 30 > 0 and "pruned" in [st.mode for st in
                                                                                              s.steps]
        assert int(pipe.transformer._cat_pruning.state.idx.max()) < 30  # only image tokens are selected

    harness.check_pipeline(FLUX2, pipe, lambda p: p(image=references, **pipeline_kwargs(batch=1)).images,
                           check_pruned)
    assert len(set(rows)) == 1 and rows[0] > 30


@pytest.mark.parametrize("store", harness.STORES.values(), ids=harness.STORES.keys())
def test_declared_reference_rows_keep_ratio_one_equals_dense(store):
    """A bare loop whose inputs carry 6 reference rows after the 30 image tokens declares them
    with reset(reference_tokens=6): computed at every step, never selected."""
    harness.check_reference_rows(FLUX2, tiny_flux2, inputs(height=6, width=6), 6, patch_kw=store)


def test_reference_tokens_are_refused_where_they_cannot_apply():
    from qwen_models import inputs as qwen_inputs
    from qwen_models import tiny_qwen

    model = tiny_flux2()
    cat_pruning.patch(model, backend="torch")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reference_tokens must be an int >= 0"):
            cat_pruning.reset(model, reference_tokens=bad)
    cat_pruning.reset(model, reference_tokens=30)
    with pytest.raises(ValueError, match="30 reference tokens, but the input has only 30 rows"):
        model(**inputs(), timestep=torch.ones(2))
    if tuple(int(p) for p in __import__("diffusers").__version__.split(".")[:2]) >= (0, 42):
        qwen = tiny_qwen(layers=1)
        cat_pruning.patch(qwen, backend="torch")
        cat_pruning.reset(qwen, reference_tokens=4)
        with pytest.raises(ValueError, match="say their reference rows themselves"):
            qwen(**qwen_inputs(reference=((2, 2),)), timestep=torch.ones(2))
        with pytest.raises(ValueError, match="image tokens come as a flat list"):
            qwen(**qwen_inputs(), timestep=torch.ones(2))


@pytest.mark.parametrize("cfg_pairs", [None, False], ids=["cfg-auto", "cfg-given"])
def test_condition_images_and_kv_cache_are_refused(cfg_pairs):
    """Refused before any pruned step, also when the config gives cfg_pairs (which skips reading
    the pipeline's guidance)."""
    from PIL import Image

    model = tiny_flux2()
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=FULL, backend="torch")
    t = torch.ones(2)
    for kv in (dict(kv_cache_mode="extract", num_ref_tokens=4), dict(kv_cache=object())):
        with pytest.raises(ValueError, match="kv_cache_mode"):
            model(**inputs(), timestep=t, **kv)
    if not hasattr(__import__("diffusers"), "Flux2KleinInpaintPipeline"):
        return  # diffusers before 0.42 has no Klein pipelines
    inpaint = tiny_pipeline("Flux2KleinInpaintPipeline", is_distilled=True)
    cat_pruning.patch(inpaint, keep_ratio=0.3, full_steps=FULL, backend="torch", cfg_pairs=cfg_pairs)
    calls = []
    inpaint.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    kw = {k: v for k, v in pipeline_kwargs(batch=1).items() if k not in ("height", "width")}
    with pytest.raises(ValueError, match="condition image"):
        inpaint(image=Image.new("RGB", (32, 32), (200, 30, 40)), mask_image=Image.new("L", (32, 32), 255),
                height=32, width=32, strength=1.0, **{**kw, "guidance_scale": 1.0})
    assert not calls  # refused before the transformer ran
