"""SD3 / SD3.5 (diffusers SD3Transformer2DModel): MM-DiT joint attention over [image; text].

SD3.5 adds RMS qk-norm (handled by the processor as the stock one does) and, in its first
blocks, a second image-only self attention ``attn2`` (cached like ``attn``). The last block is
``context_pre_only``: its text stream produces no output, which the processor respects.
"""

from __future__ import annotations

from torch import nn

from ..processors import CATJointAttnProcessor
from ..state import CATState
from .base import Adapter, random_inputs


class SD3Adapter(Adapter):
    family = "SD3 / SD3.5 (SD3Transformer2DModel)"
    model_classes = ("SD3Transformer2DModel",)
    patch_embed = "pos_embed"
    out_proj = "proj_out"

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        found = {}
        for i, block in enumerate(model.transformer_blocks):
            found[f"transformer_blocks.{i}.attn"] = block.attn
            if getattr(block, "attn2", None) is not None:
                found[f"transformer_blocks.{i}.attn2"] = block.attn2
        return found

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATJointAttnProcessor(state, name, attn.processor)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if kwargs.get("block_controlnet_hidden_states") is not None:
            raise ValueError("cat_pruning: ControlNet residuals are not supported yet; unpatch to use ControlNet")
        joint = kwargs.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in joint or "ip_hidden_states" in joint:
            raise ValueError("cat_pruning: IP-Adapter inputs are not supported yet; unpatch to use IP-Adapter")
        if kwargs.get("skip_layers") is not None:
            raise ValueError("cat_pruning: skip-layer guidance (skip_layers) is not supported; unpatch to use it")

    def linear_stream(self, name: str) -> str | None:
        if name.startswith(("time_text_embed", "norm_out")) or ".norm1" in name:
            return "sample"
        if name.startswith("context_embedder") or "add_" in name or "_context" in name:
            return "text"
        if name.startswith(("transformer_blocks", "proj_out")):
            return "image"
        return None

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        if name.endswith("attn2"):
            return rows, num_tokens
        return rows + text, num_tokens + text


REAL_CONFIGS: dict[str, tuple[dict, dict[str, int]]] = {
    # SD3-medium at 1024x1024: 24 MM-DiT blocks, hidden 1536 = 24 heads x 64, 128x128 latent,
    # patch 2 -> 4096 image tokens; 333 text tokens (77 CLIP + 256 T5); CFG batch 2.
    "sd3-medium-1024": (
        dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        ),
        dict(latent=128, text=333, batch=2),
    ),
    # SD3.5-medium at 1024x1024: dual attention (attn2) in blocks 0-12, RMS qk-norm.
    "sd35-medium-1024": (
        dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        dict(latent=128, text=333, batch=2),
    ),
}


def real_inputs(config: dict, gen: dict[str, int], device, dtype) -> dict:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, s, t = gen["batch"], gen["latent"], gen["text"]

    rand = random_inputs(device, dtype)

    return dict(
        hidden_states=rand(b, config["in_channels"], s, s),
        encoder_hidden_states=rand(b, t, config["joint_attention_dim"]),
        pooled_projections=rand(b, config["pooled_projection_dim"]),
    )
