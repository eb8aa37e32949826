"""CAT under diffusers' model parallelism (issue 13): Flux with Ulysses context parallelism and with
tensor parallelism, 2 ranks on the CPU with gloo (parallel_worker.py under torch.distributed.run,
60 s timeout on every collective, the whole launch bounded), against one process.

Each parallel run is compared with the one-process run of the same settings: model parallelism
alone and with CAT at keep_ratio 1 equal dense; CAT (either order of patch() and
enable_parallelism()) equals one-process CAT, with the same tokens selected at every step on
every rank. What is not supported fails at once with a message, not a hang."""

from __future__ import annotations

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
SCENARIOS = ["cp-dense", "cp-one", "tp-dense", "tp-one", *MATCHED, *REFUSED]
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; measured: <= 1.5e-6 (the split changes summation orders)


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


@pytest.fixture(scope="module")
def one_process():
    dense = worker.generate(worker.build())
    pipe = worker.build()
    cat_pruning.patch(pipe, **worker.SETTINGS)
    return dense, worker.generate(pipe)


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("trace")
    return result


@pytest.mark.parametrize("scenario", ["cp-dense", "cp-one", "tp-dense", "tp-one"])
def test_parallel_dense_and_keep_all_equal_one_process_dense(ranks, one_process, scenario):
    dense, _ = one_process
    for rank in ranks:
        torch.testing.assert_close(_ok(rank[scenario])["latents"], dense["latents"], **TOL)
    if scenario.endswith("one"):
        assert "pruned" in ranks[0][scenario]["modes"]


@pytest.mark.parametrize("scenario", MATCHED)
def test_parallel_cat_equals_one_process_cat(ranks, one_process, scenario):
    dense, cat = one_process
    assert cat["modes"] == ["dense", "anchor", "fill", "pruned", "pruned", "refresh"]
    assert not torch.allclose(cat["latents"], dense["latents"], **TOL)  # the comparison can tell CAT from dense
    for rank in ranks:
        got = _ok(rank[scenario])
        assert got["modes"] == cat["modes"] and got["tokens_kept"] == cat["tokens_kept"] == 12
        assert len(got["picks"]) == len(cat["picks"]) == 4
        for mine, want in zip(got["picks"], cat["picks"], strict=True):
            assert torch.equal(mine, want)  # the same tokens on every rank and in one process
        torch.testing.assert_close(got["latents"], cat["latents"], **TOL)


@pytest.mark.parametrize(("scenario", "message"), [
    ("cp-disagree", r"ranks of this parallel group disagree \(per rank: hidden_states sum"),
    ("ring", r"ring attention .* not supported with CAT; use ContextParallelConfig\(ulysses_degree=N\)"),
    ("sd3", r"SD3.*model parallelism .* Flux only.*data parallelism.*--prompts-file"),
])
def test_what_is_not_supported_fails_with_a_message(ranks, scenario, message):
    import re

    for rank in ranks:
        assert "error" in rank[scenario], f"{scenario} ran"
        assert rank[scenario]["error"].startswith("ValueError") and re.search(message, rank[scenario]["error"])


def test_context_parallel_rounds_k_up_to_a_multiple_of_the_ranks():
    from cat_pruning.parallel import Sharding
    from cat_pruning.state import CATState

    state = CATState(cat_pruning.CATConfig(keep_ratio=0.3), "manual", layout=None)
    assert state.tokens_kept(30) == 9
    state.shard = Sharding(cp_world=2)
    assert state.tokens_kept(30) == 10
    state.shard = Sharding(cp_world=4)
    with pytest.raises(ValueError, match="30 image tokens do not split over ulysses_degree=4"):
        state.tokens_kept(30)
