"""Machinery shared by the per-family model tests (SD3, PixArt, DiT, Flux, Sana): random tiny models,
the toy denoising loop, and the checks every family runs against the dense diffusers path. Each
check takes the family (its step loop, step counts), a model built by the family's builder, its
inputs and what differs between families; the family files keep their builders, oracles and
family-specific tests."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

import cat_pruning

# One tolerance table per dtype. The patched model runs the same operations as the unpatched
# one, but attention over compacted queries and the cached keys (and, in Sana, the 1x1 convs
# over a K x 1 map) may change the summation order inside GEMMs and convs: allow a few ulps of
# the output scale (|out| ~ 5 to 10 here).
TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
    torch.float16: dict(atol=2e-2, rtol=5e-3),
}
F32 = TOL[torch.float32]


# ---------------------------------------------------------------------- models and the step loop


def random_model(cls, seed: int, dtype: torch.dtype, **config):
    """cls(**config) under a fixed seed with every parameter perturbed: random init leaves adaLN
    gates, scale-shift tables and output projections at (or near) zero, so without this the
    blocks would barely mix tokens and the output would not depend on all of them."""
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def denoise(model, kw: dict, steps: int, step_fn=None, *, t_max: float = 1000.0, channels: int | None = None,
            horizon: int | None = None):
    """A toy denoising loop: the latent moves with the prediction so every step differs. The
    timestep goes linearly from t_max towards 0 over `horizon` steps (default `steps`); with
    `channels` only the first channels of the output (the noise of a learned-sigma model) move the
    latent. step_fn runs after each step."""
    x = kw["hidden_states"]
    outs = []
    for i in range(steps):
        t = torch.full((x.shape[0],), t_max * (1 - i / (horizon or steps)), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            out = model(**{**kw, "hidden_states": x}, timestep=t, return_dict=False)[0]
        outs.append(out)
        if step_fn is not None:
            step_fn()
        x = x - 0.1 * (out if channels is None else out[:, :channels])
    return outs


@dataclasses.dataclass(frozen=True)
class Family:
    """What the shared checks need of a family: its step loop (a `denoise` variant), the number of
    steps a generation runs and the number of dense steps at its start."""

    run: Callable
    steps: int
    full: int


def tokens_of(out: torch.Tensor, height: int, width: int, p: int = 2) -> torch.Tensor:
    """(B, C, H*p, W*p) model output -> (B, H*W, p*p*C) per-token rows in proj_out's layout."""
    b, c = out.shape[:2]
    return out.view(b, c, height, p, width, p).permute(0, 2, 4, 3, 5, 1).reshape(b, height * width, -1)


def tool_module(name: str):
    """The script tools/<name>.py (a training script) loaded as a module, to call its main() and helpers."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_vae(latent_channels: int, levels: int = 1, **config):
    """A tiny AutoencoderKL for the pipeline tests (the caller seeds the global RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=latent_channels, **config,
    ).eval()


def assert_all_equal(xs, ys):
    for a, b in zip(xs, ys, strict=True):
        assert torch.equal(a, b)


def assert_all_close(got, want, tol):
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, **tol)


def permuted(v, perm, keys=None):
    """The inputs with the batch permuted: nested dicts recursively, None kept; with `keys` only
    those top-level entries (the others, e.g. position ids, have no batch dimension)."""
    if isinstance(v, dict):
        return {k: (permuted(x, perm) if keys is None or k in keys else x) for k, x in v.items()}
    return v if v is None else v[perm]


# The two cache-store behaviours the shared checks run under (ids for pytest): reuse (the paper),
# and the Taylor forecast with a full refresh every second step, so refresh steps run too.
# The noise cache is named: patch()'s default ("auto") is the hidden cache, which "forecast-hidden" checks.
NOISE = dict(output_cache="noise")
STORES = {"reuse": dict(NOISE, forecast="none", refresh_every=0),
          "forecast": dict(NOISE, forecast="taylor", refresh_every=2)}
