"""Attention processors that keep a per-layer K/V cache of the image tokens.

Installed with diffusers' ``Attention.set_processor``; the blocks around them run unchanged
on whatever rows they are given. Attention is the only place where tokens mix, so this is the
only place that needs to know that a pruned step runs on K compacted image tokens: their new
keys/values go to the cache store (cat_pruning.cache), which returns the image K/V of all N
tokens (reused or forecast for the skipped ones), and the K queries attend over those plus the
text K/V (ordinary dense attention of K queries against N + T keys). With
CATConfig.fused_attention a pruned step hands the queries too and the store attends in one op
(cache.attend), forming the skipped rows as it reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .parallel import to_heads, to_sequence
from .state import CATState


def _heads(x: Tensor, batch: int, heads: int) -> Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


_IMAGE = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
_CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


def _project(attn: torch.nn.Module, hidden_states: Tensor, names: tuple[str, ...] = _IMAGE) -> tuple[Tensor, ...]:
    """Queries, keys, values (B, H, rows, D) of the image (or, with _CONTEXT, the text) stream,
    after the optional qk-norm, as diffusers' processors compute them."""
    batch = hidden_states.shape[0]
    q, k, v = (_heads(getattr(attn, n)(hidden_states), batch, attn.heads) for n in names[:3])
    norm_q, norm_k = getattr(attn, names[3]), getattr(attn, names[4])
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class CachedAttentionProcessor:
    """What the CAT processors share: the replaced processor for the steps that keep no cache,
    and the layer's image K/V rows in the cache store for the others."""

    def __init__(self, state: CATState, name: str, original: object) -> None:
        self.state = state
        self.name = name
        self.original = original

    @property
    def _fused(self) -> bool:
        """A pruned step that attends in one op (CATConfig.fused_attention, cache.attend)."""
        return self.state.mode == "pruned" and self.state.config.fused_attention

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, after: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Queries (B, H, M, D) over every image token's keys/values and the `after` rows (text;
        (B, H, T, D)) -> (B, H, M, D). The step's image rows `key`, `value` (B, H, rows, D) go to
        the cache store, which returns all N (this step's when all rows ran); then SDPA, or on a
        pruned step with fused_attention the store's one-op attention."""
        cache = self.state.cache
        if self._fused:
            return cache.attend(self.name, query, key, value, [after] if after is not None else [])
        key, value = cache.joint_kv(self.name, key, value, after=after)
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

    def _attend_text_image(self, query: Tensor, key: Tensor, value: Tensor, backend: object,
                           text_mask: Tensor | None = None) -> Tensor:
        """Joint attention of [text; image] rows (B, L, H, D), after any rotation (under Ulysses
        context parallelism: this rank's rows, all heads) -> the output (B, L, H*D) of these rows.

        The image K/V rows go to the cache store, and the queries attend over the text keys and
        every image token's keys, through diffusers' ``dispatch_attention_fn`` with `backend` (on
        a pruned step with fused_attention: the store's one-op attention, cache.attend). Under
        context parallelism the all-to-alls run here, around the store, so the attention itself
        is local. `text_mask` (B, T) bool, over the text keys of all ranks in order: the keys to
        attend (the image keys are all attended). The geometry's reference rows (after the
        image rows, never under context parallelism) are attended as computed, never cached."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        state = self.state
        shard = state.shard
        reference = state.geometry.reference  # rows after the image tokens, always computed
        # image rows in this call (under context parallelism: on this rank)
        rows = (state.k if state.mode == "pruned" else state.geometry.num_tokens) // shard.cp_world + reference
        text = query.shape[1] - rows
        if shard.cp_world > 1:  # Ulysses: every rank's rows, this rank's heads
            query, key, value = (to_heads(x, shard) for x in (query, key, value))

        # (B, rows, H*D) image rows; the store returns all N of them
        (ctx_key, image_key), (ctx_value, image_value) = (_split_rows(x, shard.cp_world, text) for x in (key, value))
        if reference:  # (never under context parallelism)
            (image_key, tail_key), (image_value, tail_value) = (
                x.split_with_sizes([x.shape[1] - reference, reference], dim=1) for x in (image_key, image_value))
        image_key, image_value = image_key.flatten(2), image_value.flatten(2)
        if self._fused:  # (B, H, rows, D) views throughout; the store attends in one op
            extra = [(ctx_key, ctx_value), *([(tail_key, tail_value)] if reference else [])]
            extra_mask = None  # over the text rows, then the reference rows
            if text_mask is not None:
                extra_mask = F.pad(text_mask.to(torch.bool), (0, reference), value=True)
            joined = None  # one process: this call's keys are [text; computed; reference] already
            if shard.cp_world == 1:
                joined = key.transpose(1, 2), value.transpose(1, 2), text
            out = state.cache.attend(self.name, query.transpose(1, 2), image_key, image_value,
                                     [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in extra],
                                     extra_mask, joined).transpose(1, 2)
        else:
            mask = None
            if text_mask is not None:
                image_mask = torch.ones(query.shape[0], state.geometry.num_tokens + reference, dtype=torch.bool,
                                        device=query.device)
                mask = torch.cat([text_mask.to(torch.bool), image_mask], dim=1)[:, None, None, :]
            if state.mode == "pruned" or mask is not None:  # [text; all image tokens; reference]: the mask's order
                after = (tail_key.flatten(2), tail_value.flatten(2)) if reference else None
                key, value = state.cache.joint_kv(self.name, image_key, image_value,
                                                  (ctx_key.flatten(2), ctx_value.flatten(2)), after)
                key, value = (x.unflatten(-1, (-1, query.shape[-1])) for x in (key, value))
            else:  # the call's own [text; image] rows are the keys; the store keeps the image rows
                state.cache.kv(self.name, image_key, image_value)
            out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend)
        if shard.cp_world > 1:
            out = to_sequence(out, shard)
        return out.flatten(2, 3).to(query.dtype)


def _split_rows(x: Tensor, world: int, text: int) -> tuple[Tensor, Tensor]:
    """(B, world * S, ...) rows, each rank's S = [text; image] rows in rank order -> (text rows,
    image rows), both in rank order: with a global selection split in rank order, the image rows
    are the computed tokens in the selection's order."""
    x = x.unflatten(1, (world, -1))
    return x[:, :, :text].flatten(1, 2), x[:, :, text:].flatten(1, 2)


