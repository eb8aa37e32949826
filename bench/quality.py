"""Quality suite: how close CAT Pruning's images stay to the dense ones, against its ablations and
against step/block-caching peers at matched MAC budgets, on one of the project's trained models.

    python bench/run.py --suite quality            # 32 prompts x 2 seeds (29 min with --threads 2)
    python bench/run.py --suite quality --quick    # 4 prompts x 1 seed
    python bench/run.py --suite quality --model photos   # the photo model (Flux architecture)
    python bench/run.py --suite quality --model video    # the video model (Wan architecture)

Unlike the kernels suite, this one runs its full set unless ``--quick`` is on the command line
(run.py turns --quick on by default on CPU; that default is ignored here). Suite options (after
the run.py ones): ``--prompts N --seeds S`` (size), ``--steps N`` and ``--guidance G`` (default:
the pipeline's own defaults, 28 and 4.0), ``--methods a,b`` (method ids, see below; the dense
reference always runs), ``--peer-warmup W`` (dense steps the peers keep, default 8 = CAT's
full_steps), ``--tune-items N`` (held-out tuning prompts, see below), ``--mac-items N``
(generations whose MACs are counted for data-dependent methods), ``--examples N``,
``--target-cat cat:K:F`` (the CAT setting whose MAC fraction the peers are tuned to, default
cat:0.3:8, the paper's default), ``--model tiny|photos|video`` (default tiny; see quality_models.py),
``--memo PATH`` (keep the tuning PSNRs in a file: the same command run again at the same commit
resumes a stopped run's tuning from it; quality_measure.Memo).

What runs, on the shipped tiny model (cat_pruning.tiny, a pixel-space SD3Transformer2DModel),
fp32, one prompt per pipeline call with CFG:

- the prompts are distinct captions of the project's scene generator (scene seeds from
  CAPTION_SEED_BASE on), each with generator seeds 0..S-1;
- tuned methods (peers, CAT-F) pick their threshold or schedule by PSNR on ``--tune-items``
  held-out items: the captions after the evaluated ones, with generator seed S, never scored;
- ``dense``: the unpatched pipeline, the reference image of every prompt+seed;
- CAT settings ``cat:K:F`` = cat_pruning.patched(pipe, keep_ratio=K, full_steps=F);
- ablations ``cat:K:F:field=value`` (any CATConfig field: selection, num_clusters, importance_fraction);
- peers, each with its threshold tuned so that its MAC fraction lands near CAT's (0.3, 8):
  ``cache-dit-dbcache`` (cache-dit's DBCache, F1B0), ``cache-dit-taylorseer`` (DBCache with
  cache-dit's TaylorSeer calibrator), ``diffusers-fbc`` (diffusers' FirstBlockCache),
  ``diffusers-magcache`` (diffusers' MagCacheConfig, its ratios from its own calibration mode run
  on the tuning prompts), ``diffusers-taylorseer`` (diffusers' TaylorSeerCacheConfig; the tiny pipeline opens no
  ``cache_context``, so one is opened around every transformer call here). A peer that cannot
  run on SD3 is recorded with the exact error instead of being skipped. ``peer@cat:K:F`` tunes
  the peer to that CAT setting's MAC fraction instead (the defaults add the two peers that run
  at cat:0.2:8 and cat:0.5:8, so CAT is compared at three budgets).

With ``--model photos`` the same runs happen on the photo model (cat_pruning.photos, a
pixel-space FluxTransformer2DModel: double- and single-stream blocks, rotary positions), called
without a CFG batch as Flux is; its prompts are its captions (photo name and zoom), every photo
once before any twice; the cache-dit and diffusers peers hook both block stacks. With ``--model
video`` they run on the video model (cat_pruning.video, a pixel-space WanTransformer3DModel) with
held-out clip captions; its pipeline calls the transformer once per CFG branch inside
``cache_context`` as WanPipeline does, which the diffusers hooks use as it is and cache-dit runs
with ``enable_separate_cfg``; a clip is scored as its frames side by side (quality_models.py).

Measured per method: PSNR and SSIM of the final image against the dense image of the same
prompt+seed (mean and worst over prompts); the MAC fraction, counted the same way for every
method with FlopCounterMode over a whole pipeline call under sdpa_kernel(SDPBackend.MATH) so
attention is counted, divided by the dense count (one generation for methods whose compute
does not depend on the data: dense and CAT; the mean over --mac-items generations for the
threshold-driven peers); CPU wall clock of every generation, dense and methods interleaved
prompt by prompt in one run (rotating order), reported as the median over prompts of the
paired ratio dense/method, with torch.set_num_threads(1) as run.py sets it on CPU.

Outputs: one record per method in run.py's JSON; next to it a Markdown table sorted by MAC
fraction (quality-<device>.md), PSNR against MAC fraction (quality-<device>.png) and a picture
grid dense | CAT | best peer (quality-examples.png); for --model photos the names start with
quality-photos- instead. Without --json they go to bench/results/local/ (git-ignored); with
--json PATH they go next to PATH (name a path in bench/results/ to update committed results).

The parts, each readable on its own: quality_models.py (the models and their prompts),
quality_methods.py (method ids -> sessions: CAT settings, ablations, peers), quality_peers.py
(probing and tuning a peer to a MAC budget), quality_measure.py (generations, MAC counting, the
measuring passes, records), quality_base.py (the Method type and the dense session they share),
quality_report.py (Markdown, reading, plot, example grid). They import one way:
quality_methods -> quality_peers -> quality_measure -> quality_base. This file parses the options
and runs the parts in order.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the quality_* parts, also when loaded by path

import quality_models  # noqa: E402
from quality_measure import (  # noqa: E402,F401
    Context,
    Memo,
    build_records,
    count_flops,
    generate,
    measure_macs,
    measure_quality,
)
from quality_methods import (  # noqa: E402,F401
    DEFAULT_METHODS,
    PEERS,
    Method,
    cat_method,
    make_methods,
    peer_method,
)
from quality_models import CAPTION_SEED_BASE, LOCAL_RESULTS, RESULTS  # noqa: E402,F401
from quality_peers import prepare_peer  # noqa: E402
from quality_report import markdown, output_paths, reading, summary, write_outputs  # noqa: E402,F401

REFERENCE_CAT = "cat:0.3:8"  # the paper's default: the MAC budget the peers are tuned to


# --------------------------------------------------------------------------- options


def parse_suite_args(args: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py --suite quality", add_help=False)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--methods", default=None)
    p.add_argument("--peer-warmup", type=int, default=8)
    p.add_argument("--tune-items", type=int, default=None)
    p.add_argument("--mac-items", type=int, default=None)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--target-cat", default=REFERENCE_CAT)
    p.add_argument("--model", default="tiny", choices=sorted(quality_models.MODELS))
    p.add_argument("--memo", default=None)
    opts, unknown = p.parse_known_args(getattr(args, "extra", []) or [])
    if unknown:
        raise SystemExit(f"bench quality: unknown options {unknown}")
    # run.py sets quick=True by default on CPU; this suite is quick only when asked for by name.
    quick = bool(getattr(args, "quick", False)) and "--quick" in sys.argv[1:]
    opts.quick = quick
    for name, small, full in (("prompts", 4, 32), ("seeds", 1, 2), ("tune_items", 1, 3), ("mac_items", 2, 8)):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise SystemExit(f"bench quality: --{name.replace('_', '-')} must be >= 1, got {value}")
        setattr(opts, name, value or (small if quick else full))
    opts.methods = [m.strip() for m in opts.methods.split(",") if m.strip()] if opts.methods else DEFAULT_METHODS
    opts.arch = quality_models.get(opts.model).arch
    return opts


def results_path(args: argparse.Namespace) -> Path:
    """Where run.py writes this suite's JSON without --json: per model, in the git-ignored
    bench/results/local/ (quality-cpu.json for the tiny model, quality-photos-cpu.json for the photo model)."""
    return output_paths(None, quality_models.get(parse_suite_args(args).model), args.device)[0]


def prompts(n: int) -> list[str]:
    """The tiny model's prompts: the first n distinct captions of its scene generator."""
    return quality_models.tiny_prompts(n)


