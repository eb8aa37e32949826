"""Wan 2.1 / 2.2 video (diffusers WanTransformer3DModel): DiT blocks over the video's tokens, each a
rotary self attention ``attn1``, a cross attention ``attn2`` to the text (and, in image-to-video,
the CLIP image tokens), and a feed-forward, modulated per sample (or per token: Wan 2.2 TI2V).

Seams (diffusers 0.42.1):

- ``patch_embedding`` is a Conv3d whose kernel equals its stride, so it is per patch: its output
  (B, C, F, H, W) has one column per token, frame-major. On a pruned step the hook returns the K
  selected columns as (B, C, K, 1, 1), which the model flattens to the (B, K, C) rows it runs.
- ``rope`` returns one (cos, sin) pair of shape (1, N, 1, D) for all tokens; a forward hook
  gathers each sample's selected rows on a pruned step, (B, K, 1, D), which the stock rotation
  broadcasts over the heads as it does the shared table.
- ``attn1`` (stock ``WanAttnProcessor``, self attention with rotary and RMS qk-norm across the
  heads): the CAT processor computes q, k, v of its rows, rotates them with the stock
  arithmetic, writes the keys *after rotation* and the values into (B, N, H*D) caches and
  attends the K queries over all N keys (CachedAttentionProcessor._attend_text_image, no text).
- ``attn2`` keeps its processor: its queries are per token, its keys the text (and image) context.
- A per-token timestep (B, N) (WanPipeline with ``expand_timesteps``: Wan 2.2 TI2V-5B) is
  gathered to the K selected tokens' in a model pre-hook, so the time embedding, the blocks'
  modulation and the output's shift/scale all run on the K rows.
- ``proj_out`` is the output seam: its (B, N, C_out) rows are what the model unpatchifies.

The clustering and the "regions" selection see each token's (frame, row, col).

The pipelines call the transformer once per CFG branch inside ``transformer.cache_context("cond")``
/ ``("uncond")``: each branch has its own caches and selection (cat_pruning.state).

Wan 2.2 A14B is two experts, ``transformer`` for the timesteps at or above the pipeline's
``boundary_ratio`` and ``transformer_2`` below it: patching the pipeline patches both, each with its
own caches and its own schedule over the steps it runs, so the second expert starts with its own
dense steps at the switch (its caches cannot come from the other expert's weights).

diffusers' Ulysses context parallelism (cat_pruning.parallel): Wan's plan splits the sequence at
the first block's input, after ``patch_embedding``, so a pruned step's K rows are gathered at the
patch embedding as in one process and split there (K / W per rank), and so is a per-token
timestep (split at the model's input, after the pre-hook gathered it). diffusers also splits
``rope``'s output: the rotary hook gives each rank its share of the selection from the table of
all N tokens (the class's forward). The CAT processor runs the all-to-alls around the caches
(the rank's heads, all N tokens). Wan has no tensor-parallel plan in diffusers.

Not supported yet (a clear error): ring attention, diffusers' own caching (``enable_cache``),
fused QKV projections, attention masks.

MACs: the I2V models' image-context tokens (257, Wan 2.1 I2V) are counted as context rows of
the text embedding and of both cross-attention key/value projections (they run through one of
them), a slight overcount beside the N video tokens; TI2V's per-token time embedding is counted
once per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..parallel import NONE, Sharding, rank_share
from ..processors import CachedAttentionProcessor
from ..state import CacheLayout, CATState, Geometry
from .base import (
    Adapter,
    encoder_hidden_states_arg,
    get_submodule,
    hidden_states_arg,
    random_inputs,
    refuse_diffusers_cache,
)

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the latent frames and the latent height and width (before the 1x2x2
# patches), the text tokens (umT5, 512) and the batch (one CFG branch per call).
_WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6)
_WAN21_14B = dict(_WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # Wan 2.1 T2V 1.3B, 832x480, 81 frames: VAE 4x8x8 -> 21 x 60 x 104 latent -> 21 x 30 x 52 = 32,760 tokens
    "wan2.1-1.3b-480p": (_WAN21_1_3B, dict(frames=21, height=60, width=104, text=512, batch=1)),
    # 1280x720, 81 frames: 21 x 45 x 80 = 75,600 tokens
    "wan2.1-1.3b-720p": (_WAN21_1_3B, dict(frames=21, height=90, width=160, text=512, batch=1)),
    "wan2.1-14b-480p": (_WAN21_14B, dict(frames=21, height=60, width=104, text=512, batch=1)),
    "wan2.1-14b-720p": (_WAN21_14B, dict(frames=21, height=90, width=160, text=512, batch=1)),
    # Wan 2.2 TI2V 5B, 1280x704, 121 frames: VAE 4x16x16 (48 channels) -> 31 x 44 x 80 latent -> 31 x 22 x 40
    # = 27,280 tokens (counted with one timestep per sample; its pipeline's per-token timestep embeds
    # each computed token's, about 1.5% more MACs)
    "wan2.2-ti2v-5b-720p": (
        dict(_WAN21_1_3B, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336),
        dict(frames=31, height=44, width=80, text=512, batch=1),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    rand = random_inputs(device, dtype)
    b = gen["batch"]
    return dict(
        hidden_states=rand(b, config["in_channels"], gen["frames"], gen["height"], gen["width"]),
        encoder_hidden_states=rand(b, gen["text"], config["text_dim"]),
    )


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, L, H, D) rotated by Wan's real tables (1 or B, L, 1, D), pairing channels (2i, 2i+1):
    the arithmetic of the stock WanAttnProcessor (in the tables' dtype, then back to x's)."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1).flatten(-2).type_as(x)


class CATWanAttnProcessor(CachedAttentionProcessor):
    """Wan's self attention ``attn1`` with the K (after rotation) and V rows of every token cached
    between steps. In the dense modes it defers to the processor it replaced, so those steps are
    the unpatched computation exactly; "fill" computes the same thing and keeps the K/V."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if not self.state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None:
            raise ValueError(f"cat_pruning: {self.name} is cached as self attention but was called with a context")
        if attention_mask is not None:
            raise ValueError("cat_pruning: attention masks are not supported on Wan's pruned steps")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = self._attend_text_image(query, key, value, getattr(self.original, "_attention_backend", None))
        return attn.to_out[1](attn.to_out[0](out))


