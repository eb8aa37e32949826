"""Flux.1 dev / schnell (diffusers FluxTransformer2DModel): MM-DiT double-stream blocks, then
single-stream blocks over the concatenated [text; image] residual stream, with rotary position
embeddings.

Seams (diffusers 0.42.1):

- ``x_embedder`` (a Linear over the packed latent tokens) is the patch embedding: its output is
  gathered to the K selected rows. There is no absolute position embedding.
- ``pos_embed`` (FluxPosEmbed) turns ``cat(txt_ids, img_ids)`` into one shared (cos, sin) pair
  of shape (T + N, D). A forward hook keeps the text rows and gathers the image rows of each
  sample's selection, so on a pruned step the rotary is per sample: (B, T + K, D). The stock
  ``apply_rotary_emb`` only broadcasts a shared (L, D) table, so the CAT processors apply the
  rotation themselves (the same arithmetic, for both shapes).
- Attention (``FluxAttention``; stock ``FluxAttnProcessor``): CAT processors compute q, k, v of
  the rows they get, rotate, write the image keys *after rotation* and the image values into a
  (B, N, H*D) cache and attend the T + K queries over the T text keys plus the N cached image
  keys, through diffusers' ``dispatch_attention_fn`` with the backend the replaced processor
  had. The single-stream blocks' attention sees [text; image] rows without a separate context:
  it splits them at T = rows - (K or N).
- ``proj_out`` is the output seam. Flux returns packed tokens (B, N, C_out), unpacked by the
  pipeline, so the full noise cache is the model output.

Under diffusers' Ulysses context parallelism (cat_pruning.parallel) a pruned step gathers the K
selected rows of ``hidden_states`` in the model's pre-hook, before diffusers splits the sequence;
the rotary hook builds each rank's rows from the table of all N tokens, and the processors run
the Ulysses all-to-alls themselves around the K/V caches (all N tokens, the rank's heads).
Under tensor parallelism the projections are column-sharded: the caches hold the rank's heads.

The clustering needs token positions; Flux's inputs carry no grid shape, only ``img_ids``, whose
columns 1 and 2 are the (row, col) of every image token in token units, so they are used as the
clustering positions (``state.positions``).

FluxPipeline's true CFG (true_cfg_scale > 1 with a negative prompt) calls the transformer twice
per step, inside ``transformer.cache_context("cond")`` and ``("uncond")``: each branch has its own
caches and selection (cat_pruning.state, branches). Flux pipelines whose true CFG opens no
context (img2img, inpaint, Kontext in diffusers 0.42) are refused when they use it.
Guidance-distilled Flux has no CFG batch: every sample has its own selection.

Kontext's reference image (FluxKontextPipeline's ``image``) appends its latents and ids to the
image's in every call: the pipeline call says how many rows (its ``image_latents``, read at the
call's start), and they become reference rows (``Geometry.reference``), computed at every step and
never pruned; the rotary hook puts their rows after each sample's selected rows. A bare loop
declares them with ``cat_pruning.reset(model, reference_tokens=R)``.

Not supported (a clear error): diffusers' own caching (``enable_cache``), ControlNet residuals,
IP-Adapter, fused QKV projections, attention masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..parallel import NONE, Sharding, rank_share
from ..processors import CachedAttentionProcessor
from ..state import CacheLayout, CATState, Geometry
from .base import (
    Adapter,
    appends_image_latents,
    get_submodule,
    hidden_states_arg,
    opens_cache_context,
    pipeline_call_local,
    random_inputs,
    refuse_diffusers_cache,
)

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the VAE latent side (packed 2x2 into tokens), the text tokens and the
# transformer batch.
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # FLUX.1-dev 1024x1024: 19 double + 38 single blocks, hidden 3072 = 24 heads x 128, VAE f8 ->
    # 128x128x16 latent packed 2x2 -> 64x64 = 4096 tokens of 64 channels; 512 T5 tokens;
    # guidance-distilled (guidance embedding, no CFG batch).
    "flux1-dev-1024": (
        dict(
            patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ),
        dict(latent=128, text=512, batch=1),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, side, t = gen["batch"], gen["latent"] // 2, gen["text"]

    rand = random_inputs(device, dtype)

    return dict(
        hidden_states=rand(b, side * side, config["in_channels"]),
        encoder_hidden_states=rand(b, t, config["joint_attention_dim"]),
        pooled_projections=rand(b, config["pooled_projection_dim"]),
        img_ids=image_ids(side, side, device),
        txt_ids=torch.zeros(t, 3, device=device),
        guidance=torch.full((b,), 3.5, device=device, dtype=dtype) if config.get("guidance_embeds") else None,
    )


def image_ids(height: int, width: int, device: str | torch.device = "cpu") -> Tensor:
    """Flux's img_ids of an height x width token grid: (N, 3) with (0, row, col) per token."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).float()