# --------------------------------------------------------------------------- running


def run(args: Any) -> list[dict]:
    from cat_kernels import backend as kernel_backend

    opts = parse_suite_args(args)
    model = quality_models.get(opts.model)
    device = args.device
    torch.manual_seed(args.seed)
    pipe = model.load(device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    defaults = inspect.signature(type(pipe).__call__).parameters
    steps = opts.steps or defaults["num_inference_steps"].default
    guidance = opts.guidance if opts.guidance is not None else defaults["guidance_scale"].default
    captions = model.prompts(opts.prompts + opts.tune_items)
    items = [(p, s) for p in captions[: opts.prompts] for s in range(opts.seeds)]
    # Tuning runs on held-out items: the captions after the evaluated ones, with a generator seed
    # no evaluated item uses, so no schedule is picked on an image it is then scored on.
    tune_set = [(p, opts.seeds) for p in captions[opts.prompts :]]
    ctx = Context(pipe, items, steps, guidance, arch=model.arch, tune_set=tune_set)
    if opts.memo:
        import common

        header = dict(git=common.git_sha(), model=model.name, steps=steps, guidance=guidance, device=device)
        ctx.memo = Memo(opts.memo, header)
        print(f"bench quality: --memo {opts.memo}: {ctx.memo.resumed} tuning PSNRs from an earlier run",
              file=sys.stderr)  # fmt: skip
    methods = make_methods(opts)
    mac_items = items[: min(opts.mac_items, len(items))]
    no_bar = os.environ.get("CAT_BENCH_NO_PROGRESS") == "1"
    from tqdm.auto import tqdm

    # ---- MAC fractions and peer tuning (FlopCounterMode; not timed)
    ctx.bar = tqdm(desc="quality: MACs + peer tuning", unit="gen", file=sys.stderr, disable=no_bar)
    ref = opts.target_cat
    macs, stats_frac = measure_macs(ctx, methods, mac_items, ref, cat_method, prepare_peer)
    ctx.bar.close()

    # ---- quality and wall clock: per prompt+seed, dense and every method, rotating order
    q = measure_quality(ctx, methods, ref, no_bar)

    # ---- records
    backend = kernel_backend.resolve(torch.device(device))
    shape = dict(prompts=opts.prompts, seeds=opts.seeds, items=len(items), tune_items=len(tune_set), steps=steps,
                 guidance=guidance, size=int(q.first_dense.shape[-1]))  # fmt: skip
    common_fields = dict(op="quality", device=device, shape=shape, dtype="float32", timer="perf_counter",
                         threads=torch.get_num_threads(), dense_flops=ctx.dense_flops,
                         target_mac_fraction=ctx.target, reference_cat=ref, cat_backend=backend,
                         dense_reproducible=q.dense_reproducible, check="n/a", model=model.name,
                         arch=model.arch)  # fmt: skip
    records = build_records(methods, q, macs, stats_frac, items, common_fields, ref)

    # ---- report
    names = {mid: m.name for mid, m in q.by_id.items()}
    outputs = write_outputs(records, shape, opts, model, args.json, device, q.examples, names, items, ref)
    import common

    base = ["--suite", "quality", "--device", device, *(["--quick"] if opts.quick else []), *args.extra]
    for r in records:
        r["outputs"] = outputs
        r["cmd"] = common.command_line(base)
    print(summary(records))
    return records
