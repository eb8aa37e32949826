"""Qwen-Image (diffusers QwenImageTransformer2DModel): MM-DiT double-stream blocks with joint
[text; image] attention, complex rotary position embeddings and a text padding mask.

Seams (diffusers 0.42.1):

- ``img_in`` (a Linear over the packed 2x2 latent tokens) is the patch embedding: its output is
  gathered to the K selected rows.
- ``pos_embed`` (QwenEmbedRope) returns ``(img_freqs, txt_freqs)``, complex tables of shape
  (N, D/2) and (T, D/2). A forward hook gathers the image rows of each sample's selection on a
  pruned step: (B, K, D/2). The CAT processor applies the rotation itself (the arithmetic of
  diffusers' ``apply_rotary_emb_qwen(use_real=False)``, for a shared or a per-sample table).
- Attention (stock ``QwenDoubleStreamAttnProcessor2_0``): the CAT processor computes q, k, v of
  the rows it gets, rotates, writes the image keys *after rotation* and the image values into a
  (B, N, H*D) cache, and attends the T + K queries over the T text keys plus the N cached image
  keys through ``dispatch_attention_fn`` with the backend the replaced processor had. The text
  padding mask (``encoder_hidden_states_mask``) becomes a key mask [text mask; all N image keys],
  as the stock processor builds it over its own keys.
- ``proj_out`` is the output seam; the model returns packed tokens (B, N, C_out), so the noise
  cache is the model output.

The pipeline calls the transformer once per CFG branch inside ``transformer.cache_context("cond")``
/ ``("uncond")`` (true CFG): each branch has its own caches and selection (cat_pruning.state).
The token grid comes from ``img_shapes`` ([(1, h, w)] per sample), which is also what the
clustering uses.

The Edit models (QwenImageEditPipeline, QwenImageEditPlusPipeline; Qwen-Image-Edit-2511's
``zero_cond_t``) append the reference images' latent tokens to the image's: a sample's
``img_shapes`` lists the image's grid, then each reference's. The reference tokens are rows of the
image stream that every step computes (``Geometry.reference``): never selected, cached or
forecast, their K/V rows attended as computed, their MACs counted, their output rows passed
through (the pipelines drop them). The patch-embedding gather and the rotary hook keep them after
the selected rows; under ``zero_cond_t`` a pre-hook on every block gathers ``modulate_index``
(which of the two timestep modulations each row takes) the same way.

Not supported yet (a clear error): reference images under model parallelism, the layered 3D rotary
(``use_layer3d_rope``), ControlNet residuals, diffusers' own caching (``enable_cache``), and
diffusers older than 0.42 (whose processor ignores the text mask: another computation to match).

diffusers' model parallelism (cat_pruning.parallel). Qwen-Image's context-parallel plan splits
the sequence at the first block's input, after ``img_in``, so a pruned step's K rows are gathered
at the patch embedding as in one process and split there (K / W per rank); ``pos_embed``'s
outputs and the text mask are split too. The rotary hook gives each rank its share of the
selection from the table of all N tokens (the class's forward, before diffusers' split), the
processor all-gathers the text mask (a few bytes per layer) and runs the Ulysses all-to-alls
around the caches. Under tensor parallelism (plain column / row splits) the caches hold the
rank's heads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..parallel import NONE, Sharding, gather_sequence, rank_share
from ..processors import CachedAttentionProcessor
from ..state import CacheLayout, CATState, Geometry
from .base import Adapter, get_submodule, hidden_states_arg, random_inputs, refuse_diffusers_cache

MIN_DIFFUSERS = (0, 42)  # the first release tested whose processor applies encoder_hidden_states_mask

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the latent side in tokens (packed 2x2), the text tokens and the batch.
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # Qwen-Image 1328x1328: 60 double-stream blocks, hidden 3072 = 24 heads x 128, VAE f8 -> 166x166
    # latent of 16 channels packed 2x2 -> 83x83 = 6889 tokens of 64 channels; Qwen2.5-VL text
    # (3584 wide); true CFG calls the transformer once per branch (batch 1 each).
    "qwen-image-1328": (
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
        dict(side=83, text=256, batch=1),
    ),
    # Qwen-Image-Edit-2511 at 1024x1024 with one 1024x1024 reference image: the same transformer with
    # zero_cond_t; 64x64 = 4096 image tokens and 4096 reference tokens (computed at every step)
    "qwen-image-edit-2511-1024": (
        dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56), zero_cond_t=True),
        dict(side=64, reference=64, text=256, batch=1),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, side, t, ref = gen["batch"], gen["side"], gen["text"], gen.get("reference", 0)
    rand = random_inputs(device, dtype)
    return dict(
        hidden_states=rand(b, side * side + ref * ref, config["in_channels"]),
        encoder_hidden_states=rand(b, t, config["joint_attention_dim"]),
        encoder_hidden_states_mask=torch.ones(b, t, dtype=torch.bool, device=device),
        img_shapes=[[(1, side, side), *([(1, ref, ref)] if ref else [])]] * b,
    )


def rotate(x: Tensor, freqs: Tensor) -> Tensor:
    """x (B, L, H, D) rotated by a complex table (L, D/2) shared by the samples or (B, L, D/2) per
    sample: diffusers' apply_rotary_emb_qwen(use_real=False), in the same arithmetic."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs.unsqueeze(-2)).flatten(3).type_as(x)


