"""Sana (diffusers SanaTransformer2DModel): linear self attention, cross attention to the text and
a GLUMBConv feed-forward whose 3x3 depthwise convolution mixes neighbouring tokens.

Seams (diffusers 0.42.1):

- ``patch_embed`` (PatchEmbed: conv, flatten, optional sincos position embedding) is the patch
  embedding; its output is gathered to the K selected rows.
- Linear self attention ``attn1`` (stock ``SanaLinearAttnProcessor2_0``: ReLU feature map,
  out_i = sum_j (phi(q_i).phi(k_j)) v_j / sum_j phi(q_i).phi(k_j) with phi = ReLU, in fp32).
  What is cached: the per-token projected keys and values of the image tokens, (B, N, H*D) each
  in the model dtype, like a softmax K/V cache. At a pruned step the selected rows are refreshed
  and the sums S = sum_j [v_j; 1] phi(k_j)^T are recomputed over all N cached rows in fp32,
  exactly as the stock processor computes them. Why not keep only S and update it by
  subtracting the old rows and adding the new ones: that still needs the old rows (the same
  per-token caches), drifts over the pruned steps in low precision, and saves little: the
  recomputation costs H*(D+1)*D*N MACs per layer (about 1% of a Sana-1600M pruned step at
  keep_ratio 0.3) against the K*(4*C^2) of the projections.
- Cross attention ``attn2`` (queries per image token, keys/values from the always-computed text)
  needs no cache and keeps its own processor; the pipeline's text mask is a key bias that
  broadcasts over any number of queries.
- The feed-forward is NOT per token: the block reshapes the rows to the (H, W) map and GLUMBConv
  runs 1x1 conv, SiLU, 3x3 depthwise conv (``ff.conv_depth``), GLU gate, 1x1 conv. On a pruned
  step a block pre-hook passes (K, 1) as the map's height and width, so the reshapes and the
  1x1 convolutions run on the K rows as a K x 1 map; a pre-hook on ``conv_depth`` writes those K
  input rows into a per-block cache of the conv's input over all N positions, (B, N, 2*hidden),
  and hands the conv the full (H, W) map; a forward hook gathers the K selected output
  positions back. So every selected token's convolution sees its neighbours' latest computed
  inputs (the unselected ones from the cache): exact in the masked-dense sense, at the cost of
  the depthwise conv over all N positions (9 MACs per channel and token, ~0.4% of the block).
  The cache is token-major because the block's map is: ``unflatten(1, (H, W)).permute(0, 3, 1, 2)``
  of its (B, N, C) rows is a channels-last map, so the cache views as the same channels-last map
  without a copy and the conv runs the kernel the unpatched block runs. (A (B, 2*hidden, N, 1)
  cache gave the conv a contiguous map: another CPU kernel, which rounded differently, so
  keep_ratio 1 was not bitwise dense.)
- ``proj_out`` is the output seam; the model unpatchifies the full (B, N, C_out) output itself.

The masked-dense oracle for Sana: the unpatched model in which, inside every linear self
attention, the K/V rows of unselected tokens are the cached rows, and in every depthwise
convolution the input rows of unselected tokens are the cached rows.

Not supported (a clear error): ControlNet residuals, fused QKV projections, self-attention
processors other than the linear one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cat_kernels import ops

from ..parallel import NONE, Sharding
from ..processors import CachedAttentionProcessor
from ..state import CacheLayout, CATState, Geometry
from .base import Adapter, PathHook, compute_dtype, get_submodule, head_dims, hidden_states_arg, random_inputs

# Real architectures, for MAC counts on the meta device: (transformer config, generation), where
# the generation gives the latent side, the text tokens and the transformer batch (CFG halves).
REAL_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    # Sana_1600M_1024px: 20 blocks, hidden 2240 = 70 linear-attention heads x 32, cross attention
    # 20 heads x 112, GLUMBConv mlp_ratio 2.5; DC-AE f32 -> 32x32x32 latent, patch 1 -> 1024
    # image tokens; 300 Gemma-2 tokens; CFG batch of 2.
    "sana-1600m-1024": (
        dict(
            in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1,
            norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
        ),
        dict(latent=32, text=300, batch=2),
    ),
}


def real_inputs(config: dict[str, Any], gen: dict[str, int], device: str | torch.device,
                dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call of a REAL_CONFIGS generation (random values;
    empty tensors on the meta device), timestep excluded."""
    b, s, t = gen["batch"], gen["latent"], gen["text"]

    rand = random_inputs(device, dtype)

    return dict(
        hidden_states=rand(b, config["in_channels"], s, s),
        encoder_hidden_states=rand(b, t, config["caption_channels"]),
        encoder_attention_mask=torch.ones(b, t, device=device, dtype=dtype),
    )


