"""PixArt-alpha / PixArt-Sigma (diffusers PixArtTransformer2DModel): DiT blocks with adaLN-single.

Each BasicTransformerBlock has an image-only self attention ``attn1`` (cached) and a cross
attention ``attn2`` from the image tokens to the text (no cache: its queries are per token and
its keys/values are the always-computed text, so it keeps its own processor and runs on the K
compacted rows unchanged; the pipeline's ``encoder_attention_mask`` is a (B, 1, T) key bias that
broadcasts over any number of queries). Everything else between ``pos_embed`` (patch embedding
plus the absolute position embedding, so the gather comes after it) and ``proj_out`` is per
token or per sample: the adaLN-single modulation (``adaln_single``, with PixArt-alpha's
resolution / aspect-ratio conditions), the caption projection of the text, the feed-forward,
and the final norm with its scale-shift table. ``proj_out`` is the seam: the model squeezes and
unpatchifies its full (B, N, C_out) output itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..processors import CATSelfAttnProcessor
from ..state import CATState
from .base import Adapter, pipeline_call_local, random_inputs

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the latent side, the text tokens and the transformer batch (CFG halves).
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # PixArt-Sigma-XL-2 1024-MS: 28 blocks, hidden 1152 = 16 heads x 72, 1024x1024 -> 128x128
    # latent, patch 2 -> 4096 image tokens; 300 T5 tokens; learned sigma (8 output channels).
    "pixart-sigma-1024": (
        dict(
            sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
            num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
            interpolation_scale=2, use_additional_conditions=False, attention_bias=True,
            activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
            norm_eps=1e-6, num_embeds_ada_norm=1000,
        ),
        dict(latent=128, text=300, batch=2),
    ),
    # PixArt-alpha-XL-2 1024-MS: the same blocks, 120 T5 tokens, resolution/aspect-ratio conditions.
    "pixart-alpha-1024": (
        dict(
            sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
            num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
            use_additional_conditions=True, attention_bias=True, activation_fn="gelu-approximate",
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
        ),
        dict(latent=128, text=120, batch=2),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, s, t = gen["batch"], gen["latent"], gen["text"]

    rand = random_inputs(device, dtype)

    pixels = torch.full((b, 2), 8.0 * s, device=device, dtype=dtype)
    return dict(
        hidden_states=rand(b, config["in_channels"], s, s),
        encoder_hidden_states=rand(b, t, config["caption_channels"]),
        added_cond_kwargs=dict(resolution=pixels, aspect_ratio=torch.ones(b, 1, device=device, dtype=dtype))
        if config.get("use_additional_conditions") else dict(resolution=None, aspect_ratio=None),
    )


class PixArtAdapter(Adapter):
    family = "PixArt-alpha / PixArt-Sigma (PixArtTransformer2DModel)"
    model_classes = ("PixArtTransformer2DModel",)
    patch_embed = "pos_embed"
    out_proj = "proj_out"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        for i, block in enumerate(model.transformer_blocks):
            if block.pos_embed is not None or block.only_cross_attention or getattr(block, "fuser", None) is not None:
                raise ValueError(f"cat_pruning: transformer_blocks.{i} is not a plain PixArt block; not supported")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"transformer_blocks.{i}.attn1": block.attn1 for i, block in enumerate(model.transformer_blocks)}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATSelfAttnProcessor(state, name, attn.processor)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attention_mask") is not None:
            raise ValueError("cat_pruning: a self-attention mask (attention_mask) is not supported; unpatch to use it")
        cross = kwargs.get("cross_attention_kwargs") or {}
        if "gligen" in cross:
            raise ValueError("cat_pruning: GLIGEN inputs are not supported; unpatch to use them")

    def cfg_pairs(self, pipeline: Any) -> bool:
        # PixArt pipelines keep `do_classifier_free_guidance = guidance_scale > 1` in a local.
        found = getattr(pipeline, "do_classifier_free_guidance", None)
        if found is None:
            found = pipeline_call_local(pipeline, "do_classifier_free_guidance", False)
        return bool(found)

    def linear_stream(self, name: str) -> str | None:
        if name.startswith("adaln_single"):
            return "sample"
        if name.startswith("caption_projection") or name.endswith(("attn2.to_k", "attn2.to_v")):
            return "text"
        if name.startswith(("transformer_blocks", "proj_out")):
            return "image"
        return None

    def cross_attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"transformer_blocks.{i}.attn2": block.attn2 for i, block in enumerate(model.transformer_blocks)
                if block.attn2 is not None}

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        return rows, num_tokens
