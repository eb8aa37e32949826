"""FLUX.2 (diffusers Flux2Transformer2DModel): double-stream blocks with joint attention, then
single-stream blocks over [text; image] whose attention and MLP share one fused input projection
(``to_qkv_mlp_proj``) and one output projection; a 4-axis rotary. Text-to-image only.

Seams (diffusers 0.36 to 0.42), as for Flux.1 (cat_pruning.adapters.flux) except:

- ``pos_embed`` (Flux2PosEmbed) is called twice per forward, on the image ids and then on the text
  ids, and the forward concatenates the two (L, D) tables along the rows. On a pruned step the
  hook on the first call returns each sample's selected rows flattened, (B * K, D), so the
  concatenation is (T + B * K, D); the CAT processors unflatten it into per-sample (B, T + K, D)
  tables. Which call is the image one is counted per forward (the order of diffusers' forward),
  and its row count is checked against N.
- The single-stream processor (``Flux2ParallelSelfAttnProcessor``) is rewritten with the image K
  (after rotation) and V rows cached, its MLP half and the fused output projection unchanged.
- The modulation is per sample, broadcast over whatever rows a block gets.

The clustering positions are the (row, column) columns 1 and 2 of ``img_ids`` (t, h, w, l).

Reference images (the pipelines' ``image`` argument: Flux2Pipeline, Klein) append their latents
and ids to the image's in every transformer call and the pipeline keeps the image's rows of the
output. The call itself does not say where the image's tokens end, so the pipeline does: at the
call's start (its timesteps) the adapter reads the running call's ``image_latents`` (B, R, C)
and the generation's geometry ends N rows before the input's end (``Geometry.reference``, as
Qwen-Image-Edit's): every step computes the R reference rows, never selected, cached or
forecast; the rotary hook puts their rows (shared by the samples) after the selected ones.

Not supported (a clear error): the KV-cache mode (``kv_cache_mode``: Klein KV), Klein inpainting
(its condition image's tokens follow the image's), reference images under model parallelism,
diffusers' own caching (``enable_cache``), attention masks. Reference tokens passed to a bare
transformer (no pipeline call) are not detected: they would be selected and pruned like image
tokens.

diffusers' model parallelism works as on Flux.1 (cat_pruning.parallel): under Ulysses context
parallelism the model's pre-hook gathers the K selected rows before diffusers splits the
sequence, the rotary hook gives each rank its share of the selection from the table of all N
tokens, and the processors run the all-to-alls around the caches; under tensor parallelism
(diffusers' packed column split of the fused projection) the single-stream processor splits the
projection by its global QKV : MLP ratio, as diffusers' does, and the caches hold the rank's heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..parallel import NONE, Sharding, local_out_features, rank_share
from ..state import CacheLayout, CATState, Geometry
from .base import (
    compute_dtype,
    get_submodule,
    head_dims,
    joint_rows,
    opens_cache_context,
    pipeline_call_local,
    random_inputs,
    refuse_diffusers_cache,
)
from .flux import CATFluxAttnProcessor, FluxAdapter, reference_latents, refuse_parallel_reference

# pipelines whose transformer input always carries a condition image's tokens after the image's
CONDITION_TOKEN_PIPELINES = ("Flux2KleinInpaintPipeline",)

# Real architectures, for MAC counts on the meta device: (transformer config, generation).
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # FLUX.2-dev 1024x1024: 8 double + 48 single blocks, hidden 6144 = 48 heads x 128, VAE f8 with
    # 32 channels -> 128x128 latent packed 2x2 -> 64x64 = 4096 tokens of 128 channels; Mistral-3 text (15360 wide,
    # 512 tokens); guidance-distilled (no CFG batch).
    "flux2-dev-1024": (
        dict(
            patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
            num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
        ),
        dict(latent=128, text=512, batch=1),
    ),
}  # fmt: skip
# FLUX.2-dev 1024x1024 editing one 1024x1024 reference image: 4096 reference tokens after the image's
# (a bare transformer is told them: reset(reference_tokens=...); Flux2Pipeline says them itself)
REAL_CONFIGS["flux2-dev-1024-reference"] = (REAL_CONFIGS["flux2-dev-1024"][0],
                                            dict(latent=128, text=512, batch=1, reference_rows=4096))


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, side, t, ref = gen["batch"], gen["latent"] // 2, gen["text"], gen.get("reference_rows", 0)
    rand = random_inputs(device, dtype)
    ids = image_ids(side, side, device)
    if ref:  # a square reference image after the image, at time coordinate 10 (as Flux2Pipeline's)
        ref_ids = image_ids(math.isqrt(ref), math.isqrt(ref), device)
        ids = torch.cat([ids, ref_ids + torch.tensor([10, 0, 0, 0], device=device)])
    return dict(
        hidden_states=rand(b, side * side + ref, config["in_channels"]),
        encoder_hidden_states=rand(b, t, config["joint_attention_dim"]),
        img_ids=ids,
        txt_ids=text_ids(t, device),
        guidance=torch.full((b,), 4.0, device=device, dtype=dtype) if config.get("guidance_embeds", True) else None,
    )


def image_ids(height: int, width: int, device: str | torch.device = "cpu") -> Tensor:
    """FLUX.2's img_ids of an height x width token grid: (N, 4) with (0, row, col, 0) per token."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], -1)