def reference_latents(pipeline: Any) -> Tensor | None:
    """The reference images' packed latents (B, R, C) of the running pipeline call, or None:
    FluxKontextPipeline, Flux2Pipeline and Klein append them to the image's latents in every
    transformer input (their ids to the image's ids) and keep the first N rows of the output.
    (img2img, inpaint and fill pipelines keep theirs for blending: not reference rows.)"""
    if not appends_image_latents(type(pipeline)):
        return None
    latents = pipeline_call_local(pipeline, "image_latents")
    return latents if isinstance(latents, Tensor) and latents.ndim == 3 else None


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rot(x) * sin with rot pairing channels (2i, 2i+1) -> (-x[2i+1], x[2i]), in fp32:
    diffusers' apply_rotary_emb(use_real_unbind_dim=-1, sequence_dim=1), for x (B, L, H, D) and
    cos/sin either shared (L, D) or per sample (B, L, D)."""
    cos, sin = cos.unsqueeze(-2).to(x.device), sin.unsqueeze(-2).to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class CATFluxAttnProcessor(CachedAttentionProcessor):
    """Flux attention with the image K (after rotation) and V rows cached between steps.

    Double-stream blocks call it with the image rows and a separate text context
    (``encoder_hidden_states``) and get (image, text) outputs; single-stream blocks call it with
    [text; image] rows and get the attention output of all of them (no output projection).
    In the dense modes it defers to the processor it replaced, so those steps are the unpatched
    computation exactly; "fill" computes the same thing and keeps the image K/V.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        state = self.state
        if not state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if attention_mask is not None:
            raise ValueError("cat_pruning: attention masks are not supported on Flux's pruned steps")
        if image_rotary_emb is None:
            raise ValueError("cat_pruning: Flux attention was called without its rotary embedding")

        head_dim = attn.head_dim
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        if encoder_hidden_states is not None:  # double stream: [text; image] like the stock processor
            ctx_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim)))
            ctx_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim)))
            ctx_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            query = torch.cat([ctx_query, query], dim=1)
            key = torch.cat([ctx_key, key], dim=1)
            value = torch.cat([ctx_value, value], dim=1)
        out = self._attend(query, key, value, image_rotary_emb, getattr(self.original, "_attention_backend", None))
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        ctx_out, image_out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(ctx_out.contiguous())

    def _rope(self, image_rotary_emb: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The (cos, sin) tables as the rotation takes them: shared (L, D) or per sample (B, L, D)."""
        return image_rotary_emb

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, image_rotary_emb: tuple[Tensor, Tensor],
                backend: Any) -> Tensor:
        """[text; image] rows (B, L, H, D) of this call, before the rotation -> the attention
        output (B, L, H*D): rotated, then attended over the text keys and every image token's
        cached keys."""
        cos, sin = self._rope(image_rotary_emb)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        return self._attend_text_image(query, key, value, backend)


def refuse_parallel_reference(state: CATState) -> None:
    if state.geometry.reference and state.shard is not NONE:
        raise ValueError("cat_pruning: Flux reference images under diffusers' model parallelism are not supported "
                         "yet; run them in one process per GPU (data parallelism)")


class FluxAdapter(Adapter):
    family = "Flux.1 (FluxTransformer2DModel)"
    model_classes = ("FluxTransformer2DModel",)
    patch_embed = "x_embedder"
    out_proj = "proj_out"
    supports_parallel = True  # Ulysses context parallelism and tensor parallelism (cat_pruning.parallel)
    gathers_at_input = True  # diffusers splits the sequence at the model's input, before x_embedder

    def check_model(self, model: nn.Module) -> None:
        refuse_diffusers_cache(model)
        super().check_model(model)
        get_submodule(model, "pos_embed")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        found = {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(model.transformer_blocks)}
        found.update({f"single_transformer_blocks.{i}.attn": b.attn
                      for i, b in enumerate(model.single_transformer_blocks)})
        return found

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATFluxAttnProcessor(state, name, attn.processor)

    def check_pipeline(self, pipeline: Any) -> None:
        # True CFG (a __call__ local) is two calls per step, one per branch, never a CFG batch. The
        # branches are told apart by transformer.cache_context: a pipeline that does not open one
        # (FluxImg2Img, Kontext, ... in diffusers 0.42) is refused here, in eager code, because a
        # compiled transformer could not count its calls per step.
        if pipeline_call_local(pipeline, "do_true_cfg", False) and not opens_cache_context(type(pipeline)):
            raise ValueError(
                f"cat_pruning: true CFG on {type(pipeline).__name__} (true_cfg_scale > 1 with a negative prompt) "
                "calls the transformer twice per step without transformer.cache_context, so the two calls would "
                "share one set of caches; use FluxPipeline (which opens one per branch), the guidance-distilled "
                "guidance (guidance_scale), or unpatch")

    def cfg_pairs(self, pipeline: Any) -> bool:
        return False  # true CFG is two calls per step, one per branch (cache_context), never a CFG batch

    def reference_rows(self, pipeline: Any) -> int:
        latents = reference_latents(pipeline)
        return 0 if latents is None else latents.shape[1]

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        seen: dict[str, Tensor | None] = {"img_ids": None}  # fixed keys: torch.compile guards on them

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            refuse_diffusers_cache(module, patched=True)
            img_ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
            if img_ids is None:
                raise ValueError("cat_pruning: Flux was called without img_ids")
            seen["img_ids"] = img_ids[0] if img_ids.ndim == 3 else img_ids  # all N (+ R), before any split
            refuse_parallel_reference(state)
            state.positions = seen["img_ids"][:state.geometry.num_tokens, 1:3]
            return self.gather_before_split(state, args, kwargs)

        def rope_hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
            if state.mode != "pruned":
                return None
            idx, shard, n, reference = state.idx, state.shard, state.geometry.num_tokens, state.geometry.reference
            text = output[0].shape[0] - n // shard.cp_world - reference  # this rank's text rows
            if shard.cp_world == 1:
                image = output[0][text:], output[1][text:]
            else:  # this rank's share of the selection, from the table of all N tokens
                idx = rank_share(idx, shard)
                image = module.forward(seen["img_ids"])

            def select(freqs: Tensor, image: Tensor) -> Tensor:  # -> (B, text + K (+ R), D)
                rows = [freqs[:text], image[:n][idx], *([image[n:]] if reference else [])]
                return torch.cat([r.expand(idx.shape[0], -1, -1) if r.ndim == 2 else r for r in rows], dim=1)

            return select(output[0], image[0]), select(output[1], image[1])

        return [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.pos_embed.register_forward_hook(rope_hook),
        ]

    @staticmethod
    def gather_before_split(state: CATState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The model pre-hook's new arguments under context parallelism on a pruned step: the K
        selected rows of ``hidden_states``, gathered before diffusers splits the sequence, so each
        rank carries K / W of them (the patch embedding is per token: the same rows)."""
        if state.shard.cp_world == 1 or state.mode != "pruned":  # (this order: no guard on the mode)
            return None
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": state.gather(kwargs["hidden_states"])}
        return (state.gather(args[0]), *args[1:]), kwargs

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if any(kwargs.get(k) is not None for k in ("controlnet_block_samples", "controlnet_single_block_samples")):
            raise ValueError("cat_pruning: ControlNet residuals are not supported yet; unpatch to use ControlNet")
        joint = kwargs.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in joint or "ip_hidden_states" in joint:
            raise ValueError("cat_pruning: IP-Adapter inputs are not supported yet; unpatch to use IP-Adapter")

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict) -> Geometry:
        hidden = hidden_states_arg(args, kwargs)  # packed tokens (B, N, C); the grid is in img_ids
        b, n, _ = hidden.shape
        return Geometry(b, 1, n, hidden.dtype, hidden.device)

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        return self.flat_cache_layout(model, geometry, shard)

    def linear_stream(self, name: str) -> str | None:
        if name.startswith(("time_text_embed", "norm_out")) or ".norm1" in name or ".norm." in name:
            return "sample"
        if name.startswith("x_embedder"):
            return "patch"
        if name.startswith("context_embedder") or ".add_" in name or "to_add_out" in name or "ff_context" in name:
            return "text"
        if name.startswith("single_transformer_blocks"):
            return "joint"
        if name.startswith(("transformer_blocks", "proj_out")):
            return "image"
        return None

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        return rows + text, num_tokens + text
