"""CAT under diffusers' model parallelism (issue 13): Flux.1, FLUX.2 and Qwen-Image with Ulysses context
parallelism and with tensor parallelism, Wan with context parallelism, 2 ranks on the CPU with gloo
(parallel_worker.py under torch.distributed.run, 60 s timeout on every collective, the whole launch
bounded), against one process.

Each parallel run is compared with the one-process run of the same settings: model parallelism
alone and with CAT at keep_ratio 1 equal dense; CAT (either order of patch() and
enable_parallelism()) equals one-process CAT, with the same tokens selected at every step on
every rank. What is not supported fails at once with a message, not a hang."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import parallel_worker as worker
import pytest
import torch

import cat_pruning

if not hasattr(diffusers, "TensorParallelConfig"):  # diffusers' tensor parallelism came after 0.36
    pytest.skip(f"diffusers {diffusers.__version__} has no TensorParallelConfig", allow_module_level=True)

HERE = Path(__file__).parent
MATCHED = ["cp-after", "cp-before", "tp-after", "tp-before"]
REFUSED = ["cp-disagree", "ring", "sd3"]
# K not a multiple of the ranks (9 of 30 tokens on 2 ranks): PADDED's settings, both orders
PADDED = ["cp-after+pad", "cp-before+pad", "cp-after+pad-reuse", "cp-after+pad-refresh", "cp-after+pad-rebase1",
          "cp-after+pad-rebase"]
# FLUX.2 (scenarios prefixed "flux2/"): its fused single-stream projection is split by diffusers'
# packed column plan under tensor parallelism
FLUX2 = ["flux2/cp-dense", "flux2/cp-one", "flux2/tp-dense", "flux2/tp-one", "flux2/cp-after", "flux2/cp-before",
         "flux2/tp-after", "flux2/tp-before", "flux2/cp-after+pad"]
# Qwen-Image ("qwen/"): diffusers splits the sequence after the patch embedding, the rotary
# tables and the text mask per block; true CFG, a padded prompt
QWEN = [name.replace("flux2/", "qwen/") for name in FLUX2]
# Wan ("wan/", context parallelism only: diffusers has no tensor-parallel plan for it): the sequence
# and a per-token timestep split after the patch embedding, the rotary tables per block; CFG per branch
WAN = [name.replace("flux2/", "wan/") for name in FLUX2 if "/tp-" not in name]
TI2V = ["ti2v/cp-after", "ti2v/cp-after+pad"]  # the per-token timestep (WanPipeline's expand_timesteps)
# output_cache="hidden": the cache at the final norm's input, which context parallelism splits
HIDDEN = ["cp-after+hidden", "tp-after+hidden", "qwen/cp-after+hidden", "wan/cp-after+hidden"]
# kv_dtype="float8": each rank holds some heads of every K/V row, quantized per head as in one process
FLOAT8 = ["cp-after+float8", "tp-after+float8", "cp-after+float8-reuse", "wan/cp-after+float8"]
# fused_attention with K padded: the repeated rows among the extra keys once; Qwen's padded prompt
FUSED = ["cp-after+pad-fused", "qwen/cp-after+pad-fused", "wan/cp-after+pad-fused"]
SCENARIOS = ["cp-dense", "cp-one", "tp-dense", "tp-one", *MATCHED, *PADDED, *REFUSED, *FLUX2, *QWEN, *WAN, *TI2V,
             *HIDDEN, *FLOAT8, *FUSED]
# fp32; the split only changes summation orders. Measured: latents <= 2.9e-6; noise predictions
# (|noise| up to 42) <= 1.9e-5, at most 0.55 of this tolerance, with K padded or not
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "parallel_worker.py"), str(out), *SCENARIOS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@functools.cache
def one_process(family: str, variant: str = "") -> dict:
    """The one-process run of a family: dense ("dense"), or patched with SETTINGS ("") or
    PADDED[variant]."""
    pipe = worker.build(family)
    if variant != "dense":
        cat_pruning.patch(pipe, **(worker.PADDED[variant] if variant else worker.SETTINGS))
    return worker.generate(pipe)


def _family(scenario: str) -> tuple[str, str]:
    family, _, scenario = scenario.rpartition("/")
    return family or "flux", scenario


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("trace")
    return result


@pytest.mark.parametrize("scenario", ["cp-dense", "cp-one", "tp-dense", "tp-one", *FLUX2[:4], *QWEN[:4], *WAN[:2]])
def test_parallel_dense_and_keep_all_equal_one_process_dense(ranks, scenario):
    dense = one_process(_family(scenario)[0], "dense")
    for rank in ranks:
        torch.testing.assert_close(_ok(rank[scenario])["latents"], dense["latents"], **TOL)
    if scenario.endswith("one"):
        assert "pruned" in ranks[0][scenario]["modes"]


@pytest.mark.parametrize("scenario", [*MATCHED, *FLUX2[4:8], *QWEN[4:8], *WAN[2:4], TI2V[0]])
def test_parallel_cat_equals_one_process_cat(ranks, scenario):
    family = _family(scenario)[0]
    dense, cat = one_process(family, "dense"), one_process(family)
    assert cat["modes"] == ["dense", "anchor", "fill", "pruned", "pruned", "refresh"]
    assert not torch.allclose(cat["latents"], dense["latents"], **TOL)  # the comparison can tell CAT from dense
    for rank in ranks:
        got = _ok(rank[scenario])
        assert got["modes"] == cat["modes"] and got["tokens_kept"] == cat["tokens_kept"] == 12
        assert len(got["picks"]) == len(cat["picks"]) == 4
        for mine, want in zip(got["picks"], cat["picks"], strict=True):
            assert torch.equal(mine, want)  # the same tokens on every rank and in one process
        torch.testing.assert_close(got["latents"], cat["latents"], **TOL)


@pytest.mark.parametrize("scenario", [*HIDDEN, *FLOAT8, *FUSED])
def test_model_parallel_with_the_hidden_cache_fp8_kv_or_fused_attention_equals_one_process(ranks, scenario):
    """output_cache="hidden": under context parallelism each rank holds a share of the final norm's
    input rows; the store gets every rank's and each rank goes on with its share of the full rows.
    kv_dtype="float8": each rank quantizes its heads of every K/V row, as one process does.
    fused_attention with K padded to the ranks: each selected row is attended once.
    The ranks make one process's selections and latents (tensor parallelism: whole rows anyway)."""
    family, local = _family(scenario)
    want, dense = one_process(family, local.partition("+")[2]), one_process(family, "dense")
    assert "pruned" in want["modes"] and not torch.allclose(want["latents"], dense["latents"], **TOL)
    for rank in ranks:
        got = _ok(rank[scenario])
        assert got["modes"] == want["modes"] and len(got["picks"]) == len(want["picks"]) > 0
        for mine, ref in zip(got["picks"], want["picks"], strict=True):
            assert torch.equal(mine[:, : ref.shape[1]], ref)  # (K padded to the ranks: repeats after)
        torch.testing.assert_close(got["latents"], want["latents"], **TOL)