# The masked-dense oracle (and SD3's torch.compile check) also run with the other forecast_from
# values (the default "refresh" reads a pruned step's rows without keeping them; "all" feeds them
# into value and slope, "rebase" into the value), and with the first-order output forecast (the
# default is second order), and with fp8 K/V caches or fp8 slopes (the oracle reads what the store
# dequantizes), and with pruned steps attending in one op (fused_attention; softmax attention
# only: LINEAR_STORES are those for Sana's linear attention).
STATEFUL_STORES = {**STORES, "forecast-from-all": dict(NOISE, forecast="taylor", refresh_every=2, forecast_from="all"),
                   "forecast-from-rebase": dict(NOISE, forecast="taylor", refresh_every=2, forecast_from="rebase"),
                   "forecast-order-1": dict(NOISE, forecast="taylor", refresh_every=2, forecast_order=1,
                                            forecast_damping=0.4),
                   "forecast-hidden": dict(forecast="taylor", refresh_every=2, output_cache="hidden"),
                   "reuse-float8": dict(NOISE, forecast="none", refresh_every=0, kv_dtype="float8"),
                   "forecast-float8": dict(forecast="taylor", refresh_every=2, kv_dtype="float8"),
                   "forecast-float8-values": dict(forecast="taylor", refresh_every=2, kv_dtype="float8-values"),
                   "forecast-float8-slopes": dict(forecast="taylor", refresh_every=2, slope_dtype="float8"),
                   "reuse-fused": dict(NOISE, forecast="none", refresh_every=0, fused_attention=True),
                   "forecast-fused": dict(forecast="taylor", refresh_every=2, fused_attention=True)}
LINEAR_STORES = {k: v for k, v in STATEFUL_STORES.items() if not v.get("fused_attention")}
# the two stores and the hidden output cache (patch()'s default)
HIDDEN_STORES = {**STORES, "forecast-hidden": STATEFUL_STORES["forecast-hidden"]}


# ---------------------------------------------------------------------- the shared checks


def check_keep_ratio_one_equals_dense(fam: Family, model, kw, tol, patch_kw: dict | None = None):
    dense = fam.run(model, kw, fam.steps)
    cat_pruning.patch(model, keep_ratio=1.0, full_steps=fam.full, backend="torch", **(patch_kw or {}))
    patched = fam.run(model, kw, fam.steps)
    assert "pruned" in [s.mode for s in cat_pruning.stats(model).steps]
    assert_all_close(patched, dense, tol)


def check_dense_steps_equal_unpatched(fam: Family, model, kw, patch_kw: dict | None = None):
    dense = fam.run(model, kw, fam.full)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=fam.full, backend="torch", **(patch_kw or {}))
    patched = fam.run(model, kw, fam.full)
    assert_all_equal(dense, patched)


