"""Shared benchmark machinery: environment, timing, bandwidth ceiling, correctness, records.

Used by bench/run.py and the suites (bench/kernel_bench.py, bench/e2e.py, bench/quality.py).

Timing:
- CUDA: ``triton.testing.do_bench`` with quantiles (0.5, 0.2, 0.8); it flushes L2 between
  calls, so memory-bound numbers are cold-cache numbers. ``cudagraph=True`` uses
  ``do_bench_cudagraph`` instead (launch overhead removed); falls back to do_bench if capture fails.
- CPU: ``time.perf_counter`` around each call after warm-up, repeated until a time budget or a
  repeat count is met; the same three quantiles.

All times are in milliseconds in the records (``median_ms``, ``p20_ms``, ``p80_ms``).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
QUANTILES = (0.5, 0.2, 0.8)

# Correctness tolerances per output dtype, for float outputs that are computed (reductions):
# fp32 outputs of the token statistics accumulate in fp32 in every provider, but the order of
# the sum differs (a tree in a kernel, sequential in torch), so rtol ~ 1e-5 * log2(C) is enough;
# half-precision outputs allow a couple of ulps. Data-movement ops (gather, scatter) and integer
# outputs are compared exactly.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


# --------------------------------------------------------------------------- environment


def _version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(mod, "__version__", "unknown")


@functools.cache
def git_sha() -> str:
    """Short sha of HEAD, '-dirty' when tracked files differ; $CAT_BENCH_GIT_SHA overrides."""
    if os.environ.get("CAT_BENCH_GIT_SHA"):
        return os.environ["CAT_BENCH_GIT_SHA"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git or no .git (a copied tree)
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    proc = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                proc = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{proc} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


@functools.cache
def environment(device: str) -> dict[str, Any]:
    """Fields attached to every record: what ran, where, with which versions."""
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
    }


def command_line(argv: list[str]) -> str:
    """A shell command that reruns bench/run.py with `argv`, from the repository root."""
    return shlex.join(
        [
            *(["TRITON_INTERPRET=1"] if os.environ.get("TRITON_INTERPRET") == "1" else []),
            "python",
            "bench/run.py",
            *argv,
        ]
    )


# --------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    timer: str


def time_cpu(
    fn: Callable[[], object], warmup: int = 2, min_repeats: int = 5, max_repeats: int = 100, budget_s: float = 0.5
) -> Timing:
    """perf_counter around each call: `warmup` untimed calls, then at least `min_repeats` and at
    most `max_repeats` timed calls, stopping once `budget_s` seconds of timed calls are spent."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_repeats and (len(times) < min_repeats or spent < budget_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        spent += dt
    times.sort()
    return Timing(*(quantile(times, q) for q in QUANTILES), repeats=len(times), timer="perf_counter")


def time_cuda(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100, cudagraph: bool = False) -> Timing:
    """triton.testing.do_bench (L2 flushed between calls) or do_bench_cudagraph, quantiles 0.5/0.2/0.8."""
    import triton.testing

    if cudagraph:
        try:
            # do_bench_cudagraph captures on a side stream of its own.
            q = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=list(QUANTILES))
            return Timing(*q, repeats=-1, timer="do_bench_cudagraph")
        except Exception as exc:  # noqa: BLE001 - capture can fail for ops that sync; fall back
            print(f"bench: CUDA graph capture failed ({type(exc).__name__}: {exc}); using do_bench", file=sys.stderr)
    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(*q, repeats=-1, timer="do_bench")


def time_fn(fn: Callable[[], object], device: str, quick: bool, cudagraph: bool = False) -> Timing:
    if device == "cuda":
        return time_cuda(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100, cudagraph=cudagraph)
    if quick:
        return time_cpu(fn, warmup=1, min_repeats=3, max_repeats=20, budget_s=0.25)
    return time_cpu(fn, warmup=3, min_repeats=10, max_repeats=200, budget_s=1.0)


@functools.cache
def peak_bandwidth_gbps(device: str) -> float:
    """Measured device copy bandwidth in GB/s, bytes read plus written (the ceiling for GB/s).

    CUDA: a 1 GiB tensor.copy_ timed with do_bench. CPU: a 64 MiB copy_ with the current torch
    threads (a shared machine makes this noisy; it is only a yardstick).
    """
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    t = time_cuda(fn, rep_ms=200) if device == "cuda" else time_cpu(fn, warmup=2, min_repeats=10, budget_s=0.3)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- correctness