def timestep_arg(args: tuple, kwargs: dict) -> Tensor | None:
    return kwargs.get("timestep", args[1] if len(args) > 1 else None)


class WanAdapter(Adapter):
    family = "Wan 2.1 / 2.2 (WanTransformer3DModel)"
    model_classes = ("WanTransformer3DModel",)
    patch_embed = "patch_embedding"
    out_proj = "proj_out"
    components = ("image_encoder",)  # Wan 2.1 I2V's CLIP: its tokens reach the cross attentions only
    supports_parallel = True  # Ulysses context parallelism (module docstring)

    def check_model(self, model: nn.Module) -> None:
        refuse_diffusers_cache(model)
        super().check_model(model)
        get_submodule(model, "rope")
        if tuple(model.config.patch_size) != tuple(model.patch_embedding.stride):
            raise ValueError("cat_pruning: Wan's patch embedding must have its stride equal to its kernel")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"blocks.{i}.attn1": block.attn1 for i, block in enumerate(model.blocks)}

    def cross_attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"blocks.{i}.attn2": block.attn2 for i, block in enumerate(model.blocks)}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATWanAttnProcessor(state, name, attn.processor)

    def steps_run(self, pipeline: Any, model: nn.Module, timesteps: Tensor) -> int:
        """A pipeline of two experts (Wan 2.2 A14B, ``boundary_ratio``) runs ``transformer`` at the
        timesteps at or above the boundary and ``transformer_2`` below it; each expert's schedule
        counts its own steps."""
        ratio = pipeline.config.get("boundary_ratio") if hasattr(pipeline, "config") else None
        second = getattr(pipeline, "transformer_2", None)
        if ratio is None or second is None:
            return len(timesteps)
        high = int((timesteps >= ratio * pipeline.scheduler.config.num_train_timesteps).sum())  # once per call
        return len(timesteps) - high if model is getattr(second, "_orig_mod", second) else high

    def cfg_pairs(self, pipeline: Any) -> bool:
        return False  # CFG is two calls per step, one per branch (cache_context), never a CFG batch

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            refuse_diffusers_cache(module, patched=True)
            timestep = timestep_arg(args, kwargs)
            if state.mode != "pruned" or timestep is None or timestep.ndim != 2:
                return None
            rows = timestep.gather(1, state.idx)  # a per-token timestep (B, N): the K selected tokens'
            if "timestep" in kwargs:
                return args, {**kwargs, "timestep": rows}
            return (args[0], rows, *args[2:]), kwargs

        def rope_hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
            if state.mode != "pruned":
                return None
            cos, sin = output  # (1, N, 1, D) (under context parallelism: this rank's rows)
            idx = state.idx
            if state.shard.cp_world > 1:  # this rank's share of the selection, from the table of all N tokens
                idx = rank_share(idx, state.shard)
                cos, sin = type(module).forward(module, *args)  # the class's: before diffusers' split
            return cos[0][idx], sin[0][idx]  # (B, K, 1, D): each sample's selected rows

        return [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.rope.register_forward_hook(rope_hook),
        ]

    def check_call(self, args: tuple, kwargs: dict) -> None:
        hidden = hidden_states_arg(args, kwargs)
        if hidden.ndim != 5:
            raise ValueError(f"cat_pruning: Wan takes (B, C, frames, height, width) latents, got {tuple(hidden.shape)}")

    def hidden_layout(self, model: nn.Module, layout: CacheLayout) -> CacheLayout:
        # the model hands norm_out hidden_states.float()
        return dataclasses.replace(super().hidden_layout(model, layout), out_dtype=torch.float32)

    def per_token_timestep(self, pipeline: Any) -> bool:
        return pipeline is not None and bool(getattr(pipeline, "config", {}).get("expand_timesteps", False))

    def check_hidden_cache(self, args: tuple, kwargs: dict) -> None:
        timestep = timestep_arg(args, kwargs)
        if timestep is not None and timestep.ndim == 2:
            raise ValueError(
                "cat_pruning: output_cache=\"hidden\" (what \"auto\" is on a bare transformer) needs one timestep "
                "per sample, but this call gives one per token (Wan 2.2 TI2V, expand_timesteps): the final modulation "
                "is then per token; patch the pipeline, or pass output_cache=\"noise\"")

    def gather_embedding(self, state: CATState, output: Tensor) -> Tensor:
        # (B, C, F, H, W) -> (B, C, K, 1, 1): the model's flatten(2).transpose(1, 2) makes the (B, K, C) rows
        rows = state.gather(output.flatten(2).mT)
        return rows.mT[..., None, None]

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict) -> Geometry:
        hidden = hidden_states_arg(args, kwargs)
        b, _, frames, height, width = hidden.shape
        p_t, p_h, p_w = model.config.patch_size
        return Geometry(b, height // p_h, width // p_w, hidden.dtype, hidden.device, frames=frames // p_t)

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        return self.flat_cache_layout(model, geometry, shard, text=False)  # attn1: image rows only

    def text_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> int:
        """Context rows of the cross attentions: the text's, and the image's of image-to-video."""
        context = [encoder_hidden_states_arg(args, kwargs), kwargs.get("encoder_hidden_states_image")]
        return sum(x.shape[1] for x in context if x is not None)

    def linear_stream(self, name: str) -> str | None:
        if name.startswith(("condition_embedder.time_embedder", "condition_embedder.time_proj")):
            return "sample"
        if name.startswith(("condition_embedder.text_embedder", "condition_embedder.image_embedder")):
            return "text"
        if ".attn2." in name and name.rsplit(".", 1)[-1] in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
            return "text"
        if name.startswith(("blocks", "proj_out")):
            return "image"
        return None

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        return rows, num_tokens