def check_pruned_steps_match_oracle(fam: Family, model, kw, processor, to_tokens, num_tokens: int, *,
                                    cfg_pairs: bool | None = None, unpaired_differ: bool = False,
                                    extra_steps: int = 0, conv_hook=None, noise_width: int | None = None,
                                    check_idx=None, patch_kw: dict | None = None):
    """Every pruned step against the masked-dense oracle of docs/design.md section 3: a deep copy of the
    unpatched model whose cached attentions get `processor(k_cache, v_cache, selected)` (and, with
    `conv_hook(cache, selected)`, forward pre-hooks on the modules of the state's extra caches).
    Selected tokens match the oracle; unselected ones return the noise cache from before the step,
    bitwise. With output_cache="hidden" the cache holds the final norm's input instead: the oracle
    gets the cache's rows there for the unselected tokens (a pre-hook), and every row of the output
    must match it. `to_tokens` maps an output to (B, N, D) rows. cfg_pairs None: patch without it.
    With forecasting (patch_kw), "the cache" is what the cache store reads for the skipped rows:
    their forecasts for this step.
    With cfg_pairs the batch halves share a selection (with unpaired_differ they share it exactly
    when cfg_pairs). extra_steps: steps run past the timestep horizon of fam.steps."""
    oracle = copy.deepcopy(model)
    patch_kw = dict(patch_kw or {}, **({} if cfg_pairs is None else dict(cfg_pairs=cfg_pairs)))
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=fam.full, backend="torch", **patch_kw)
    state = model._cat_pruning.state
    hidden = state.config.output_cache == "hidden"
    checked = 0

    def step(**args):
        nonlocal checked
        if state.mode != "pruned":
            return model(**args)
        b = args["hidden_states"].shape[0]
        idx = state.idx.clone()
        selected = torch.zeros(b, num_tokens, dtype=torch.bool).scatter_(1, idx, True)
        store = state.cache
        kv = {name: store.skipped_kv(name) for name in store.kv_cache}
        extra = {name: store.skipped_rows(name) for name in store.extra} if conv_hook is not None else {}
        noise_before = store.skipped_output()
        result = model(**args)
        out = result[0]
        if check_idx is not None:
            check_idx(idx)
        for name, attn in model._cat_pruning.adapter.attention_modules(oracle).items():
            attn.set_processor(processor(*kv[name], selected))
        handles = [oracle.get_submodule(name).register_forward_pre_hook(conv_hook(cache, selected))
                   for name, cache in extra.items()]
        w = computed_weight(state, num_tokens)
        if hidden:
            final_norm = oracle.get_submodule(model._cat_pruning.adapter.final_norm)
            handles.append(final_norm.register_forward_pre_hook(_read_cache(noise_before, selected, w)))
        want = oracle(**args)[0]
        for handle in handles:
            handle.remove()
        got_rows, want_rows = to_tokens(out), to_tokens(want)
        if not hidden:  # the computed rows move from their forecast by w (CATConfig.computed_weight)
            want_rows = torch.where(selected.unsqueeze(-1), noise_before + w * (want_rows - noise_before), want_rows)
        torch.testing.assert_close(got_rows[selected], want_rows[selected], **F32)
        if hidden:
            torch.testing.assert_close(got_rows, want_rows, **F32)
            assert noise_before.shape[-1] == model.get_submodule(model._cat_pruning.adapter.out_proj).in_features
        elif noise_width is not None:
            assert noise_before.shape[-1] == noise_width
        if not hidden:
            assert torch.equal(got_rows[~selected], noise_before[~selected])
        if cfg_pairs or unpaired_differ:
            half = b // 2
            assert torch.equal(idx[:half], idx[half:]) == bool(cfg_pairs)
        checked += 1
        return result

    fam.run(step, kw, fam.steps + extra_steps, horizon=fam.steps)
    pruned = sum(s.mode == "pruned" for s in cat_pruning.stats(model).steps)
    assert checked == pruned > 0


def computed_weight(state, num_tokens: int) -> float:
    """How far a pruned step's computed output rows move from their forecast (CATConfig.computed_weight:
    w + (1 - w) K / N; 1 without a forecast)."""
    cfg = state.config
    if cfg.forecast != "taylor":
        return 1.0
    return cfg.computed_weight + (1.0 - cfg.computed_weight) * state.kept / num_tokens


def _read_cache(cache: torch.Tensor, selected: torch.Tensor, weight: float = 1.0):
    """A forward pre-hook that puts the (B, N, D) cache's rows in place of the unselected tokens' rows
    of the module's first input and moves the selected ones' rows from the cache's by `weight` (any
    reference rows after the N image rows pass through)."""

    def hook(module, args):
        rows = args[0].clone()
        n = cache.shape[1]
        c = cache.to(rows.dtype)
        rows[:, :n] = torch.where(selected.unsqueeze(-1), c + weight * (rows[:, :n] - c), c)
        return (rows, *args[1:])

    return hook


def check_reference_rows(fam: Family, build, kw, reference: int, patch_kw: dict | None = None):
    """kw's inputs end in `reference` rows that are not image tokens, declared with
    reset(reference_tokens=...): keep_ratio 1 equals dense over a generation with pruned steps;
    at keep_ratio 0.3 the selection never takes a reference row and every step computes them."""
    dense = fam.run(build(), kw, fam.steps)
    n = kw["hidden_states"].shape[1] - reference
    for keep in (1.0, 0.3):
        model = build()
        cat_pruning.patch(model, keep_ratio=keep, full_steps=fam.full, backend="torch", final_full_steps=0,
                          **(patch_kw or {}))
        cat_pruning.reset(model, reference_tokens=reference)
        state, picked = model._cat_pruning.state, []

        def record(*_, state=state, picked=picked):
            if state.mode == "pruned":
                picked.append(state.idx.clone())

        model.register_forward_pre_hook(record)
        outs = fam.run(model, kw, fam.steps)
        s = cat_pruning.stats(model)
        assert s.num_tokens == n and s.reference_tokens == reference and "pruned" in {st.mode for st in s.steps}
        assert picked and all(int(idx.max()) < n for idx in picked)
        if keep == 1.0:
            assert_all_close(outs, dense, F32)


