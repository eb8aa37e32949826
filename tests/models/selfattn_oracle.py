"""The masked-dense oracle of docs/design.md section 3 for image-only self attention (PixArt's and
DiT's attn1), written independently of cat_pruning.processors on purpose."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SelfAttnOracle:
    """Dense self attention in which the K/V rows of unselected tokens come from a given cache."""

    def __init__(self, k_cache, v_cache, selected):
        self.k_cache, self.v_cache, self.selected = k_cache, v_cache, selected[:, None, :, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        b = hidden_states.shape[0]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        k = torch.where(self.selected, k, self.k_cache)
        v = torch.where(self.selected, v, self.v_cache)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        return attn.to_out[0](out)