def _as_tuple(x: object) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare(expected: object, actual: object, exact: bool = False) -> str | None:
    """None when `actual` matches `expected` (tensors or tuples of tensors), else a short reason.

    Integer tensors and `exact=True` compare bit for bit; floats use TOLERANCES by dtype.
    """
    exp, act = _as_tuple(expected), _as_tuple(actual)
    if len(exp) != len(act):
        return f"returned {len(act)} outputs, expected {len(exp)}"
    for i, (e, a) in enumerate(zip(exp, act, strict=True)):
        if not isinstance(a, torch.Tensor):
            return f"output {i} is {type(a).__name__}, expected a tensor"
        if a.shape != e.shape:
            return f"output {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        if a.dtype != e.dtype:
            return f"output {i} has dtype {a.dtype}, expected {e.dtype}"
        e, a = e.detach().cpu(), a.detach().cpu()
        if exact or not e.is_floating_point():
            if not torch.equal(e, a):
                bad = int((e != a).sum())
                return f"output {i}: {bad}/{e.numel()} elements differ (exact comparison)"
            continue
        rtol, atol = TOLERANCES.get(e.dtype, TOLERANCES[torch.float32])
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)
        except AssertionError as exc:
            first = [ln for ln in str(exc).splitlines() if ln.strip()]
            return f"output {i}: " + "; ".join(first[1:3])
    return None


# --------------------------------------------------------------------------- cases and records


@dataclass
class Case:
    """One (op, provider, shape, dtype) to check and time.

    make() builds fresh inputs (a dict of tensors and values) on the device; call(inputs) runs
    the provider and returns its outputs (for in-place ops: the tensors it wrote); reference
    (inputs) gives the expected outputs from cat_kernels.reference. check=False marks a
    provider that computes something else on purpose (a lower bound), never compared.
    compare(fresh_inputs, actual), when given, replaces the comparison with the reference
    (for outputs where last-ulp differences may legitimately change a discrete result).
    """

    op: str
    provider: str
    case_id: str
    shape: dict[str, int]
    dtype: str
    make: Callable[[], dict[str, Any]]
    call: Callable[[dict[str, Any]], object]
    reference: Callable[[dict[str, Any]], object]
    nbytes: int | None = None
    flops: int | None = None
    exact: bool = False
    check: bool = True
    compare: Callable[[dict[str, Any], object], str | None] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_case(case: Case, device: str, quick: bool, cudagraph: bool = False) -> dict[str, Any]:
    """Check `case` against the reference on fresh inputs, then time it; one record."""
    rec: dict[str, Any] = {
        "op": case.op,
        "provider": case.provider,
        "case": case.case_id,
        "shape": dict(case.shape),
        "dtype": case.dtype,
        "bytes": case.nbytes,
        "flops": case.flops,
        "note": case.note,
        **case.extra,
    }
    try:
        if case.check:
            if case.compare is not None:
                actual = case.call(case.make())
                synchronize(device)
                reason = case.compare(case.make(), actual)
            else:
                expected = case.reference(case.make())
                # fresh inputs: in-place ops must not see the reference's writes
                actual = case.call(case.make())
                synchronize(device)
                reason = compare(expected, actual, exact=case.exact)
                del expected
            del actual
            if reason is not None:
                rec["check"] = "FAIL"
                rec["error"] = reason
                return rec
            rec["check"] = "pass"
        else:
            rec["check"] = "n/a"
        inputs = case.make()
        timing = time_fn(lambda: case.call(inputs), device, quick, cudagraph)
    except Exception as exc:  # noqa: BLE001 - one provider's crash must not stop the suite
        rec["check"] = "FAIL"
        rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return rec
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    rec.update(
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        repeats=timing.repeats,
        timer=timing.timer,
    )
    if case.nbytes:
        rec["gbps"] = case.nbytes / (timing.median_ms * 1e-3) / 1e9
        peak = peak_bandwidth_gbps(device)
        rec["peak_gbps"] = peak
        rec["frac_peak_bw"] = rec["gbps"] / peak
    if case.flops:
        rec["tflops"] = case.flops / (timing.median_ms * 1e-3) / 1e12
    return rec


def progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    """tqdm over `iterable` on stderr when tqdm is installed, else the iterable itself."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit="case",
        file=sys.stderr,
        leave=False,
        disable=os.environ.get("CAT_BENCH_NO_PROGRESS") == "1",
    )