def check_unpatch_bitwise(fam: Family, model, kw, *, patch_twice: bool = True, detour: dict | None = None,
                          after_unpatch=None):
    """Unpatching restores the dense outputs bitwise and leaves no cat_pruning processor behind
    (after_unpatch(model): the family's own leftovers check). patch_twice: patching again with
    the same config (after a `detour` patch with another config) runs exactly as patching once."""
    before = fam.run(model, kw, fam.steps)
    cat_pruning.patch(model, keep_ratio=0.5, full_steps=fam.full, backend="torch")
    once = fam.run(model, kw, fam.steps)
    if patch_twice:
        if detour is not None:
            cat_pruning.patch(model, backend="torch", **detour)
        cat_pruning.patch(model, keep_ratio=0.5, full_steps=fam.full, backend="torch")
        twice = fam.run(model, kw, fam.steps)
        assert_all_equal(once, twice)
    cat_pruning.unpatch(model)
    assert not cat_pruning.is_patched(model)
    after = fam.run(model, kw, fam.steps)
    assert_all_equal(before, after)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert not any(type(p).__module__.startswith("cat_pruning") for p in processors)
    if after_unpatch is not None:
        after_unpatch(model)


def check_samples_independent(fam: Family, model, kw, *, cfg_pairs: bool | None = None, keys=None,
                              perm=(2, 0, 1)):
    """Permuting the samples permutes the selections and the outputs. cfg_pairs True: the batch
    is two halves [x; y] permuted alike, which share a selection; None: patch without it. keys:
    the batched inputs (default all)."""
    perm = torch.tensor(perm)
    if cfg_pairs:
        perm = torch.cat([perm, perm + len(perm)])
    patch_kw = {} if cfg_pairs is None else dict(cfg_pairs=cfg_pairs)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=fam.full, backend="torch", **patch_kw)
    out = fam.run(model, kw, fam.steps)
    idx = model._cat_pruning.state.idx.clone()
    if cfg_pairs:
        half = len(perm) // 2
        assert torch.equal(idx[:half], idx[half:])
    cat_pruning.reset(model)
    again = fam.run(model, permuted(kw, perm, keys), fam.steps)
    assert torch.equal(model._cat_pruning.state.idx, idx[perm])
    for a, b in zip(out, again, strict=True):
        torch.testing.assert_close(b, a[perm], **F32)


def _counted_generation(fam: Family, model, kw, patch_kw: dict | None = None):
    """A patched generation under FlopCounterMode: (stats, the counted MACs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cat_pruning.patch(model, keep_ratio=0.3, full_steps=fam.full, backend="torch", **(patch_kw or {}))
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls the counter sees (CPU flash attention is not counted).
    with counter, sdpa_kernel(SDPBackend.MATH):
        fam.run(model, kw, fam.steps)
    return cat_pruning.stats(model), counter.get_total_flops() / 2


def check_hidden_cache_macs(fam: Family, build, kw):
    """output_cache="hidden" runs the output projection on every row of a pruned step: what it adds
    to stats().macs over "noise" is exactly what it adds to FlopCounterMode's count, and not 0."""
    noise, counted_noise = _counted_generation(fam, build(), kw, NOISE)
    hidden, counted_hidden = _counted_generation(fam, build(), kw, dict(output_cache="hidden"))
    assert [st.tokens for st in hidden.steps] == [st.tokens for st in noise.steps]
    assert hidden.macs - noise.macs == counted_hidden - counted_noise > 0