def text_ids(length: int, device: str | torch.device = "cpu") -> Tensor:
    """FLUX.2's txt_ids: (T, 4) with the token index on the last axis."""
    ids = torch.zeros(length, 4, dtype=torch.int64, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


class CATFlux2AttnProcessor(CATFluxAttnProcessor):
    """FLUX.2's double-stream attention with the image K/V rows cached: Flux.1's CAT processor
    with the pruned steps' rotary table unflattened per sample (module docstring)."""

    def _rope(self, image_rotary_emb: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        state = self.state
        if state.mode != "pruned":
            return image_rotary_emb
        batch, k = state.idx.shape[0], state.idx.shape[1] // state.shard.cp_world  # this rank's rows
        reference = state.geometry.reference  # rows shared by the samples after their selected rows

        def per_sample(freqs: Tensor) -> Tensor:  # (T + B * K + R, D) -> (B, T + K + R, D)
            text = freqs.shape[0] - batch * k - reference
            parts = [freqs[:text].expand(batch, -1, -1), freqs[text:text + batch * k].view(batch, k, -1)]
            if reference:
                parts.append(freqs[text + batch * k:].expand(batch, -1, -1))
            return torch.cat(parts, dim=1)

        return per_sample(image_rotary_emb[0]), per_sample(image_rotary_emb[1])


class CATFlux2ParallelProcessor(CATFlux2AttnProcessor):
    """FLUX.2's single-stream block attention (fused QKV + MLP projection) with the image K/V rows
    of its [text; image] rows cached."""

    def __call__(self, attn: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None, **kwargs: Any) -> Tensor:
        if not self.state.caching:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if attention_mask is not None:
            raise ValueError("cat_pruning: attention masks are not supported on FLUX.2's pruned steps")
        if image_rotary_emb is None:
            raise ValueError("cat_pruning: FLUX.2 attention was called without its rotary embedding")
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv_cols = qkv_width(attn, projected.shape[-1])
        qkv, mlp = projected.split([qkv_cols, projected.shape[-1] - qkv_cols], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        out = self._attend(query, key, value, image_rotary_emb, getattr(self.original, "_attention_backend", None))
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def qkv_width(attn: nn.Module, fused: int) -> int:
    """The Q, K and V columns of a fused (QKV + MLP) projection that computes `fused` columns: its
    global QKV : MLP ratio, which diffusers' packed column split keeps on every rank."""
    qkv = 3 * attn.inner_dim
    return fused * qkv // (qkv + attn.mlp_hidden_dim * attn.mlp_mult_factor)


class Flux2Adapter(FluxAdapter):
    """Flux.1's adapter (the same seams, block names, token geometry and attention shapes) with
    FLUX.2's processors, rotary hook, refusals, cache widths and per-sample linears."""

    family = "FLUX.2 (Flux2Transformer2DModel)"
    model_classes = ("Flux2Transformer2DModel",)

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        cls = CATFlux2ParallelProcessor if name.startswith("single_") else CATFlux2AttnProcessor
        return cls(state, name, attn.processor)

    def check_pipeline(self, pipeline: Any) -> None:
        # Reference and condition images add their tokens to the image sequence: they would be
        # selected, pruned and forecast like the image's. The pipeline's `image` argument is read
        # from its frame (it exists from the call's start; the latents made from it come later).
        name = type(pipeline).__name__
        if name in CONDITION_TOKEN_PIPELINES:
            raise ValueError(f"cat_pruning: {name} adds its condition image's tokens to the image sequence, which "
                             "FLUX.2's patch does not support yet; unpatch to use it")
        if pipeline_call_local(pipeline, "image") is not None and reference_latents(pipeline) is None:
            raise ValueError(f"cat_pruning: {name}'s reference images (its image argument) reach the transformer "
                             "in a way FLUX.2's patch does not know (no image_latents); unpatch to use them")
        if getattr(pipeline, "do_classifier_free_guidance", False) and not opens_cache_context(type(pipeline)):
            raise ValueError(f"cat_pruning: CFG on {name} calls the transformer twice per step without "
                             "transformer.cache_context; unpatch to use it")

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        seen: dict[str, Any] = {"rope_calls": 0}  # fixed keys: torch.compile guards on them

        seen["img_ids"] = None

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            refuse_diffusers_cache(module, patched=True)
            img_ids = kwargs.get("img_ids", args[3] if len(args) > 3 else None)
            if img_ids is None:
                raise ValueError("cat_pruning: FLUX.2 was called without img_ids")
            seen["img_ids"] = img_ids[0] if img_ids.ndim == 3 else img_ids  # all N (+ R), before any split
            refuse_parallel_reference(state)  # (the patch's pre-hook ran first: this call's geometry)
            state.positions = seen["img_ids"][:state.geometry.num_tokens, 1:3].float()
            seen["rope_calls"] = 0
            return self.gather_before_split(state, args, kwargs)

        def rope_hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
            seen["rope_calls"] += 1
            if seen["rope_calls"] != 1 or state.mode != "pruned":  # the first call is the image's
                return None
            shard, n, reference = state.shard, state.geometry.num_tokens, state.geometry.reference
            if output[0].shape[0] != n // shard.cp_world + reference:
                raise RuntimeError(f"cat_pruning: FLUX.2's first rotary call has {output[0].shape[0]} rows, "
                                   f"expected the {n // shard.cp_world + reference} image and reference tokens of "
                                   "this rank (diffusers changed its forward?)")
            idx = state.idx
            if reference:  # the reference rows after every sample's selected rows, once
                return tuple(torch.cat([x[:n][idx].flatten(0, 1), x[n:]]) for x in output)
            if shard.cp_world > 1:  # this rank's share of the selection, from the table of all N tokens
                idx = rank_share(idx, shard)
                output = module.forward(seen["img_ids"])
            return output[0][idx].flatten(0, 1), output[1][idx].flatten(0, 1)

        return [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.pos_embed.register_forward_hook(rope_hook),
        ]

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if kwargs.get("kv_cache_mode") is not None or kwargs.get("kv_cache") is not None:
            raise ValueError("cat_pruning: FLUX.2's reference-image KV cache (kv_cache_mode) is not supported yet; "
                             "unpatch to use reference images")
        joint = set(kwargs.get("joint_attention_kwargs") or {}) - {"scale"}  # LoRA's scale is read before the blocks
        if joint:
            raise ValueError(f"cat_pruning: FLUX.2 joint_attention_kwargs {sorted(joint)} are not supported yet")

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        """(B, N, H*D) K (after rotation) and V caches, in the dtype the K projection computes in (H:
        this rank's heads under model parallelism)."""
        kv = {}
        for name, attn in self.attention_modules(model).items():
            if name.startswith("single_"):
                proj = attn.to_qkv_mlp_proj
                width = qkv_width(attn, local_out_features(proj)) // 3
            else:
                proj = attn.to_k
                width = local_out_features(proj)
            kv[name] = ((geometry.batch, geometry.num_tokens, width // shard.cp_world), compute_dtype(proj))
        out = get_submodule(model, self.out_proj)
        return CacheLayout(kv, out.out_features, compute_dtype(out), head_dims=head_dims(self.attention_modules(model)),
                           joint=joint_rows(kv, geometry))

    def linear_stream(self, name: str) -> str | None:
        if name.startswith(("time_guidance_embed", "double_stream_modulation", "single_stream_modulation")):
            return "sample"
        return super().linear_stream(name)
