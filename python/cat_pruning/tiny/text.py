"""Word tokenizer and a small learned text encoder for the tiny text-to-image model.

The vocabulary lives in the text encoder's config, so the tokenizer is saved and loaded with
the text encoder (`save_pretrained` / `from_pretrained`) and needs no files of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"


class TinyTokenizer:
    """Lower-case word tokenizer over a fixed vocabulary. Every sequence starts with <s> (so the
    empty caption still has one real token), unknown words map to <unk>, and sequences are
    padded / truncated to `max_length`."""

    def __init__(self, vocab, max_length: int = 20):
        self.vocab = [PAD, BOS, UNK] + [w for w in vocab if w not in (PAD, BOS, UNK)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length
        self.pad_token_id, self.bos_token_id, self.unk_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self, text: str) -> list[str]:
        return text.lower().replace(",", " ").replace(".", " ").split()

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_token_id] + [self.index.get(w, self.unk_token_id) for w in self.words(text)]
        ids = ids[: self.max_length]
        return ids + [self.pad_token_id] * (self.max_length - len(ids))

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.tensor([self.encode(t) for t in texts], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()}

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) > self.unk_token_id)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = key_mask[:, None, None, :]  # (B, 1, 1, N) bool: attend to real tokens only
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.ff(self.norm2(x))


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Word + position embeddings, a few pre-norm transformer blocks, then
    encoder_hidden_states (B, L, joint_attention_dim) and pooled_projections
    (B, pooled_projection_dim) from a masked mean over the real tokens."""

    @register_to_config
    def __init__(
        self,
        vocab: list[str] | tuple[str, ...] = (),
        max_length: int = 20,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        joint_attention_dim: int = 128,
        pooled_projection_dim: int = 128,
    ):
        super().__init__()
        self.tokenizer = TinyTokenizer(vocab, max_length)
        self.embed = nn.Embedding(len(self.tokenizer), dim)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList([_Block(dim, num_heads) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)
        self.proj_hidden = nn.Linear(dim, joint_attention_dim)
        self.proj_pooled = nn.Sequential(
            nn.Linear(dim, pooled_projection_dim), nn.SiLU(), nn.Linear(pooled_projection_dim, pooled_projection_dim)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = (input_ids != self.tokenizer.pad_token_id).long()
        key_mask = attention_mask.bool()
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, key_mask)
        x = self.norm(x)
        m = attention_mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj_hidden(x), self.proj_pooled(pooled)

    def encode(self, prompts: str | list[str], device=None):
        """Tokenize and encode: (encoder_hidden_states, pooled_projections)."""
        tok = self.tokenizer(prompts)
        device = device if device is not None else self.device
        return self(tok["input_ids"].to(device), tok["attention_mask"].to(device))