def check_macs_match_flop_counter(fam: Family, model, kw, tokens_kept: int):
    """stats().macs within 2% of FlopCounterMode's count over a generation; returns the stats."""
    s, measured = _counted_generation(fam, model, kw)
    # patch()'s defaults: refresh steps between the pruned ones, every one of them counted
    assert [st.mode for st in s.steps] == [s.config.mode(i) for i in range(fam.steps)]
    assert {st.mode for st in s.steps} >= {"refresh", "pruned"}
    assert [st.tokens for st in s.steps] == [tokens_kept if st.mode == "pruned" else s.num_tokens for st in s.steps]
    assert s.tokens_kept == tokens_kept
    assert abs(s.macs - measured) / measured < 0.02, (s.macs, measured)
    assert 0.3 < s.mac_fraction < 1.0
    return s


def check_meta_device(fam: Family, build, kw, out_shape=None):
    """build() under the meta device, patched with the default backend, runs a whole generation;
    the output has out_shape (default: the latent's)."""
    with torch.device("meta"):
        model = build()
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=fam.full)
    outs = fam.run(model, kw, fam.steps)
    want = kw["hidden_states"].shape if out_shape is None else out_shape
    assert outs[-1].shape == want and outs[-1].device.type == "meta"
    assert "pruned" in {st.mode for st in cat_pruning.stats(model).steps}


def check_real_config_macs_on_meta(fam: Family, model_cls, adapter, name: str, *, num_tokens: int,
                                   tokens_kept: int, **patch_kw):
    """adapter.REAL_CONFIGS[name] on the meta device in bf16: 6 steps, the first 2 dense, at least
    one pruned; returns the stats."""
    config, gen = adapter.REAL_CONFIGS[name]
    with torch.device("meta"):
        model = model_cls(**config).to(torch.bfloat16)
    kw = adapter.real_inputs(config, gen, "meta", torch.bfloat16)
    cat_pruning.patch(model, keep_ratio=0.3, full_steps=2, **patch_kw)
    cat_pruning.reset(model, num_steps=6, reference_tokens=gen.get("reference_rows", 0))  # what a bare call cannot show
    fam.run(model, kw, 6)
    s = cat_pruning.stats(model)
    modes = [step.mode for step in s.steps]
    assert "pruned" in modes, modes
    assert s.num_tokens == num_tokens and s.tokens_kept == tokens_kept
    assert 0.5 < s.mac_fraction < 1.0
    return s


def check_compile_fullgraph(fam: Family, model, kw, patch_kw: dict | None = None):
    """torch.compile(fullgraph=True) with manual_steps matches eager over two generations, compiles
    at most two graphs per step mode (the pre-hook and the forward are separate frames), never one
    per step, and nothing new in the second generation."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    patch_kw = dict(keep_ratio=0.3, full_steps=fam.full, backend="torch", **(patch_kw or {}))
    cat_pruning.patch(model, **patch_kw)
    eager = fam.run(model, kw, fam.steps)
    modes = {s.mode for s in cat_pruning.stats(model).steps}
    cat_pruning.patch(model, manual_steps=True, **patch_kw)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    counters.clear()
    outs, graphs = [], []
    for _ in range(2):
        cat_pruning.reset(model)
        outs.append(fam.run(compiled, kw, fam.steps, step_fn=lambda: cat_pruning.advance(model)))
        graphs.append(counters["stats"]["unique_graphs"])
    for gen in outs:
        assert_all_close(gen, eager, F32)
    assert 0 < graphs[0] <= 2 * len(modes) < 2 * fam.steps, (graphs, modes)
    assert graphs[1] == graphs[0], graphs
    torch._dynamo.reset()


def check_pipeline(fam: Family, pipe, call, check_pruned):
    """The pipeline path: keep_ratio 1 matches dense, two pruned calls are equal and differ from
    dense (check_pruned(pipe) checks the family's stats and state right after them), unpatching
    restores dense bitwise."""
    dense = call(pipe)
    cat_pruning.patch(pipe, keep_ratio=1.0, full_steps=fam.full, backend="torch")
    torch.testing.assert_close(call(pipe), dense, **F32)
    # final_full_steps=0: these few-step generations end on the pruned step check_pruned reads
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=fam.full, backend="torch", final_full_steps=0)
    first, second = call(pipe), call(pipe)
    assert torch.equal(first, second)
    assert not torch.equal(first, dense)
    check_pruned(pipe)
    cat_pruning.unpatch(pipe)
    assert torch.equal(call(pipe), dense)