def grid_of(img_shapes: Any) -> tuple[int, int, int]:
    """(height, width, reference) of a call's img_shapes, [(1, h, w), ...] or [[(1, h, w), ...]]
    per sample: the image's token grid (the first entry) and the tokens of the reference images
    after it (the Edit models; 0 for text-to-image)."""
    if not img_shapes:
        raise ValueError("cat_pruning: Qwen-Image was called without img_shapes")
    shapes = set()
    for sample in img_shapes:
        entries = sample if isinstance(sample, list) else [sample]
        reference = sum(math.prod(entry) for entry in entries[1:])
        shapes.add((*tuple(entries[0]), reference))
    if len(shapes) != 1:
        raise ValueError(f"cat_pruning: the samples of one Qwen-Image call have different sizes {sorted(shapes)}")
    frames, height, width, reference = shapes.pop()
    if frames != 1:
        raise ValueError(f"cat_pruning: Qwen-Image with {frames} frames per sample is not supported")
    return height, width, reference


class CATQwenAttnProcessor(CachedAttentionProcessor):
    """Qwen-Image joint attention with the image K (after rotation) and V rows cached between
    steps. In the dense modes it defers to the processor it replaced, so those steps are the
    unpatched computation exactly; "fill" computes the same thing and keeps the image K/V."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        state = self.state
        if not state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)  # fmt: skip
        if encoder_hidden_states is None:
            raise ValueError("cat_pruning: Qwen-Image attention was called without its text stream")
        if attention_mask is not None:
            raise ValueError("cat_pruning: Qwen-Image attention takes encoder_hidden_states_mask, not attention_mask")
        if image_rotary_emb is None:
            raise ValueError("cat_pruning: Qwen-Image attention was called without its rotary embedding")

        head_dim = attn.inner_dim // attn.heads  # (heads: this rank's under tensor parallelism)

        def project(x: Tensor, names: tuple[str, str, str], norms: tuple[str, str]) -> tuple[Tensor, Tensor, Tensor]:
            q, k, v = (getattr(attn, n)(x).unflatten(-1, (-1, head_dim)) for n in names)
            norm_q, norm_k = (getattr(attn, n) for n in norms)
            return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v

        img_q, img_k, img_v = project(hidden_states, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        txt_q, txt_k, txt_v = project(encoder_hidden_states, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                      ("norm_added_q", "norm_added_k"))  # fmt: skip
        img_freqs, txt_freqs = image_rotary_emb
        img_q, img_k = rotate(img_q, img_freqs), rotate(img_k, img_freqs)
        txt_q, txt_k = rotate(txt_q, txt_freqs), rotate(txt_k, txt_freqs)

        mask = encoder_hidden_states_mask  # the text keys to attend (under context parallelism: this rank's)
        if mask is not None and state.shard.cp_world > 1:
            mask = gather_sequence(mask, state.shard)
        out = self._attend_text_image(
            torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
            getattr(self.original, "_attention_backend", None), mask)  # fmt: skip
        text = txt_q.shape[1]
        img_out = attn.to_out[0](out[:, text:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(out[:, :text].contiguous())


class QwenImageAdapter(Adapter):
    family = "Qwen-Image (QwenImageTransformer2DModel)"
    model_classes = ("QwenImageTransformer2DModel",)
    patch_embed = "img_in"
    out_proj = "proj_out"
    supports_parallel = True  # Ulysses context parallelism and tensor parallelism (module docstring)

    def check_model(self, model: nn.Module) -> None:
        import diffusers

        version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
        if version < MIN_DIFFUSERS:
            raise ValueError(
                f"cat_pruning: Qwen-Image needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))} (this is "
                f"{diffusers.__version__}, whose attention ignores the text padding mask); upgrade diffusers")
        refuse_diffusers_cache(model)
        if model.config.get("use_layer3d_rope", False):
            raise ValueError("cat_pruning: the layered 3D rotary (use_layer3d_rope) is not supported yet; unpatch to "
                             "run this model")
        super().check_model(model)
        get_submodule(model, "pos_embed")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(model.transformer_blocks)}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATQwenAttnProcessor(state, name, attn.processor)

    def cfg_pairs(self, pipeline: Any) -> bool:
        return False  # true CFG is two calls per step, one per branch (cache_context), never a CFG batch

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            refuse_diffusers_cache(module, patched=True)

        def rope_hook(module: nn.Module, args: tuple, kwargs: dict,
                      output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
            if state.mode != "pruned":
                return None
            img_freqs, txt_freqs = output  # (under context parallelism: this rank's rows)
            idx, shard, reference = state.idx, state.shard, state.geometry.reference
            if shard.cp_world > 1:  # this rank's share of the selection, from the table of all N tokens
                idx = rank_share(idx, shard)
                img_freqs = type(module).forward(module, *args, **kwargs)[0]  # the class's: before diffusers' split
            if reference:  # the reference images' rows follow the image's, all of them
                tail = img_freqs[-reference:].expand(idx.shape[0], -1, -1)
                return torch.cat([img_freqs[:-reference][idx], tail], dim=1), txt_freqs
            return img_freqs[idx], txt_freqs  # (B, K, D/2): each sample's selected rows

        def modulation_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # zero_cond_t (Qwen-Image-Edit-2511): which of the two modulations each row takes, (B, N + R)
            index = kwargs.get("modulate_index")
            if index is None or state.mode != "pruned":
                return None
            n = state.geometry.num_tokens
            rows = torch.cat([index[:, :n].gather(1, state.idx), index[:, n:]], dim=1)
            return args, {**kwargs, "modulate_index": rows}

        return [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.pos_embed.register_forward_hook(rope_hook, with_kwargs=True),
            *(block.register_forward_pre_hook(modulation_hook, with_kwargs=True)
              for block in model.transformer_blocks),
        ]

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if kwargs.get("controlnet_block_samples") is not None:
            raise ValueError("cat_pruning: ControlNet residuals are not supported yet; unpatch to use ControlNet")

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict) -> Geometry:
        hidden = hidden_states_arg(args, kwargs)  # packed tokens (B, N + R, C); the grids are in img_shapes
        height, width, reference = grid_of(kwargs.get("img_shapes"))
        b, rows, _ = hidden.shape
        if height * width + reference != rows:
            raise ValueError(f"cat_pruning: img_shapes gives a {height}x{width} token grid and {reference} reference "
                             f"tokens for {rows} rows of hidden_states")
        if reference and getattr(model, "_parallel_config", None) is not None:
            raise ValueError("cat_pruning: reference images (Qwen-Image-Edit) under diffusers' model parallelism are "
                             "not supported yet; run them in one process per GPU (data parallelism)")
        return Geometry(b, height, width, hidden.dtype, hidden.device, reference)

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        return self.flat_cache_layout(model, geometry, shard)

    def linear_stream(self, name: str) -> str | None:
        if name.startswith(("time_text_embed", "norm_out")) or "_mod." in name:
            return "sample"
        if name.startswith("img_in"):
            return "patch"
        if name.startswith("txt_in") or ".add_" in name or "to_add_out" in name or "txt_mlp" in name:
            return "text"
        if name.startswith(("transformer_blocks", "proj_out")):
            return "image"
        return None

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        return rows + text, num_tokens + text
