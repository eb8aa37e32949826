"""Benchmarks of cat-pruning: kernel microbenchmarks, end-to-end runs, quality; table + JSON.

Usage (from the repository root)::

    python bench/run.py                                  # kernels suite, cuda if present else cpu
    python bench/run.py --suite kernels --device cpu     # --quick is the default on cpu
    python bench/run.py --suite all --device cuda --json out/bench-cuda.json
    python bench/run.py --filter gather --provider torch-ref,triton

Suites are modules next to this file, imported lazily by name: ``kernels`` (bench/kernel_bench.py),
``e2e`` (bench/e2e.py), ``quality`` (bench/quality.py and its quality_*.py parts), ``parallel``
(bench/parallel.py: CAT under diffusers' context / tensor parallelism, on ranks it launches). Each exposes
``run(args) -> list[dict]``, one record per case; ``args`` is this script's argparse namespace,
with the arguments this script does not know left in ``args.extra`` for the suite to parse. A missing suite module is
reported; it is an error (exit 2) only when that suite was asked for by name, not under
``--suite all``.

Output: a table on stdout, and JSON at ``--json PATH``. Without --json it goes to
``bench/results/local/<suite>-<device>.json`` (bench/results/local/ is git-ignored), or where the
suite's ``results_path(args)`` says, also under bench/results/local/ (the quality suite: one file
per ``--model``); suites write their other files (Markdown, plots) next to the JSON. A run writes
into the committed bench/results/ only when --json names a path there. The JSON is
``{"schema": 1, "argv": [...], "environment": {...}, "records": [...]}``; every record also
carries the environment fields (device_name, torch, triton, diffusers, git_sha, ...) and
``cmd``, a command line that reruns that one case. Record fields of the kernels suite: op,
provider, case, shape, dtype, median_ms, p20_ms, p80_ms, gbps, peak_gbps, frac_peak_bw,
check ("pass", "FAIL" with "error", or "n/a"), timer, repeats.

Exit status: 0 when every record checked passed or was not checked, 1 when any record is a
FAIL, 2 for a usage error or a suite asked for by name that is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):  # cat_kernels from the checkout, suites as top-level modules
    if p not in sys.path:
        sys.path.insert(0, p)

SUITES = {"kernels": "kernel_bench", "e2e": "e2e", "quality": "quality", "curve": "curve", "tokens": "tokens",
          "parallel": "parallel"}
RESULTS = BENCH / "results"  # committed results: written only when --json names a path here
LOCAL_RESULTS = RESULTS / "local"  # git-ignored: where runs without --json write
OUTPUT_HELP = """\
output:
  The table goes to stdout and the records to --json PATH (Markdown and plots of the quality and
  parallel suites next to it). Without --json: bench/results/local/<suite>-<device>.json, or the
  suite's own name in that folder (quality: quality-<device>.json, quality-photos-<device>.json),
  which is git-ignored; the committed files in bench/results/ are written only when --json names
  them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=OUTPUT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="kernels", choices=[*SUITES, "all"], help="suite to run (default kernels)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="device (default cuda when available, else cpu)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the records (default bench/results/local/<suite>-<device>.json, git-ignored; "
        "name a path under bench/results/ to update committed results)",
    )
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick", action="store_true", default=None, help="small shape set and few repeats (default on cpu)"
    )
    speed.add_argument("--full", dest="quick", action="store_false", help="all shapes (default on cuda)")
    parser.add_argument(
        "--filter",
        default=None,
        metavar="OP",
        help="run only cases whose id contains this text, e.g. gather or 'gather_tokens[bnc'",
    )
    parser.add_argument(
        "--provider", default=None, help="comma-separated providers to run (torch-ref, torch-baseline, triton, ext)"
    )
    parser.add_argument(
        "--shapes", default=None, help="kernels suite: comma-separated shape names (bench/kernel_bench.py), e.g. tiny"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for cpu runs (default 1 on cpu, see resolve_device)",
    )
    parser.add_argument(
        "--cudagraph", action="store_true", help="time with triton.testing.do_bench_cudagraph (no launch overhead)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    return args


def resolve_device(args: argparse.Namespace) -> None:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
    if args.quick is None:
        args.quick = args.device == "cpu"
    if args.threads is None and args.device == "cpu":
        # One thread unless asked: on a shared machine a descheduled OpenMP worker stalls every
        # parallel torch op (measured on the 2-core dev VM: the reference scatter took 27-40 ms
        # with 2 threads and 0.4 ms with 1), which would swamp what the providers differ in.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def load_suite(name: str):
    """The suite module, or None when its file is missing (other import errors propagate).

    Loaded from its file under a name of its own (bench_suite_<name>), so that a generic module
    name such as `kernels` cannot resolve to something else on sys.path (tests/kernels/)."""
    path = BENCH / f"{SUITES[name]}.py"
    if not path.exists():
        return None
    full = f"bench_suite_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def default_json(args: argparse.Namespace) -> Path:
    """bench/results/local/<suite>-<device>.json (git-ignored), unless the suite names its own file
    (``results_path(args)``, e.g. the quality suite's per-model names, also under bench/results/local/)."""
    if args.suite != "all":
        try:
            hook = getattr(load_suite(args.suite), "results_path", None)
        except Exception:  # noqa: BLE001 - the import error is reported when the suite runs
            hook = None
        if hook is not None:
            return hook(args)
    return LOCAL_RESULTS / f"{args.suite}-{args.device}.json"


# --------------------------------------------------------------------------- table


def _fmt_time(ms: Any) -> str:
    return "" if ms is None else f"{ms * 1e3:.1f}"


def _fmt_shape(shape: Any) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return "" if shape is None else str(shape)


def table(records: list[dict[str, Any]]) -> str:
    """A fixed-width text table: one row per record, times in microseconds."""
    cols = [
        ("case", lambda r: str(r.get("case") or r.get("op") or r.get("name", ""))),
        ("provider", lambda r: str(r.get("provider", ""))),
        ("shape", lambda r: _fmt_shape(r.get("shape"))),
        ("dtype", lambda r: str(r.get("dtype", ""))),
        ("median us", lambda r: _fmt_time(r.get("median_ms"))),
        ("p20 us", lambda r: _fmt_time(r.get("p20_ms"))),
        ("p80 us", lambda r: _fmt_time(r.get("p80_ms"))),
        ("GB/s", lambda r: "" if r.get("gbps") is None else f"{r['gbps']:.1f}"),
        ("%peak", lambda r: "" if r.get("frac_peak_bw") is None else f"{100 * r['frac_peak_bw']:.0f}%"),
        ("GFLOP/s", lambda r: "" if r.get("tflops") is None else f"{r['tflops'] * 1e3:.1f}"),
        ("check", lambda r: str(r.get("check", ""))),
    ]
    cols = [(h, f) for h, f in cols if h in ("case", "provider", "check") or any(f(r) for r in records)]
    rows = [[f(r) for _, f in cols] for r in records]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, (h, _) in enumerate(cols)]
    numeric = {"median us", "p20 us", "p80 us", "GB/s", "%peak", "GFLOP/s"}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if h in numeric else c.ljust(w) for c, w, (h, _) in zip(cells, widths, cols, strict=True)
        ).rstrip()

    out = [line([h for h, _ in cols]), line(["-" * w for w in widths])]
    prev = None
    for r, row in zip(records, rows, strict=True):
        key = r.get("case")
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(row))
    fails = [r for r in records if r.get("check") == "FAIL"]
    for r in fails:
        out.append(f"FAIL {r.get('case', r.get('op'))} [{r.get('provider')}]: {r.get('error', '')}")
        if r.get("cmd"):
            out.append(f"     rerun: {r['cmd']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def run_suites(args: argparse.Namespace, names: list[str], env: dict[str, Any], records: list, write) -> int:
    """Runs each suite in turn, appending its records and writing the JSON after each one."""
    import common

    status = 0
    for name in names:
        try:
            suite = load_suite(name)
        except Exception:  # noqa: BLE001 - e.g. the suite needs diffusers and it is not installed
            traceback.print_exc()
            print(f"bench: suite {name!r} failed to import; continuing", file=sys.stderr)
            status = status or 1
            continue
        if suite is None:
            print(f"bench: suite {name!r} is not available (bench/{SUITES[name]}.py is missing)", file=sys.stderr)
            if args.suite != "all":
                status = 2
            continue
        interrupted = False
        try:
            recs = suite.run(args)
        except KeyboardInterrupt as exc:
            recs = getattr(exc, "partial_records", [])
            print(f"bench: interrupted in suite {name!r}; keeping {len(recs)} records of it", file=sys.stderr)
            interrupted = True
        except Exception:  # noqa: BLE001 - one broken suite must not lose the others
            traceback.print_exc()
            print(f"bench: suite {name!r} raised; continuing", file=sys.stderr)
            status = status or 1
            continue
        for r in recs:
            r.setdefault("suite", name)
            for k, v in env.items():
                r.setdefault(k, v)
            r.setdefault("cmd", common.command_line(["--suite", name, "--device", args.device]))
        records.extend(recs)
        write()  # after each suite, so a later suite's crash or timeout keeps these
        if interrupted:
            return 130
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolve_device(args)
    import common

    names = list(SUITES) if args.suite == "all" else [args.suite]
    env = common.environment(args.device)
    print(
        f"bench: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
        f"diffusers {env['diffusers']} | git {env['git_sha']} | quick={args.quick}",
        file=sys.stderr,
    )
    if args.device == "cuda":
        print(f"bench: measured copy bandwidth {common.peak_bandwidth_gbps('cuda'):.0f} GB/s", file=sys.stderr)

    path = args.json or default_json(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []

    def write() -> None:
        doc = {
            "schema": 1,
            "argv": sys.argv[1:] if argv is None else argv,
            "environment": env,
            "peak_gbps": common.peak_bandwidth_gbps(args.device) if records else None,
            "records": records,
        }
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    # `timeout` sends SIGTERM: stop as on Ctrl-C, so the suites finished so far are kept.
    try:
        old_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        old_handler = None
    t0 = time.perf_counter()
    try:
        status = run_suites(args, names, env, records, write)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    elapsed = time.perf_counter() - t0

    if records:
        print(table(records))
    fails = sum(r.get("check") == "FAIL" for r in records)
    print(f"\nbench: {len(records)} records, {fails} FAIL, {elapsed:.1f} s", file=sys.stderr)
    write()
    print(f"bench: wrote {path}", file=sys.stderr)
    if status:
        return status
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