class CATJointAttnProcessor(CachedAttentionProcessor):
    """SD3-style joint attention over [image; text] (``attn``) or image-only self attention
    (SD3.5's ``attn2``), with the image K/V rows cached between steps.

    In the dense modes it defers to the processor it replaced, so those steps are the
    unpatched computation exactly; "fill" computes the same thing and keeps the image K/V.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not self.state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("cat_pruning: attention masks are not supported on pruned steps")

        batch, rows = hidden_states.shape[:2]
        query, key, value = _project(attn, hidden_states)
        text = None
        if encoder_hidden_states is not None:  # [image; text] keys, the image rows over all N tokens
            ctx_query, ctx_key, ctx_value = _project(attn, encoder_hidden_states, _CONTEXT)
            query = torch.cat([query, ctx_query], dim=2)
            text = (ctx_key, ctx_value)

        out = self._attend(query, key, value, after=text)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)

        image_out = attn.to_out[1](attn.to_out[0](out[:, :rows]))
        if encoder_hidden_states is None:
            return image_out
        ctx_out = out[:, rows:]
        if not attn.context_pre_only:
            ctx_out = attn.to_add_out(ctx_out)
        return image_out, ctx_out


class CATSelfAttnProcessor(CachedAttentionProcessor):
    """Image-only self attention (PixArt's and DiT's ``attn1``, diffusers' AttnProcessor2_0)
    with the image K/V rows cached between steps.

    Dense modes defer to the processor it replaced, so those steps are the unpatched
    computation exactly; "fill" computes the same attention and keeps every token's K/V;
    "pruned" writes the K selected tokens' new K/V rows into the cache and attends their
    queries over all N cached rows. Cross attention (PixArt's ``attn2``) needs no cache: its
    queries are per token and its keys are the text, so it keeps its own processor.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        if not self.state.caching:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None:
            raise ValueError(f"cat_pruning: {self.name} is cached as self attention but was called with context")
        if attention_mask is not None:
            raise ValueError("cat_pruning: self-attention masks are not supported on pruned steps")

        batch = hidden_states.shape[0]
        residual = hidden_states
        query, key, value = _project(attn, hidden_states)
        out = self._attend(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
