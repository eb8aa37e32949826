"""What an adapter tells the patch layer about one model family.

The patch layer is model-agnostic: it installs a forward hook on the patch embedding (gather
of the selected rows), a forward hook on the output projection (scatter into the noise cache,
selection of the next tokens), attention processors with a K/V cache, and a pre-hook for the
step bookkeeping. An adapter names those modules for its family, builds the processors,
reads the geometry of a call, refuses inputs it cannot handle, and counts MACs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..parallel import NONE, Sharding, local_out_features
from ..state import CacheLayout, CATState, Geometry


class Adapter:
    """Base class; one subclass per model family (see adapters/__init__.py for the registry)."""

    family: str = ""  # shown in errors and stats
    model_classes: tuple[str, ...] = ()  # diffusers class names this adapter handles
    patch_embed: str = ""  # submodule whose output is the (B, N, C) image tokens
    out_proj: str = ""  # submodule whose output is the (B, rows, C_out) per-token prediction
    # submodule whose first input is the last block's (B, rows, D) image hidden states: the seam of
    # CATConfig.output_cache="hidden" (the final norm, its modulation and out_proj run per token after it)
    final_norm: str = "norm_out"
    cfg_cond_first: bool = False  # the pipeline's CFG batch is [cond; uncond] rather than [uncond; cond]
    supports_parallel: bool = False  # its processors and hooks handle diffusers' model parallelism
    # Under context parallelism, whether the adapter gathers a pruned step's K rows at the model's
    # input (diffusers splits the sequence there: Flux) or the patch embedding's output is gathered
    # as in one process (diffusers splits after it: Qwen-Image)
    gathers_at_input: bool = False
    # pipeline components besides the transformer that the family's pipelines may carry and CAT
    # handles (others, e.g. an IP-Adapter's image_encoder or a controlnet, are refused at patch())
    components: tuple[str, ...] = ()
    # its cached attentions are softmax attention, which CATConfig.fused_attention fuses (not Sana's linear one)
    softmax_attention: bool = True

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError for a model configuration this adapter cannot patch. The default
        refuses attention layers whose processors CAT cannot replace: fused QKV projections, and
        group/spatial norms that mix tokens."""
        for name, attn in self.attention_modules(model).items():
            if getattr(attn, "fused_projections", False):
                raise ValueError(f"cat_pruning: {name} has fused QKV projections; call unfuse_qkv_projections() first")
            if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
                raise ValueError(f"cat_pruning: {name} normalises across tokens (group/spatial norm); not supported")

    def attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    def cross_attention_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Cross attentions from the image tokens to the text that keep their own processors
        (PixArt's and Wan's ``attn2``): their queries are per token and their keys the text, so
        they run on the computed rows unchanged; listed for MAC counting only."""
        return {}

    def make_processor(self, state: CATState, name: str, attn: nn.Module) -> object:
        raise NotImplementedError

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Raise ValueError for call inputs this adapter does not handle (ControlNet, ...)."""

    def check_pipeline(self, pipeline: Any) -> None:
        """Raise ValueError for a pipeline call this adapter does not handle (read when the call
        sets its timesteps, in eager code, whatever cfg_pairs the config gives)."""

    def reference_rows(self, pipeline: Any) -> int:
        """Rows after the image tokens that the pipeline call now setting its timesteps puts in
        every transformer input (FLUX.2's reference images), for families whose calls do not say
        it themselves: every step computes them (Geometry.reference). Read in eager code."""
        return 0

    def steps_run(self, pipeline: Any, model: nn.Module, timesteps: torch.Tensor) -> int:
        """How many of the pipeline call's `timesteps` run `model` (read when the call sets them,
        in eager code): all of them, but in a pipeline of two experts (Wan 2.2 A14B)."""
        return len(timesteps)

    def cfg_pairs(self, pipeline: Any) -> bool:
        """Whether the pipeline call now setting its timesteps runs classifier-free guidance, i.e.
        its transformer batch is two CFG halves (read once per call, in eager code)."""
        return bool(getattr(pipeline, "do_classifier_free_guidance", False))

    def install_hooks(self, model: nn.Module, state: CATState) -> list:
        """Extra seams of a family beyond the patch embedding, the output projection and the
        attention processors (Flux's rotary gather, Sana's depthwise convolution); returns
        handles with ``.remove()`` that unpatch removes, or :class:`PathHook` objects (for hooks
        on layers that LoRA may wrap), which the patch attaches and keeps attached."""
        return []

    def gather_embedding(self, state: CATState, output: torch.Tensor) -> torch.Tensor:
        """The patch embedding's output on a pruned step -> the rows the step computes. Default:
        (B, N, C) tokens (cat_pruning.adapters.base.gather_rows)."""
        return gather_rows(state, output)

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict) -> Geometry:
        """Default: latents (B, C, H, W) cut into patch_size x patch_size tokens (SD3, PixArt, DiT)."""
        hidden = hidden_states_arg(args, kwargs)
        p = model.config.patch_size
        b, _, h, w = hidden.shape
        return Geometry(b, h // p, w // p, hidden.dtype, hidden.device)

    def cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE) -> CacheLayout:
        """One (B, H, N, D) K and V cache per attention layer, in the dtype its projection computes
        in, and the noise cache in the output projection's shape. `shard`: how the model is split
        over ranks (families without model parallelism only ever get NONE)."""
        kv, joint = {}, {}
        for name, attn in self.attention_modules(model).items():
            heads = attn.heads
            shape = (geometry.batch, heads, geometry.num_tokens, attn.to_k.out_features // heads)
            kv[name] = (shape, compute_dtype(attn.to_k))
            if getattr(attn, "add_k_proj", None) is not None and geometry.text:  # joint: [image; text] keys
                joint[name] = (0, geometry.text)
        out = get_submodule(model, self.out_proj)
        return CacheLayout(kv, out.out_features, compute_dtype(out), joint=joint)

    def flat_cache_layout(self, model: nn.Module, geometry: Geometry, shard: Sharding = NONE,
                          text: bool = True) -> CacheLayout:
        """(B, N, H*D) K (after any rotation) and V caches, the layout of the processors built on
        CachedAttentionProcessor._attend_text_image (H: this rank's heads under model parallelism),
        and the noise cache in the output projection's shape. `text`: the layers attend the
        call's text rows jointly, before the image rows (not Wan's self attention)."""
        attns = self.attention_modules(model)
        kv = {name: ((geometry.batch, geometry.num_tokens, local_out_features(attn.to_k) // shard.cp_world),
                     compute_dtype(attn.to_k))
              for name, attn in attns.items()}  # fmt: skip
        out = get_submodule(model, self.out_proj)
        return CacheLayout(kv, out.out_features, compute_dtype(out), head_dims=head_dims(attns),
                           joint=joint_rows(kv, geometry, text))

    def hidden_layout(self, model: nn.Module, layout: CacheLayout) -> CacheLayout:
        """`layout` with the output cache moved to final_norm's input (output_cache="hidden"): the
        output projection's input width, in the dtype the model computes in."""
        out = self._out_linear(model)
        return dataclasses.replace(layout, out_channels=out.in_features, out_dtype=compute_dtype(out))

    def _out_linear(self, model: nn.Module) -> nn.Module:
        """The output projection (under a PEFT LoRA layer, its base layer)."""
        out = get_submodule(model, self.out_proj)
        return getattr(out, "base_layer", out)

    def per_token_timestep(self, pipeline: Any) -> bool:
        """Whether `pipeline` calls the model with one timestep per token, whose final modulation
        is then per token: output_cache="auto" is then "noise", and "hidden" is refused. Default:
        never."""
        return False

    def check_hidden_cache(self, args: tuple, kwargs: dict) -> None:
        """Raise ValueError for a call whose final layers are not per token given the last
        block's hidden state and per-sample inputs (output_cache="hidden"). Default: all are."""

    # ------------------------------------------------------------------ MAC accounting

    def head_macs_per_row(self, model: nn.Module) -> int:
        """Multiply-accumulates of the output projection for one row: what output_cache="hidden"
        adds per row that a pruned step does not compute."""
        out = self._out_linear(model)
        return out.in_features * out.out_features

    def linear_stream(self, name: str) -> str | None:
        """Which rows a Linear runs on: "image" (computed tokens), "text", "joint" (both, Flux's
        single-stream blocks), "sample" (once per sample), "patch" (all image tokens), or None
        (not counted)."""
        raise NotImplementedError

    def attention_shape(self, name: str, attn: nn.Module, rows: int, num_tokens: int, text: int) -> tuple[int, int]:
        """(queries, keys) of one attention layer when `rows` image tokens are computed."""
        raise NotImplementedError

    def text_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> int:
        """Default: the length of encoder_hidden_states (the second positional argument)."""
        ctx = encoder_hidden_states_arg(args, kwargs)
        return 0 if ctx is None else ctx.shape[1]

    def macs_per_sample(self, model: nn.Module, rows: int, num_tokens: int, text: int) -> int:
        """Multiply-accumulates of one forward for one sample with `rows` image tokens computed
        out of `num_tokens` and `text` text tokens: linears and convolutions by the rows they
        run on, plus QK^T and PV of every attention layer (the cross attentions': `rows` queries
        over `text` keys)."""
        total = 0
        per_stream = {"image": rows, "text": text, "joint": rows + text, "sample": 1, "patch": num_tokens}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                stream = self.linear_stream(name)
                if stream is not None:
                    total += per_stream[stream] * module.in_features * module.out_features
            elif isinstance(module, (nn.Conv2d, nn.Conv3d)) and name.startswith(self.patch_embed):
                kernel = math.prod(module.kernel_size)
                total += num_tokens * module.in_channels * kernel * module.out_channels // module.groups
        for name, attn in self.attention_modules(model).items():
            queries, keys = self.attention_shape(name, attn, rows, num_tokens, text)
            inner = attn.to_q.out_features if hasattr(attn, "to_q") else attn.inner_dim  # fused QKV: FLUX.2
            total += 2 * queries * keys * inner
        for attn in self.cross_attention_modules(model).values():
            total += 2 * rows * text * attn.to_q.out_features
        return total


def gather_rows(state: CATState, tokens: torch.Tensor) -> torch.Tensor:
    """The patch embedding's (B, N, C) output -> the (B, K, C) rows a pruned step computes, laid
    out in memory as the embedding laid out its N rows. diffusers' PatchEmbed returns a
    channel-major view (``flatten(2).transpose(1, 2)``), and the blocks' GEMMs and convolutions
    may round differently on the other layout, so keep_ratio 1 would not be bitwise dense (Sana in
    bfloat16 on the CPU). Strides are metadata: no host sync, and compiled code guards on them."""
    rows = state.gather(tokens)
    if tokens.dim() == 3 and not tokens.is_contiguous() and tokens.mT.is_contiguous():
        return rows.mT.contiguous().mT
    return rows


def head_dims(attns: dict[str, nn.Module]) -> dict[str, int]:
    """Channels per head of each attention layer (CacheLayout.head_dims)."""
    return {name: int(getattr(attn, "head_dim", 0) or attn.to_k.out_features // attn.heads)
            for name, attn in attns.items()}  # fmt: skip


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer's outputs have: the compute dtype of diffusers' layerwise casting when it
    is on (the weights are stored in another dtype, e.g. float8, and cast for each forward), else
    the weight's dtype. A PEFT LoRA layer answers for its base layer."""
    base = getattr(module, "base_layer", module)
    registry = getattr(base, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    return hook.compute_dtype if hook is not None else base.weight.dtype


@dataclasses.dataclass(eq=False)
class PathHook:
    """A forward hook (or pre-hook) registered by its module's path rather than on a module object.

    PEFT's LoRA layers take the place of the Linear (or Conv) they adapt and call it as their
    ``base_layer``; ``unload_lora_weights`` puts the base layer back. A hook left on the base layer
    would see the base output only (the LoRA branch added after it, on the rows it did not
    gather), so the patch calls :meth:`attach` before each call and the hook follows whatever
    module sits at the path now. Adapters may return these from ``install_hooks``."""

    path: str  # "" is the model itself
    fn: Callable
    pre: bool = False
    with_kwargs: bool = False
    module: nn.Module | None = None
    handle: Any = None

    def attach(self, model: nn.Module) -> None:
        module = model.get_submodule(self.path) if self.path else model
        if module is self.module:
            return
        self.remove()
        if self.pre:
            self.handle = module.register_forward_pre_hook(self.fn, with_kwargs=self.with_kwargs)
        else:
            self.handle = module.register_forward_hook(self.fn, with_kwargs=self.with_kwargs)
        self.module = module

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.module = self.handle = None


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise TypeError(
            f"{type(model).__name__} has no submodule {path!r}; this diffusers version is not supported"
        ) from err


def hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("cat_pruning: the transformer was called without a hidden_states tensor")
    return hidden


def joint_rows(kv: dict, geometry: Geometry, text: bool = True) -> dict[str, tuple[int, int]]:
    """For the layers of _attend_text_image: [text; image; reference] keys, so the text rows (when
    the layers attend them) before the image rows and the reference rows after them."""
    around = (geometry.text if text else 0, geometry.reference)
    return {name: around for name in kv} if any(around) else {}


def encoder_hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The text context of a transformer call (keyword or second positional argument), if any."""
    return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)


def pipeline_call_local(pipeline: Any, name: str, default: Any = None) -> Any:
    """A local variable of the pipeline's running ``__call__``, found up the Python stack; for
    pipelines that keep their guidance switch in a local only (PixArt, DiT)."""
    frame = sys._getframe(1)
    while frame is not None:
        local = frame.f_locals
        if local.get("self") is pipeline and name in local:
            return local[name]
        frame = frame.f_back
    return default


def refuse_diffusers_cache(model: nn.Module, patched: bool = False) -> None:
    """diffusers' own caches (CacheMixin.enable_cache) and CAT's do not combine: raise if the model
    has one, at patch() or (patched=True) at a call of a patched model."""
    if getattr(model, "is_cache_enabled", False):
        when = "was enabled on this patched" if patched else "is enabled on this"
        raise ValueError(f"cat_pruning: diffusers caching (enable_cache) {when} {type(model).__name__}; call "
                         "disable_cache() first, the two do not combine")


@functools.cache
def opens_cache_context(pipeline_cls: type) -> bool:
    """Whether a pipeline class's __call__ opens transformer.cache_context (read from its source
    once per class; False where the source cannot be read)."""
    try:
        return "cache_context(" in inspect.getsource(pipeline_cls.__call__)
    except (OSError, TypeError):
        return False


@functools.cache
def appends_image_latents(pipeline_cls: type) -> bool:
    """Whether a pipeline class's __call__ appends `image_latents` to the latents it gives the
    transformer (Kontext, FLUX.2's reference images), rather than keeping them for blending
    (img2img, inpaint, fill): read from its source once per class; False where it cannot be read."""
    try:
        return "cat([latents, image_latents]" in inspect.getsource(pipeline_cls.__call__)
    except (OSError, TypeError):
        return False


def random_inputs(device: str | torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """rand(*shape) for the adapters' real_inputs: standard-normal values drawn on the CPU from the
    global RNG, or an empty tensor on the meta device (MAC counting needs shapes only)."""
    meta = torch.device(device).type == "meta"

    def rand(*shape: int) -> torch.Tensor:
        if meta:
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.randn(*shape).to(device, dtype)

    return rand