class CATSanaLinearAttnProcessor(CachedAttentionProcessor):
    """Sana's linear self attention with the image K/V rows cached between steps and the key sums
    recomputed over all cached rows (in fp32, as the stock processor does).

    In the dense modes it defers to the processor it replaced, so those steps are the unpatched
    computation exactly; "fill" computes the same thing and keeps the K/V rows.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        state = self.state
        if not state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if encoder_hidden_states is not None:
            raise ValueError("cat_pruning: Sana's linear attention is self attention; got a context")
        original_dtype = hidden_states.dtype

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        key, value = state.cache.kv(self.name, key, value)  # (B, N, H*D) over every token

        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()  # (B, H, D, rows)
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()  # (B, H, N, D)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()  # (B, H, D, N)
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        scores = torch.matmul(value, key)  # (B, H, D+1, D): sum_j [v_j; 1] phi(k_j)^T
        out = torch.matmul(scores, query)  # (B, H, D+1, rows)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(original_dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class SanaAdapter(Adapter):
    family = "Sana (SanaTransformer2DModel)"
    model_classes = ("SanaTransformer2DModel",)
    patch_embed = "patch_embed"
    out_proj = "proj_out"
    softmax_attention = False

    def check_model(self, model: nn.Module) -> None:
        from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

        super().check_model(model)
        for name, attn in self.attention_modules(model).items():
            processor = getattr(attn.processor, "original", attn.processor)  # a patched model being re-patched
            if not isinstance(processor, SanaLinearAttnProcessor2_0):
                raise ValueError(f"cat_pruning: {name} runs {type(processor).__name__}; only Sana's linear "
                                 "self attention (SanaLinearAttnProcessor2_0) is supported")
        for i, block in enumerate(model.transformer_blocks):
            if not isinstance(getattr(getattr(block, "ff", None), "conv_depth", None), nn.Conv2d):
                raise ValueError(f"cat_pruning: transformer_blocks.{i} has no GLUMBConv feed-forward; not supported")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {f"transformer_blocks.{i}.attn1": block.attn1 for i, block in enumerate(model.transformer_blocks)}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        return CATSanaLinearAttnProcessor(state, name, attn.processor)

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        def block_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # The block reshapes its rows to the (height, width) map for the feed-forward; on a
            # pruned step its K rows become a K x 1 map (the depthwise conv hooks do the rest).
            if state.mode != "pruned":
                return None
            if len(args) >= 7:
                return (*args[:5], state.k, 1, *args[7:]), kwargs
            return args, {**kwargs, "height": state.k, "width": 1}

        def conv_pre_hook(name: str) -> Any:
            def hook(module: nn.Module, args: tuple) -> tuple | None:
                if not state.caching:
                    return None
                # the (B, 2*hidden, H, W) input of a full step, or the (B, 2*hidden, K, 1) rows of a
                # pruned one, as (B, rows, 2*hidden) rows (a view: the block's map is channels-last):
                # the store keeps them and returns all N, and the conv runs on the full map
                x, g = args[0], state.geometry
                full = state.cache.rows(name, x.permute(0, 2, 3, 1).flatten(1, 2))
                if state.mode != "pruned":
                    return None
                # channels-last, as the block's own map: the conv computes what the unpatched one does
                return (full.view(full.shape[0], g.height, g.width, full.shape[2]).permute(0, 3, 1, 2),)

            return hook

        def conv_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if state.mode != "pruned":
                return None
            full = output.permute(0, 2, 3, 1).flatten(1, 2)  # (B, N, 2*hidden)
            rows = ops.gather_tokens(full, state.idx, 1, backend=state.config.backend)
            return rows.transpose(1, 2).unsqueeze(-1)  # the (B, 2*hidden, K, 1) map, channels-last

        handles: list = []
        for i, block in enumerate(model.transformer_blocks):
            name = f"transformer_blocks.{i}.ff.conv_depth"
            handles += [
                block.register_forward_pre_hook(block_pre_hook, with_kwargs=True),
                # by path: a LoRA on conv_depth takes its place
                PathHook(name, conv_pre_hook(name), pre=True),
                PathHook(name, conv_hook),
            ]
        return handles

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if kwargs.get("controlnet_block_samples") is not None:
            raise ValueError("cat_pruning: ControlNet residuals are not supported yet; unpatch to use ControlNet")

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict) -> Geometry:
        hidden = hidden_states_arg(args, kwargs)
        p = model.config.patch_size
        b, _, h, w = hidden.shape
        return Geometry(b, h // p, w // p, hidden.dtype, hidden.device)

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        """(B, N, H*D) K and V caches (the projections' layout) per linear attention, and per block
        the depthwise conv's input over all positions, token-major (B, N, 2*hidden): the block's
        map is channels-last, so the cache views as that map without a copy."""
        b, n = geometry.batch, geometry.num_tokens
        attns = self.attention_modules(model)
        kv = {name: ((b, n, attn.to_k.out_features), compute_dtype(attn.to_k)) for name, attn in attns.items()}
        extra = {f"transformer_blocks.{i}.ff.conv_depth": ((b, n, block.ff.conv_depth.in_channels),
                                                           compute_dtype(block.ff.conv_depth))
                 for i, block in enumerate(model.transformer_blocks)}
        out = get_submodule(model, self.out_proj)
        return CacheLayout(kv, out.out_features, compute_dtype(out), extra, head_dims(attns))

    def linear_stream(self, name: str) -> str | None:
        if name.startswith("time_embed"):
            return "sample"
        if name.startswith("caption_projection") or ".attn2.to_k" in name or ".attn2.to_v" in name:
            return "text"
        if name.startswith(("transformer_blocks", "proj_out")):
            return "image"
        return None

    def macs_per_sample(self, model: nn.Module, rows: int, num_tokens: int, text: int) -> int:
        """Linears by the rows they run on; the patch embedding and the depthwise convs over all
        N positions, the 1x1 convs over the computed rows; linear attention as the key sums over
        all N cached rows plus their product with the computed queries; cross attention QK^T + PV."""
        total = 0
        per_stream = {"image": rows, "text": text, "sample": 1}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                stream = self.linear_stream(name)
                if stream is not None:
                    total += per_stream[stream] * module.in_features * module.out_features
            elif isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_position = module.in_channels * kh * kw * module.out_channels // module.groups
                full = name.startswith(self.patch_embed) or name.endswith("conv_depth")
                total += (num_tokens if full else rows) * per_position
        for block in model.transformer_blocks:
            attn = block.attn1
            head_dim = attn.to_k.out_features // attn.heads
            total += attn.heads * (head_dim + 1) * head_dim * (num_tokens + rows)
            if getattr(block, "attn2", None) is not None:
                total += 2 * rows * text * block.attn2.to_q.out_features
        return total
