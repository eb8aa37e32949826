"""CAT under diffusers' model parallelism (``model.enable_parallelism``): what a patched model needs
to know about it, and the Ulysses exchanges its attention processors run themselves.

Context parallelism (Ulysses). diffusers splits the transformer's inputs along the sequence at the
model's entry (Flux's ``_cp_plan``: hidden_states, encoder_hidden_states and the ids), all-gathers
``proj_out``'s output, and inside every attention swaps sequence for heads with an all-to-all so
that each rank attends all tokens with its H/W heads. CAT keeps every decision global: the step's
mode, K and the selected indices are computed on every rank from the same gathered output, so
they agree without a collective. A pruned step gathers its K tokens *before* the split, so each
rank carries K/W of them and every all-to-all moves (T + K)/(T + N) of the dense traffic. When W
does not divide K, the selection (K tokens, as in one process) is padded to K' = ceil(K / W) * W
rows with repeats of selected tokens: a repeat computes the same values as its original, so the
caches get one value per token and the generation does not depend on W (CATState.selected; a
token, not a row, counts as computed). The image K/V caches live *after* the all-to-all: all N tokens, the rank's
heads; the CAT processors run the all-to-alls around them (:func:`to_heads`, :func:`to_sequence`).

Tensor parallelism. Each rank's attention sees its own heads (the Q/K/V projections are
column-sharded), so the caches hold the rank's heads; everything else, including the selection
(computed from the all-reduced output), is the same on every rank.

Not supported, refused with a message: ring attention, Ulysses-anything (uneven splits), context
and tensor parallelism at once, and model parallelism on families without diffusers plans
(SD3, PixArt, Sana, DiT), for which data parallelism over prompts is the way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

DATA_PARALLEL_HINT = (
    "use data parallelism instead: one patched pipeline per GPU, prompts split over the ranks "
    "(torchrun --nproc_per_node N -m cat_pruning generate --prompts-file FILE, see the README)"
)


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How one patched model is split over ranks (world 1: not at all)."""

    cp_world: int = 1  # Ulysses degree: ranks that split the sequence
    cp_rank: int = 0  # this rank's place in the sequence split
    cp_group: Any = None  # the Ulysses process group
    tp_world: int = 1  # tensor-parallel degree: ranks that split the heads
    tp_group: Any = None


NONE = Sharding()


def sharding(model: nn.Module, family: str, supported: bool) -> Sharding:
    """The Sharding of a model after diffusers' ``enable_parallelism`` (eager; read at each call).

    Raises ValueError for what CAT does not support; `supported` says whether the family has
    CAT processors that know about model parallelism (Flux)."""
    config = getattr(model, "_parallel_config", None)
    if config is None:
        return NONE
    if not supported:
        raise ValueError(
            f"cat_pruning: this {family} transformer has diffusers model parallelism enabled "
            f"(enable_parallelism); CAT supports it on Flux.1, FLUX.2, Qwen-Image and Wan only. For this family, "
            f"{DATA_PARALLEL_HINT}"
        )
    cp, tp = getattr(config, "context_parallel_config", None), getattr(config, "tensor_parallel_config", None)
    if cp is not None and tp is not None:
        raise ValueError("cat_pruning: context and tensor parallelism together are not supported with CAT; "
                         "use one of them (or data parallelism)")
    if tp is not None:
        return Sharding(tp_world=int(tp._tp_degree), tp_group=tp._mesh.get_group())
    if cp is None:
        return NONE
    if (cp.ring_degree or 1) > 1 or getattr(cp, "ring_anything", False):
        raise ValueError("cat_pruning: ring attention (ContextParallelConfig(ring_degree > 1)) is not supported with "
                         "CAT; use ContextParallelConfig(ulysses_degree=N)")
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("cat_pruning: ulysses_anything (uneven sequence splits) is not supported with CAT; the "
                         "image and text token counts must divide by ulysses_degree")
    world = int(cp.ulysses_degree or 1)
    if world == 1:
        return NONE
    group = cp._ulysses_mesh.get_group()
    return Sharding(cp_world=world, cp_rank=torch.distributed.get_rank(group), cp_group=group)


def local_out_features(linear: nn.Module) -> int:
    """Output features this rank computes: a column-sharded (tensor-parallel) weight is a DTensor
    whose local shard has fewer rows than the Linear's out_features. A LoRA layer answers for its
    base layer."""
    weight = getattr(linear, "base_layer", linear).weight
    to_local = getattr(weight, "to_local", None)
    return (to_local() if to_local is not None else weight).shape[0]


def _all_to_all(x: Tensor, group: Any) -> Tensor:
    """all_to_all_single over dim 0 (chunks of equal size), traceable by torch.compile."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_to_all_single(x.contiguous().flatten(), None, None, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out.view(x.shape)


def rank_share(idx: Tensor, shard: Sharding) -> Tensor:
    """(B, K') selection, padded to a multiple of the ranks -> (B, K' / W) the tokens this rank
    carries: diffusers splits the gathered rows in rank order."""
    share = idx.shape[1] // shard.cp_world
    return idx[:, shard.cp_rank * share:(shard.cp_rank + 1) * share]


def gather_sequence(x: Tensor, shard: Sharding) -> Tensor:
    """(B, S, ...) rows of this rank -> (B, W * S, ...) rows of every rank in rank order (the
    sequence diffusers split), traceable by torch.compile."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_gather_tensor(x.contiguous(), 1, shard.cp_group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def to_heads(x: Tensor, shard: Sharding) -> Tensor:
    """(B, S, H, D) local rows, all heads -> (B, W * S, H / W, D): every rank's rows (rank-major),
    this rank's heads."""
    b, s, h, d = x.shape
    w = shard.cp_world
    x = _all_to_all(x.reshape(b, s, w, h // w, d).permute(2, 1, 0, 3, 4), shard.cp_group)  # (W, S, B, H/W, D)
    return x.flatten(0, 1).permute(1, 0, 2, 3)


def to_sequence(x: Tensor, shard: Sharding) -> Tensor:
    """The inverse of :func:`to_heads`: (B, W * S, H / W, D) -> (B, S, H, D)."""
    b, ws, hl, d = x.shape
    w = shard.cp_world
    x = _all_to_all(x.reshape(b, w, ws // w, hl, d).permute(1, 3, 0, 2, 4), shard.cp_group)  # (W, H/W, B, S, D)
    return x.flatten(0, 1).permute(1, 2, 0, 3)


def check_agreement(shard: Sharding, what: dict[str, float]) -> None:
    """Every rank of the group must run the same generation, or the collectives hang or mix
    different images. Eager, once per generation (the first call): one all-gather of a few
    numbers, and a ValueError on every rank that names what differs."""
    group = shard.cp_group if shard.cp_world > 1 else shard.tp_group
    if group is None:
        return
    world = torch.distributed.get_world_size(group)
    mine = torch.tensor(list(what.values()), dtype=torch.float64)
    device = _group_device(group)
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine.to(device), group=group)
    table = torch.stack(gathered).cpu()  # (ranks, values)
    names = list(what)
    differ = [i for i in range(len(names)) if not bool((table[:, i] == table[0, i]).all())]
    if differ:
        per_rank = "; ".join(f"{names[i]} {table[:, i].tolist()}" for i in differ)
        raise ValueError(
            f"cat_pruning: the {world} ranks of this parallel group disagree (per rank: {per_rank}); every rank "
            "must run the same generation (same prompt, seed, size and CAT settings)"
        )


def _group_device(group: Any) -> torch.device:
    """NCCL moves CUDA tensors only; gloo, CPU tensors."""
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
