"""DiT (diffusers DiTTransformer2DModel): class-conditional DiT blocks with adaLN-zero.

Each BasicTransformerBlock (norm_type "ada_norm_zero") has one image-only self attention
``attn1`` (cached) and no cross attention; the adaLN-zero modulation comes from the timestep
and class label (per sample). The output layers are ``proj_out_1`` (shift/scale from the
conditioning, per sample) and ``proj_out_2`` (per token): ``proj_out_2`` is the seam, and its
output covers every channel, the learned sigma included (out_channels = 2 * in_channels), so the
noise cache does too. The model unpatchifies a square grid from its full output itself.

DiTPipeline's CFG batch is [cond; null class] (``cfg_cond_first``) and it keeps its guidance
switch (``guidance_scale > 1``) in a local of ``__call__``, read with ``pipeline_call_local``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..processors import CATSelfAttnProcessor
from ..state import CATState
from .base import Adapter, pipeline_call_local, random_inputs

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the latent side, the text tokens (none) and the transformer batch (CFG).
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # DiT-XL/2 at 512x512: 28 blocks, hidden 1152 = 16 heads x 72, 64x64 latent, patch 2 ->
    # 1024 image tokens; learned sigma (8 output channels); 1000 ImageNet classes.
    "dit-xl-2-512": (
        dict(
            sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
            num_attention_heads=16, attention_head_dim=72, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
        ),
        dict(latent=64, text=0, batch=2),
    ),
    # DiT-XL/2 at 256x256: 32x32 latent -> 256 image tokens.
    "dit-xl-2-256": (
        dict(
            sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28,
            num_attention_heads=16, attention_head_dim=72, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
        ),
        dict(latent=32, text=0, batch=2),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded. Class labels: [cond; null class]."""
    b, s = gen["batch"], gen["latent"]
    hidden = random_inputs(device, dtype)(b, config["in_channels"], s, s)
    null = config["num_embeds_ada_norm"]
    labels = torch.tensor([i % null for i in range(b // 2)] + [null] * (b - b // 2), device=device)
    return dict(hidden_states=hidden, class_labels=labels)


class DiTAdapter(Adapter):
    family = "DiT (DiTTransformer2DModel)"
    model_classes = ("DiTTransformer2DModel",)
    patch_embed = "pos_embed"
    out_proj = "proj_out_2"
    cfg_cond_first = True

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        for i, block in enumerate(model.transformer_blocks):
            if block.pos_embed is not None or block.attn2 is not None or getattr(block, "fuser", None) is not None:
                raise ValueError(f"cat_pruning: transformer_blocks.{i} is not a plain DiT block; not supported")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"transformer_blocks.{i}.attn1": block.attn1 for i, block in enumerate(model.transformer_blocks)}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATSelfAttnProcessor(state, name, attn.processor)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        cross = kwargs.get("cross_attention_kwargs") or {}
        if "gligen" in cross:
            raise ValueError("cat_pruning: GLIGEN inputs are not supported; unpatch to use them")

    def cfg_pairs(self, pipeline: Any) -> bool:
        found = getattr(pipeline, "do_classifier_free_guidance", None)
        if found is None:  # DiTPipeline: CFG iff guidance_scale > 1, a local of its __call__
            found = pipeline_call_local(pipeline, "guidance_scale", 1.0) > 1
        return bool(found)

    def text_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> int:
        return 0

    def linear_stream(self, name: str) -> str | None:
        if ".norm1." in name or name.startswith("proj_out_1"):
            return "sample"  # adaLN-zero conditioning: timestep/class embedding and modulation
        if name.startswith(("transformer_blocks", "proj_out_2")):
            return "image"
        return None

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        return rows, num_tokens

    def macs_per_sample(self, model: nn.Module, rows: int, num_tokens: int, text: int) -> int:
        total = super().macs_per_sample(model, rows, num_tokens, text)
        # The output layers embed the timestep and class again with block 0's embedder.
        emb = model.transformer_blocks[0].norm1.emb
        return total + sum(m.in_features * m.out_features for m in emb.modules() if isinstance(m, nn.Linear))