@pytest.mark.parametrize("scenario", [*PADDED, FLUX2[8], QWEN[8], WAN[4], TI2V[1]])
def test_context_parallel_with_k_not_a_multiple_of_the_ranks_equals_one_process(ranks, scenario):
    """K = 9 tokens on 2 ranks: the ranks compute 10 rows, the 9 selected and a repeat of one of
    them, and get one process's noise predictions at every step (the pruned steps included), its
    selections, token counts and latents. Tolerance: TOL, as CP against one process above (fp32;
    the sequence split only changes summation orders: the dense steps differ by 2.6e-6).
    Computing a tenth token instead, as K rounded up to 10 did, moved the noise predictions of
    the pruned steps by up to 42 and the latents by up to 8.8."""
    family, name = _family(scenario)
    want = one_process(family, name.partition("+")[2])  # one process: no padding, K = 9 rows per pruned step
    assert want["modes"] == ["dense", "anchor", "fill", "pruned", "pruned", "refresh"] and want["tokens_kept"] == 9
    assert want["repeats"] == [] and all(pick.shape == (1, 9) for pick in want["picks"])  # one process: no padding
    for rank in ranks:
        got = _ok(rank[scenario])
        assert got["modes"] == want["modes"] and got["tokens_kept"] == want["tokens_kept"]
        assert got["tokens"] == want["tokens"] == [30, 30, 30, 9, 9, 30]  # the selection, not the rows
        assert (got["padded_rows"], want["padded_rows"]) == (1, 0)  # ... but the MACs count the repeat too
        assert got["macs"] > want["macs"]
        # a repeated token counts once in the times each token was computed
        assert torch.equal(got["recomputed"], want["recomputed"])
        # the same selection; the 10th row repeats its first token
        assert len(got["picks"]) == len(want["picks"]) == 4
        for mine, ref in zip(got["picks"], want["picks"], strict=True):
            assert torch.equal(mine[:, :9], ref) and torch.equal(mine[:, 9:], ref[:, :1])
        # the repeated rows handed to the caches equal their originals bitwise, at both pruned
        # steps, in every attention layer (K and V) and the output
        model = worker.build(family).transformer
        layers = len(cat_pruning.adapters.find_adapter(model).attention_modules(model))  # the cached ones
        assert len(got["repeats"]) == got["branches"] * 2 * (2 * layers + 1)  # (true CFG: per branch)
        if family == "ti2v":
            # Each rank embeds its rows' timesteps in one GEMM, and the CPU's rounds a block's
            # remainder row differently (rows 0-3 and row 4 of 5 equal timesteps differ in the last
            # bits), so a repeat computed at another row than its original differs by rounding
            assert max(got["repeats"]) <= TOL["atol"]
        else:
            assert max(got["repeats"]) == 0.0
        assert len(got["noise"]) == len(want["noise"]) == worker.STEPS * got["branches"]
        for step, (mine, ref) in enumerate(zip(got["noise"], want["noise"], strict=True)):
            torch.testing.assert_close(mine, ref, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
        torch.testing.assert_close(got["latents"], want["latents"], **TOL)


@pytest.mark.parametrize(("scenario", "message"), [
    ("cp-disagree", r"ranks of this parallel group disagree \(per rank: hidden_states sum"),
    ("ring", r"ring attention .* not supported with CAT; use ContextParallelConfig\(ulysses_degree=N\)"),
    ("sd3", r"SD3.*model parallelism .* Flux.1, FLUX.2, Qwen-Image and Wan only.*data parallelism.*--prompts-file"),
])
def test_what_is_not_supported_fails_with_a_message(ranks, scenario, message):
    import re

    for rank in ranks:
        assert "error" in rank[scenario], f"{scenario} ran"
        assert rank[scenario]["error"].startswith("ValueError") and re.search(message, rank[scenario]["error"])


def _state(keep_ratio: float, world: int = 1):
    from cat_pruning.parallel import Sharding
    from cat_pruning.state import CacheLayout, CATState

    state = CATState(cat_pruning.CATConfig(keep_ratio=keep_ratio, forecast="none"), "manual",
                     layout=lambda geometry, shard: CacheLayout({}, 4, torch.float32))
    state.shard = Sharding(cp_world=world) if world > 1 else state.shard
    return state


def _geometry(num_tokens: int):
    from cat_pruning.state import Geometry

    return Geometry(1, 1, num_tokens, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(("world", "keep_ratio", "num_tokens", "kept", "selection", "rows"), [
    (2, 0.3, 30, 9, [0, 3, 6, 9, 12, 15, 18, 21, 24], [0, 3, 6, 9, 12, 15, 18, 21, 24, 0]),
    (4, 0.1, 32, 4, [5, 9, 20, 31], [5, 9, 20, 31]),  # K a multiple of the ranks: no padding
    (4, 0.02, 32, 1, [7], [7, 7, 7, 7]),  # more repeats than selected tokens
])
def test_context_parallel_pads_the_selection_with_repeats(world, keep_ratio, num_tokens, kept, selection, rows):
    """K stays the config's (one process's selection); the rows a pruned step computes are K
    rounded up to a multiple of the ranks, the selection then repeats of its first tokens."""
    state = _state(keep_ratio, world)
    assert state.tokens_kept(num_tokens) == kept
    state.begin_forward(_geometry(num_tokens))
    assert (state.kept, state.k, state.padding) == (kept, len(rows), len(rows) - kept)
    state._allocate()
    state._set_selection(torch.tensor([selection]))
    assert state.selected.tolist() == [selection] and state.idx.tolist() == [rows]
    assert state.selected.data_ptr() == state.idx.data_ptr()  # a view: the state keeps one index tensor


def test_context_parallel_needs_the_image_tokens_to_split_over_the_ranks():
    with pytest.raises(ValueError, match="30 image tokens do not split over ulysses_degree=4"):
        _state(0.3, world=4).tokens_kept(30)


def test_one_process_does_not_pad():
    """World size 1: the rows a pruned step computes are the K selected, nothing repeated."""
    state = _state(0.3)
    state.begin_forward(_geometry(30))
    assert (state.kept, state.k, state.padding) == (9, 9, 0)
    pipe = worker.build()
    cat_pruning.patch(pipe, **worker.PADDED["pad"])
    got = worker.generate(pipe)
    state = pipe.transformer._cat_pruning.state
    assert (state.kept, state.k, state.padding) == (9, 9, 0) and got["repeats"] == []
    assert state.idx.shape == state.selected.shape == (1, 9) and torch.equal(state.idx, state.selected)
    assert got["tokens"] == [30, 30, 30, 9, 9, 30] and all(pick.shape == (1, 9) for pick in got["picks"])
    assert len(set(state.idx[0].tolist())) == 9


def test_stats_say_when_a_pruned_step_computes_repeated_rows():
    from cat_pruning.stats import CATStats, StepStats

    def header(padded_rows: int) -> str:
        steps = [StepStats(0, "fill", 30), StepStats(1, "pruned", 9)]
        return str(CATStats("Flux", cat_pruning.CATConfig(keep_ratio=0.3), 30, 9, 1, steps, 10, 20, 0,
                            padded_rows=padded_rows)).splitlines()[0]

    assert "repeat" not in header(0)
    assert header(1).endswith("full_steps 8); a pruned step computes 10 rows per sample, 1 of them a repeat of a "
                              "selected token (context parallelism splits the rows evenly over the ranks)")
    assert "11 rows per sample, 2 of them repeats of selected tokens" in header(2)
