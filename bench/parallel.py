"""Parallel suite: CAT on a Flux-architecture transformer under diffusers' model parallelism, the
bytes each rank's collectives move per denoising step and the wall clock of whole generations.

Scenarios (``--scenarios``, default all):

- ``cp-dense``, ``cp-cat``, ``cp-cat-paper``: Ulysses context parallelism
  (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))``) without CAT, with
  ``CATConfig()`` (CAT-F, keep 0.02, refresh every 3) and with ``CATConfig.paper()`` (keep 0.3);
- ``tp-dense``, ``tp-cat``: tensor parallelism (``TensorParallelConfig(tp_degree=W)``), without and
  with ``CATConfig()``;
- ``1p-dense``, ``1p-cat``, ``1p-cat-paper``: one process, the references for the wall clock and
  for the final latents (compared where K is the same).

The W ranks are launched by this suite itself (``python -m torch.distributed.run --standalone
--nproc_per_node W bench/parallel.py --worker DIR ...``, which is what ``torchrun`` runs): gloo
on the CPU, nccl with one GPU per rank on CUDA; all parallel scenarios run in that one launch,
each on a freshly built model (same seed, same weights on every rank), under ``--timeout``.

Traffic. While a rank generates, the collectives are wrapped at the module attributes their
callers look up at call time: ``torch.distributed._functional_collectives`` (``funcol``:
all_to_all_single, all_gather_tensor, all_gather_single, all_reduce, reduce_scatter_*, ...) and
``torch.distributed`` (all_gather, all_reduce, all_to_all_single, ...). That sees diffusers'
Ulysses all-to-alls and proj_out gather (``funcol.`` calls in attention_dispatch and
hooks/context_parallel), cat_pruning.parallel's own all-to-alls (``funcol`` imported inside the
function, resolved per call), its once-per-generation agreement check (``dist.all_gather``) and
DTensor's Partial -> Replicate reductions of tensor parallelism (``funcol.all_reduce`` from
torch.distributed.tensor.placement_types). Every call is recorded with the module that called
it, and each scenario checks that the sources it must have are there (a wrapper that missed a
path would show as zero calls: FAIL). A nested call (one wrapped function calling another) is
counted once, at the outermost. ``bytes`` is the payload this rank hands to the collective (the
input tensor: a rank's all-to-all send buffer, its all-gather shard, its all-reduce tensor); the
JSON also has ``sent_bytes``, what a ring / pairwise algorithm sends from the rank over the wire
((W-1)/W of an all-to-all, (W-1)x an all-gather shard, 2(W-1)/W of an all-reduce).

Expected ratios. Only pruned steps move less: under CP the K selected image tokens are gathered
before diffusers splits the sequence, so every attention all-to-all carries (T + K)/(T + N) of a
dense one (T text tokens, N image tokens, K rounded up to a multiple of W) and the proj_out
gather K/N; under TP every row-parallel all-reduce carries (T + K)/(T + N) (image rows K, text
rows T). The check requires the pruned steps' all-to-all (CP) or all-reduce (TP) bytes to be that
fraction of a dense step's, exactly, and every other step to move what a dense step moves.

Model (``--model``): ``photos`` is the shipped photo model (1024 image tokens, 8 text tokens);
``auto`` (default) takes it when its heads, text and image tokens all divide by W, else
``flux-mini``: a random-weights FluxTransformer2DModel (2 double + 2 single blocks, 4 heads x 32,
64 input channels, guidance embedding) at 32x32 = 1024 image tokens and ``--text`` (default 128,
Flux.1-dev's 512:4096 text:image proportion) random text tokens. ``flux1-dev-1024`` is the real
FLUX.1-dev architecture (12B, random weights, 4096 image + 512 text tokens) for GPUs. Each
generation is a flow-matching Euler loop of ``--steps`` transformer calls, batch 1, no CFG
(guidance-distilled Flux), the bare transformer patched (it counts its own steps).

Schedule: at 28 steps the CATConfig defaults (full_steps 8, refresh_every 3). With fewer steps,
full_steps is scaled to round(8 * steps / 28) (at least 2); refresh_every stays 3. The default 14
steps (full_steps 4: 2 dense, anchor, fill, then 7 pruned and 3 refresh steps; the paper's 10
pruned) has the 28-step schedule's shares of pruned steps (CAT-F 14 of 28, the paper's 20 of 28).
The records also project the 28-step schedule's generation ratio from the measured per-mode
bytes (a step's traffic depends on its mode only).

    python bench/run.py --suite parallel                    # 2 CPU ranks, gloo
    python bench/run.py --suite parallel --steps 28 --repeats 3
    python bench/run.py --suite parallel --device cuda --ranks 8 --model flux1-dev-1024 --steps 28
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LOCAL_RESULTS = RESULTS / "local"  # git-ignored: run.py's default output folder (no --json)
PRODUCT_STEPS, PRODUCT_FULL_STEPS = 28, 8  # the product default schedule (CATConfig())
MODES = ("dense", "anchor", "fill", "refresh", "pruned")

# name -> (parallelism, CAT preset or None)
SCENARIOS = {
    "cp-dense": ("cp", None),
    "cp-cat": ("cp", "default"),
    "cp-cat-paper": ("cp", "paper"),
    "tp-dense": ("tp", None),
    "tp-cat": ("tp", "default"),
    "1p-dense": ("1p", None),
    "1p-cat": ("1p", "default"),
    "1p-cat-paper": ("1p", "paper"),
}
PRESET_NAMES = {None: "dense", "default": "cat", "paper": "cat-paper"}

# A small random Flux: 1024 image tokens, each step a fraction of a second on one CPU thread.
FLUX_MINI = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)  # fmt: skip
MINI_SIDE = 32  # token grid side: 1024 image tokens
PHOTO_PROMPT = "coffee, close-up"

# Where each parallelism's collectives must come from (caller module prefixes), per kind of call.
EXPECTED_SOURCES = {
    ("cp", None): {"funcol.all_to_all_single": "diffusers.", "funcol.all_gather_tensor": "diffusers."},
    ("cp", "cat"): {"funcol.all_to_all_single": "cat_pruning.parallel", "funcol.all_gather_tensor": "diffusers.",
                    "dist.all_gather": "cat_pruning.parallel"},
    ("tp", None): {"funcol.all_reduce": "torch.distributed.tensor"},
    ("tp", "cat"): {"funcol.all_reduce": "torch.distributed.tensor", "dist.all_gather": "cat_pruning.parallel"},
}  # fmt: skip


# --------------------------------------------------------------------------- options


def suite_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py --suite parallel", add_help=False)
    p.add_argument("--steps", type=int, default=14,
                   help="denoising steps per generation (default 14: full_steps 4, the 28-step shares of pruned steps)")
    p.add_argument("--model", default="auto", choices=["auto", "photos", "flux-mini", "flux1-dev-1024"])
    p.add_argument("--text", type=int, default=128, help="text tokens of the random models (default 128)")
    p.add_argument("--ranks", type=int, default=2, help="W: processes of the parallel launch (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per scenario (default 3)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS))
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for the whole parallel launch")
    p.add_argument("--from", dest="from_dir", type=Path, default=None,
                   help="no launch: read DIR/rank<r>.pt of a worker started by hand with the same options")
    return p


def parse_suite_args(args: argparse.Namespace) -> argparse.Namespace:
    """The suite's options from run.py's leftover arguments (``args.extra``), validated."""
    opts, unknown = suite_parser().parse_known_args(getattr(args, "extra", []) or [])
    if unknown:
        raise SystemExit(f"bench parallel: unknown options {unknown}")
    names = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise SystemExit(f"bench parallel: --scenarios {bad or names}: choose from {', '.join(SCENARIOS)}")
    for kind, preset in [SCENARIOS[s] for s in names]:  # a CAT scenario's ratios need its dense run
        if preset is not None and kind != "1p" and f"{kind}-dense" not in names:
            names.append(f"{kind}-dense")
    opts.scenarios = [s for s in SCENARIOS if s in names]
    if opts.steps < 3:
        raise SystemExit(f"bench parallel: --steps must be >= 3, got {opts.steps}")
    if opts.ranks < 2:
        raise SystemExit(f"bench parallel: --ranks must be >= 2, got {opts.ranks}")
    if opts.repeats < 1 or opts.text < 1:
        raise SystemExit("bench parallel: --repeats and --text must be >= 1")
    opts.dtype = opts.dtype or ("bfloat16" if getattr(args, "device", "cpu") == "cuda" else "float32")
    return opts


def results_path(args: argparse.Namespace) -> Path:
    """bench/results/local/parallel-<device>.json (run.py's default JSON path for this suite, git-ignored)."""
    return LOCAL_RESULTS / f"parallel-{args.device}.json"


def full_steps(steps: int) -> int:
    """The CATConfig default full_steps (8) at 28 steps, scaled for a shorter generation."""
    return PRODUCT_FULL_STEPS if steps == PRODUCT_STEPS else max(2, round(PRODUCT_FULL_STEPS * steps / PRODUCT_STEPS))


def cat_config(preset: str | None, steps: int):
    """CATConfig() or CATConfig.paper() with full_steps made to fit `steps`; None for dense."""
    from cat_pruning import CATConfig

    if preset is None:
        return None
    fs = full_steps(steps)
    return CATConfig(full_steps=fs) if preset == "default" else CATConfig.paper(full_steps=fs)


# --------------------------------------------------------------------------- model and generation


def model_shape(name: str, text: int) -> dict[str, int]:
    """Of a --model, without loading weights: heads, text tokens T, image tokens N, double blocks,
    single blocks, hidden size and output channels."""
    if name == "photos":
        from cat_pruning.photos import WEIGHTS_DIR

        config = json.loads((WEIGHTS_DIR / "transformer" / "config.json").read_text())
        text = json.loads((WEIGHTS_DIR / "text_encoder" / "config.json").read_text())["max_length"]
        n = 32 * 32
    elif name == "flux1-dev-1024":
        from cat_pruning.adapters.flux import REAL_CONFIGS

        config, gen = REAL_CONFIGS["flux1-dev-1024"]
        text, n = gen["text"], (gen["latent"] // 2) ** 2
    else:
        config, n = FLUX_MINI, MINI_SIDE**2
    return dict(heads=config["num_attention_heads"], T=text, N=n, double=config["num_layers"],
                single=config["num_single_layers"], hidden=config["num_attention_heads"] * config["attention_head_dim"],
                out=(config.get("out_channels") or config["in_channels"]) * config["patch_size"] ** 2)  # fmt: skip


def dense_step_collectives(kind: str, shape: dict[str, int], world: int, itemsize: int) -> dict[str, tuple[int, int]]:
    """{collective kind: (calls, payload bytes)} of one dense step on one rank (batch 1), from the
    plans: Ulysses exchanges q, k, v and the output of every attention (double and single blocks)
    and gathers proj_out; tensor parallelism all-reduces each row-parallel Linear's output (per
    double block to_out and ff on the N image rows, to_add_out and ff_context on the T text rows;
    per single block proj_out on all T + N rows)."""
    rows, h = shape["T"] + shape["N"], shape["hidden"]
    attentions = shape["double"] + shape["single"]
    if kind == "cp":
        return dict(all_to_all=(4 * attentions, 4 * attentions * rows // world * h * itemsize),
                    all_gather=(1, shape["N"] // world * shape["out"] * itemsize))  # fmt: skip
    return dict(all_reduce=(4 * shape["double"] + shape["single"],
                            (2 * shape["double"] + shape["single"]) * rows * h * itemsize))  # fmt: skip


def choose_model(requested: str, ranks: int, text: int) -> tuple[str, str]:
    """(model, why): the photo model under --model auto when it loads and its heads and token
    counts split over the ranks, else flux-mini."""
    if requested != "auto":
        return requested, "asked for"
    try:
        from cat_pruning.photos import load_photo_pipeline

        load_photo_pipeline()
    except Exception as err:  # noqa: BLE001 - any reason it does not load means: the random model
        return "flux-mini", f"the photo model did not load ({type(err).__name__}: {err})"
    shape = model_shape("photos", text)
    odd = [f"{shape[k]} {what}" for k, what in (("heads", "heads"), ("T", "text tokens"), ("N", "image tokens"))
           if shape[k] % ranks]  # fmt: skip
    if odd:
        return "flux-mini", (f"the photo model's {' and '.join(odd)} do not split over {ranks} ranks "
                             "(Ulysses and tensor parallelism split the heads, Ulysses the tokens)")
    return "photos", f"the photo model splits over {ranks} ranks"


def build(name: str, text: int, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(transformer, inputs) of a --model: the same weights and inputs in every process."""
    from cat_pruning.adapters.flux import image_ids

    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    if name == "photos":
        from cat_pruning.photos import load_photo_pipeline

        pipe = load_photo_pipeline(device=device, dtype=dtype)
        hidden, pooled = pipe.text_encoder.encode([PHOTO_PROMPT], device=device)
        model, side, guidance = pipe.transformer, 32, None
        context, pooled = hidden.to(dtype), pooled.to(dtype)
        channels = model.config.in_channels
    else:
        from diffusers import FluxTransformer2DModel

        if name == "flux1-dev-1024":
            from cat_pruning.adapters.flux import REAL_CONFIGS

            config, gen = REAL_CONFIGS[name]
            side, text = gen["latent"] // 2, gen["text"]
        else:
            config, side = FLUX_MINI, MINI_SIDE
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # a 12B model is built in its dtype, not in fp32 first
        try:
            with torch.device(device):
                model = FluxTransformer2DModel(**config)
        finally:
            torch.set_default_dtype(default)
        channels = config["in_channels"]
        context, pooled = rand(1, text, config["joint_attention_dim"]), rand(1, config["pooled_projection_dim"])
        guidance = torch.full((1,), 3.5, device=device, dtype=dtype) if config["guidance_embeds"] else None
    model = model.to(device).eval().requires_grad_(False)  # built or loaded in dtype already
    inputs = dict(
        latents=rand(1, side * side, channels),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        img_ids=image_ids(side, side, device),
        txt_ids=torch.zeros(context.shape[1], 3, device=device),
        guidance=guidance,
    )
    return model, inputs


def generate(model: torch.nn.Module, inputs: dict, steps: int, counter: CollectiveCounter | None = None,
             device: str = "cpu") -> tuple[torch.Tensor, list[float]]:
    """A flow-matching Euler loop like FluxPipeline's (batch 1, no CFG): (final latents, seconds
    of every step)."""
    x = inputs["latents"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()  # host list, built before the loop
    kwargs = {k: v for k, v in inputs.items() if k != "latents" and v is not None}
    times = []
    for i in range(steps):
        if counter is not None:
            counter.step = i
        t0 = time.perf_counter()
        t = torch.full((x.shape[0],), sigmas[i], device=x.device, dtype=x.dtype)  # Flux scales it by 1000
        out = model(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * out
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return x, times


# --------------------------------------------------------------------------- counting collectives


def _targets() -> list[tuple[Any, str, str, str, int, str]]:
    """(module, attribute, label, kind, positional index of the input tensor, its keyword)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    found = []
    for name, kind in (("all_to_all_single", "all_to_all"), ("all_to_all_single_autograd", "all_to_all"),
                       ("all_gather_tensor", "all_gather"), ("all_gather_tensor_autograd", "all_gather"),
                       ("all_gather_single", "all_gather"), ("all_reduce", "all_reduce"),
                       ("reduce_scatter_tensor", "reduce_scatter"), ("reduce_scatter_single", "reduce_scatter"),
                       ("broadcast", "broadcast"), ("permute_tensor", "permute")):  # fmt: skip
        if hasattr(funcol, name):
            found.append((funcol, name, f"funcol.{name}", kind, 0, "self"))
    for name, kind, index, keyword in (("all_gather", "all_gather", 1, "tensor"),
                                       ("all_gather_into_tensor", "all_gather", 1, "input_tensor"),
                                       ("all_reduce", "all_reduce", 0, "tensor"),
                                       ("all_to_all_single", "all_to_all", 1, "input"),
                                       ("reduce_scatter_tensor", "reduce_scatter", 1, "input"),
                                       ("broadcast", "broadcast", 0, "tensor")):  # fmt: skip
        for module in (dist, c10d):  # the same function under two names; callers use either
            if hasattr(module, name):
                found.append((module, name, f"dist.{name}", kind, index, keyword))
    return found


def sent_bytes(kind: str, nbytes: int, world: int) -> float:
    """Bytes a rank sends over the wire for a payload of `nbytes` under the usual algorithms."""
    if kind == "all_to_all" or kind == "reduce_scatter":
        return nbytes * (world - 1) / world  # its own chunk stays
    if kind == "all_gather":
        return nbytes * (world - 1)  # its shard to every other rank
    if kind == "all_reduce":
        return 2 * nbytes * (world - 1) / world  # ring: reduce-scatter + all-gather
    return float(nbytes)


class CollectiveCounter:
    """While entered, wraps the collectives of :func:`_targets` and records every outermost call
    as (generation, step, label, caller module, kind, payload bytes). Restores them on exit."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, str, str, str, int]] = []
        self.generation = -1
        self.step = -1
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, fn: Any, label: str, kind: str, index: int, keyword: str) -> Any:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                x = args[index] if len(args) > index else kwargs.get(keyword)
                nbytes = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
                caller = sys._getframe(1).f_globals.get("__name__", "?")
                self.events.append((self.generation, self.step, label, caller, kind, nbytes))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        return counted

    def __enter__(self) -> CollectiveCounter:
        for module, name, label, kind, index, keyword in _targets():
            fn = getattr(module, name)
            self._saved.append((module, name, fn))
            setattr(module, name, self._wrap(fn, label, kind, index, keyword))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()


# --------------------------------------------------------------------------- one rank (under torch.distributed.run)


def _parallel_config(kind: str, world: int, device: str):
    from diffusers import ContextParallelConfig, TensorParallelConfig

    if kind == "cp":
        return ContextParallelConfig(ulysses_degree=world)
    if device == "cpu":
        import diffusers.hooks.tensor_parallel as tp  # diffusers refuses CPU meshes; gloo runs DTensor fine

        if "cpu" not in tp._SUPPORTED_TP_DEVICES:
            tp._SUPPORTED_TP_DEVICES = (*tp._SUPPORTED_TP_DEVICES, "cpu")
    return TensorParallelConfig(tp_degree=world)


def run_scenario(name: str, opts: argparse.Namespace, device: str, world: int = 1) -> dict[str, Any]:
    """One scenario in this process (a rank, or the one process): a warm-up generation, then
    opts.repeats timed ones with the collectives counted. Returns times, events, modes, latents."""
    import cat_pruning

    kind, preset = SCENARIOS[name]
    dtype = getattr(torch, opts.dtype)
    model, inputs = build(opts.model, opts.text, device, dtype)
    if kind != "1p":
        model.enable_parallelism(config=_parallel_config(kind, world, device))
    config = cat_config(preset, opts.steps)
    if config is not None:
        cat_pruning.patch(model, config)
    counter = CollectiveCounter()
    gens = []
    with torch.no_grad(), counter:
        # warm-up: every mode once (dense, anchor, fill and the first pruned or refresh steps)
        warm = opts.steps if config is None else min(opts.steps, config.full_steps + 3)
        for g in range(1 + opts.repeats):
            if config is not None:
                cat_pruning.reset(model)
            if world > 1:
                torch.distributed.barrier()
            counter.generation = g
            t0 = time.perf_counter()
            latents, steps = generate(model, inputs, warm if g == 0 else opts.steps, counter, device)
            gens.append(dict(total=time.perf_counter() - t0, steps=steps))
    out: dict[str, Any] = dict(
        generations=gens[1:], events=[e for e in counter.events if e[0] > 0],
        latents=latents.float().cpu(), modes=["dense"] * opts.steps,
    )
    if config is not None:
        stats = cat_pruning.stats(model)
        out.update(modes=[s.mode for s in stats.steps], K=stats.tokens_kept, N=stats.num_tokens,
                   config=dict(keep_ratio=config.keep_ratio, full_steps=config.full_steps,
                               refresh_every=config.refresh_every, forecast=config.forecast))
    return out


def worker_main(argv: list[str]) -> None:
    """One rank: every parallel scenario of --scenarios, each result saved to DIR/rank<r>.pt."""
    p = suite_parser()
    p.add_argument("--worker", type=Path, required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = p.parse_args(argv)
    opts.scenarios = [s for s in opts.scenarios.split(",") if s and SCENARIOS[s][0] != "1p"]
    opts.dtype = opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")
    opts.worker.mkdir(parents=True, exist_ok=True)
    if opts.device == "cpu":
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # diffusers divides by it; the CPU reports 0
        backend, device = "gloo", "cpu"
    else:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        backend, device = "nccl", "cuda"
    dist = torch.distributed
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(120, opts.timeout / 2)))
    rank, world = dist.get_rank(), dist.get_world_size()
    if opts.model == "auto":  # the same answer on every rank
        opts.model, _ = choose_model("auto", world, opts.text)
    results = {}
    for name in opts.scenarios:
        t0 = time.perf_counter()
        results[name] = run_scenario(name, opts, device, world)
        if rank == 0:
            print(f"bench parallel: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    torch.save(results, opts.worker / f"rank{rank}.pt")
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the launch (from run.py)


def worker_command(opts: argparse.Namespace, device: str, out: Path | str) -> list[str]:
    scenarios = [s for s in opts.scenarios if SCENARIOS[s][0] != "1p"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(opts.ranks),
            str(BENCH / "parallel.py"), "--worker", str(out), "--device", device, "--model", opts.model,
            "--text", str(opts.text), "--steps", str(opts.steps), "--repeats", str(opts.repeats),
            "--dtype", opts.dtype, "--timeout", str(opts.timeout), "--scenarios", ",".join(scenarios)]  # fmt: skip


def launch(opts: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    """Runs the parallel scenarios on opts.ranks processes; each rank's results, in rank order."""
    with tempfile.TemporaryDirectory(prefix="cat-bench-parallel-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        paths = (str(BENCH.parent / "python"), str(BENCH.parent), env.get("PYTHONPATH"))  # the checkout's package
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        cmd = worker_command(opts, device, out)
        print(f"bench parallel: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        log = out / "launch.log"
        with open(log, "w") as fh:
            # a session of its own: on a timeout the launcher and every rank are stopped together
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=opts.timeout)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                text = log.read_text()
                sys.stderr.write(text[-4000:])
                raise
        text = log.read_text()
        for line in text.splitlines():
            if line.startswith("bench parallel:"):
                print(line, file=sys.stderr)
        if rc != 0:
            raise RuntimeError(f"bench parallel: the {opts.ranks}-rank launch exited {rc}:\n{text[-4000:]}")
        return [torch.load(out / f"rank{r}.pt") for r in range(opts.ranks)]


# --------------------------------------------------------------------------- records


def traffic(result: dict[str, Any], world: int) -> dict[str, Any]:
    """Per-step bytes and calls of one rank's first timed generation, averaged by step mode,
    plus the generation's totals and its calls by (label, caller)."""
    events = [e for e in result["events"] if e[0] == 1]
    modes = result["modes"]
    per_step = [dict(bytes=0, sent=0.0, calls=0, kinds={}, kind_calls={}) for _ in modes]
    sources: dict[str, dict[str, int]] = {}
    for _, step, label, caller, kind, nbytes in events:
        s = per_step[step]
        s["bytes"] += nbytes
        s["sent"] += sent_bytes(kind, nbytes, world)
        s["calls"] += 1
        s["kinds"][kind] = s["kinds"].get(kind, 0) + nbytes
        s["kind_calls"][kind] = s["kind_calls"].get(kind, 0) + 1
        src = sources.setdefault(f"{label} <- {caller}", dict(calls=0, bytes=0))
        src["calls"] += 1
        src["bytes"] += nbytes
    by_mode = {}
    for mode in MODES:
        steps = [s for s, m in zip(per_step, modes, strict=True) if m == mode]
        if steps:
            kinds = sorted({k for s in steps for k in s["kinds"]})
            by_mode[mode] = dict(
                steps=len(steps), bytes=statistics.mean(s["bytes"] for s in steps),
                sent_bytes=statistics.mean(s["sent"] for s in steps),
                calls=statistics.mean(s["calls"] for s in steps),
                kinds={k: statistics.mean(s["kinds"].get(k, 0) for s in steps) for k in kinds},
                kind_calls={k: statistics.mean(s["kind_calls"].get(k, 0) for s in steps) for k in kinds},
                bytes_min=min(s["bytes"] for s in steps), bytes_max=max(s["bytes"] for s in steps),
            )  # fmt: skip
    return dict(
        by_mode=by_mode, per_step_bytes=[s["bytes"] for s in per_step],
        generation_bytes=sum(s["bytes"] for s in per_step), generation_sent_bytes=sum(s["sent"] for s in per_step),
        sources=sources,
    )  # fmt: skip


def wall(result: dict[str, Any]) -> dict[str, Any]:
    """Generation wall clock (median, p20, p80 over the timed generations) and mean ms per step by mode."""
    import common

    totals = sorted(g["total"] for g in result["generations"])
    per_mode: dict[str, list[float]] = {}
    for g in result["generations"]:
        for mode, t in zip(result["modes"], g["steps"], strict=True):
            per_mode.setdefault(mode, []).append(t)
    return dict(
        median_ms=1e3 * statistics.median(totals), p20_ms=1e3 * common.quantile(totals, 0.2),
        p80_ms=1e3 * common.quantile(totals, 0.8),
        step_ms={m: 1e3 * statistics.mean(v) for m in MODES if (v := per_mode.get(m))},
    )  # fmt: skip


def _check_sources(kind: str, preset: str | None, sources: dict[str, dict[str, int]]) -> list[str]:
    """What the counter should have seen in this scenario and did not."""
    missing = []
    for label, prefix in EXPECTED_SOURCES.get((kind, None if preset is None else "cat"), {}).items():
        calls = sum(v["calls"] for k, v in sources.items() if k.startswith(f"{label} <- {prefix}"))
        if calls == 0:
            missing.append(f"no {label} calls from {prefix}*")
    return missing


def analytic(kind: str, modes: list[str], T: int, N: int, K: int) -> dict[str, float]:
    """(T + K)/(T + N) of a pruned step, and the generation ratio it implies when every other
    step moves a dense step's bytes."""
    pruned = (T + K) / (T + N)
    return dict(pruned=pruned, generation=sum(pruned if m == "pruned" else 1.0 for m in modes) / len(modes))


def build_records(opts: argparse.Namespace, device: str, results: dict[str, list[dict[str, Any]]],
                  model_note: str) -> list[dict[str, Any]]:
    """One record per scenario from the per-process results (rank order; one entry for 1p)."""
    from cat_pruning import CATConfig

    shape_m = model_shape(opts.model, opts.text)
    T, N, W = shape_m["T"], shape_m["N"], opts.ranks
    dense_traffic = {kind: traffic(results[f"{kind}-dense"][0], W) for kind in ("cp", "tp")
                     if f"{kind}-dense" in results}  # fmt: skip
    walls = {name: wall(res[0]) for name, res in results.items()}
    records = []
    for name in opts.scenarios:
        kind, preset = SCENARIOS[name]
        ranks = results[name]
        r0 = ranks[0]
        cfg = cat_config(preset, opts.steps)
        K = r0.get("K")
        rec: dict[str, Any] = dict(
            case=f"parallel[{'1 process' if kind == '1p' else f'{kind}, W={W}'}]", op="generation",
            provider=PRESET_NAMES[preset], scenario=name, parallelism=kind, model=opts.model, model_note=model_note,
            shape=dict(N=N, T=T, K=K, W=1 if kind == "1p" else W, steps=opts.steps,
                       full_steps=None if cfg is None else cfg.full_steps,
                       refresh_every=None if cfg is None else cfg.refresh_every,
                       keep_ratio=None if cfg is None else cfg.keep_ratio),
            dtype=opts.dtype, modes=r0["modes"], repeats=opts.repeats, timer="perf_counter",
            threads=1 if device == "cpu" else None, **walls[name],
        )  # fmt: skip
        base = walls.get(f"{kind}-dense")
        if preset is not None and base is not None:
            rec["speedup"] = base["median_ms"] / rec["median_ms"]
        if kind != "1p":
            same = walls.get(f"1p-{PRESET_NAMES[preset]}")
            rec["speedup_vs_1p_same"] = None if same is None else same["median_ms"] / rec["median_ms"]
        errors = []
        if kind != "1p":
            tr = [traffic(r, W) for r in ranks]
            rec["traffic"] = tr[0]
            rec["ranks_same_bytes"] = all(t["per_step_bytes"] == tr[0]["per_step_bytes"] for t in tr)
            errors += _check_sources(kind, preset, tr[0]["sources"])
            if preset is None:  # every collective the plans imply, seen with its size: none escaped the counter
                want = dense_step_collectives(kind, shape_m, W, getattr(torch, opts.dtype).itemsize)
                d = tr[0]["by_mode"]["dense"]
                got = {k: (d["kind_calls"][k], d["kinds"][k]) for k in d["kinds"]}
                rec["dense_step_expected"] = {k: dict(calls=c, bytes=b) for k, (c, b) in want.items()}
                if got != want:
                    errors.append(f"a dense step's collectives (calls, bytes) are {got}, the plans imply {want}")
            dense = dense_traffic.get(kind)
            if dense is not None:
                d = dense["by_mode"]["dense"]
                rec["dense_step_bytes"] = d["bytes"]
                rec["mode_ratio"] = {m: v["bytes"] / d["bytes"] for m, v in tr[0]["by_mode"].items()}
                rec["traffic_ratio"] = tr[0]["generation_bytes"] / dense["generation_bytes"]
                rec["sent_ratio"] = tr[0]["generation_sent_bytes"] / dense["generation_sent_bytes"]
                if preset is not None:
                    ideal = analytic(kind, r0["modes"], T, N, K)
                    rec["pruned_ratio_ideal"], rec["traffic_ratio_ideal"] = ideal["pruned"], ideal["generation"]
                    main = "all_to_all" if kind == "cp" else "all_reduce"  # the collective that carries the rows
                    pr = tr[0]["by_mode"].get("pruned")
                    if pr is not None:
                        got = pr["kinds"].get(main, 0) / d["kinds"][main]
                        rec[f"pruned_{main}_ratio"] = got
                        if abs(got - ideal["pruned"]) > 1e-9:
                            errors.append(f"pruned-step {main} bytes are {got:.6f} of dense, not (T+K)/(T+N) = "
                                          f"{ideal['pruned']:.6f}")
                    for m, v in tr[0]["by_mode"].items():
                        if m != "pruned" and abs(v["kinds"].get(main, 0) / d["kinds"][main] - 1) > 1e-9:
                            errors.append(f"{m} steps move {v['kinds'].get(main, 0)} {main} bytes, "
                                          f"a dense step {d['kinds'][main]}")
                    # the product schedule (28 steps, full_steps 8) from the per-mode bytes measured here
                    product = (CATConfig() if preset == "default" else CATConfig.paper())
                    sched = [product.mode(i) for i in range(PRODUCT_STEPS)]
                    # (a CAT dense step is the unpatched step: the dense run's, if this run had none)
                    step_bytes = {"dense": d["bytes"], **{m: v["bytes"] for m, v in tr[0]["by_mode"].items()}}
                    if all(m in step_bytes for m in sched):
                        rec["traffic_ratio_28"] = sum(step_bytes[m] for m in sched) / (PRODUCT_STEPS * d["bytes"])
                        rec["traffic_ratio_28_ideal"] = analytic(kind, sched, T, N, K)["generation"]
            if not rec["ranks_same_bytes"]:
                errors.append("the ranks moved different bytes")
        ref = results.get(f"1p-{PRESET_NAMES[preset]}")
        if kind != "1p" and ref is not None and K != ref[0].get("K"):
            rec["not_compared"] = (f"K={K} here, {ref[0]['K']} in one process (context parallelism rounds K up to "
                                   "a multiple of W): a different generation")
        elif kind != "1p" and ref is not None:
            want = ref[0]["latents"]
            diffs = [float((r["latents"] - want).abs().max()) for r in ranks]
            rec["max_abs_diff_vs_1p"] = max(diffs)
            # the ranks change summation orders only; a selection that flipped would differ by far more
            tol = (1e-3 if opts.dtype == "float32" else 5e-2) * float(want.abs().max())
            if max(diffs) > tol:
                errors.append(f"final latents differ from one process by {max(diffs):.3g} (> {tol:.3g})")
        rec["check"] = "FAIL" if errors else ("pass" if kind != "1p" else "n/a")
        if errors:
            rec["error"] = "; ".join(errors)
        rec["cmd"] = command(opts, device, [name])
        records.append(rec)
    return records


def command(opts: argparse.Namespace, device: str, scenarios: list[str] | None = None) -> str:
    """The run.py command line that reruns these settings (one scenario, or the whole suite)."""
    argv = ["python", "bench/run.py", "--suite", "parallel", "--device", device, "--model", opts.model,
            "--steps", str(opts.steps), "--ranks", str(opts.ranks), "--repeats", str(opts.repeats)]  # fmt: skip
    if opts.model not in ("photos", "flux1-dev-1024"):
        argv += ["--text", str(opts.text)]
    if scenarios is not None:
        argv += ["--scenarios", ",".join(scenarios)]
    return shlex.join(argv)


# --------------------------------------------------------------------------- report


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x / 2**20:.3f}"


def report(records: list[dict[str, Any]], opts: argparse.Namespace, device: str, model_note: str,
           markdown: bool = False) -> str:
    """The traffic table and the wall-clock table (text, or Markdown with the command)."""
    T, N = records[0]["shape"]["T"], records[0]["shape"]["N"]

    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.1f}%"

    head1 = ["scenario", "K", *[f"{m} MB/step (ratio) x steps" for m in MODES], "pruned rows collective",
             "(T+K)/(T+N)", "generation MB", "CAT/dense", "analytic", "28-step CAT/dense", "28-step analytic",
             "latents vs 1 process", "check"]  # fmt: skip
    rows1 = []
    for r in records:
        if r["parallelism"] == "1p":
            continue
        bm, ratio = r["traffic"]["by_mode"], r.get("mode_ratio", {})
        main = r.get("pruned_all_to_all_ratio", r.get("pruned_all_reduce_ratio"))
        cells = [r["scenario"], str(r["shape"]["K"] or "")]
        cells += ["" if m not in bm else f"{_mb(bm[m]['bytes'])} ({pct(ratio.get(m))}) x{bm[m]['steps']}"
                  for m in MODES]  # fmt: skip
        cells += ["" if main is None else f"{pct(main)} ({'all-to-all' if r['parallelism'] == 'cp' else 'all-reduce'})",
                  pct(r.get("pruned_ratio_ideal")), _mb(r["traffic"]["generation_bytes"]),
                  pct(r.get("traffic_ratio")) if r["provider"] != "dense" else "",
                  pct(r.get("traffic_ratio_ideal")), pct(r.get("traffic_ratio_28")),
                  pct(r.get("traffic_ratio_28_ideal")), _vs_one_process(r), r["check"]]  # fmt: skip
        rows1.append(cells)
    head2 = ["scenario", "generation ms (p20-p80)", *[f"{m} ms/step" for m in MODES], "speedup vs dense",
             "vs 1 process, same CAT"]  # fmt: skip
    rows2 = []
    for r in records:
        cells = [r["scenario"], f"{r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f})"]
        cells += [f"{r['step_ms'][m]:.1f}" if m in r["step_ms"] else "" for m in MODES]
        cells += [f"{r['speedup']:.2f}x" if r.get("speedup") else "",
                  f"{r['speedup_vs_1p_same']:.2f}x" if r.get("speedup_vs_1p_same") else ""]
        rows2.append(cells)
    modes = next((r["modes"] for r in records if r["provider"] == "cat"), None)
    launch = "gloo on the CPU, 1 thread each" if device == "cpu" else "nccl, one GPU each"
    intro = [
        f"Model {opts.model} ({model_note}): N={N} image tokens, T={T} text tokens, batch 1, {opts.dtype}, "
        f"{opts.steps} steps; W={opts.ranks} ranks ({launch}).",
        f"Schedule: full_steps {full_steps(opts.steps)}; CAT default (CATConfig()) refresh_every 3, keep 0.02; "
        "paper (CATConfig.paper()) keep 0.3, no refresh" + (f"; CAT default modes: {' '.join(modes)}." if modes
                                                             else "."),
        "Traffic: payload bytes rank 0 hands to collectives per step, mean by step mode (ratio to a dense step, "
        "number of such steps); 'pruned rows collective': a pruned step's all-to-all (CP) or all-reduce (TP) bytes "
        "over a dense step's, next to (T+K)/(T+N); 28-step: the product schedule (full_steps 8) from these per-mode "
        "bytes.",
    ]
    intro += [f"FAIL {r['scenario']}: {r['error']}" for r in records if r.get("error")]
    intro += [f"{r['scenario']} not compared with one process: {r['not_compared']}" for r in records
              if r.get("not_compared")]  # fmt: skip
    if not markdown:
        return "\n".join([*intro, "", _text_table(head1, rows1), "", _text_table(head2, rows2)])
    import common

    env = common.environment(device)
    where = f"{env['device_name']}; torch {env['torch']}, diffusers {env['diffusers']}, git {env['git_sha']}."
    if device == "cpu":
        where += " Wall clocks on a shared CPU are noisy and say nothing about GPUs; the byte counts are exact."
    md = [f"# parallel suite, {device}", "", "```sh", command(opts, device), "```", "", where, "", *intro, ""]
    md += _md_table(head1, rows1) + [""] + _md_table(head2, rows2)
    for name in ("cp-dense", "cp-cat", "tp-dense", "tp-cat"):
        r = next((r for r in records if r["scenario"] == name), None)
        if r is not None:
            md += ["", f"Calls per generation on rank 0, {name}: " + "; ".join(
                f"`{k}` {v['calls']} ({_mb(v['bytes'])} MB)" for k, v in sorted(r["traffic"]["sources"].items()))]
    return "\n".join(md) + "\n"


def _vs_one_process(r: dict[str, Any]) -> str:
    if "max_abs_diff_vs_1p" in r:
        return f"max abs diff {r['max_abs_diff_vs_1p']:.1e}"
    return "K differs" if r.get("not_compared") else ""


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def run(args: Any) -> list[dict[str, Any]]:
    """Launches the parallel scenarios, runs the one-process ones here, returns one record each
    and writes the Markdown table next to the JSON."""
    opts = parse_suite_args(args)
    device = args.device
    opts.model, note = choose_model(opts.model, opts.ranks, opts.text)
    shape = model_shape(opts.model, opts.text)
    if shape["heads"] % opts.ranks or shape["T"] % opts.ranks or shape["N"] % opts.ranks:
        raise SystemExit(f"bench parallel: --model {opts.model} ({shape}) does not split over {opts.ranks} ranks")
    if device == "cuda" and torch.cuda.device_count() < opts.ranks and opts.from_dir is None:
        if getattr(args, "suite", None) == "all":
            print(f"bench parallel: skipped, --ranks {opts.ranks} needs as many GPUs", file=sys.stderr)
            return []
        raise SystemExit(f"bench parallel: --ranks {opts.ranks} needs as many GPUs, {torch.cuda.device_count()} here")
    print(f"bench parallel: model {opts.model}: {note}", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {}
    if any(SCENARIOS[s][0] != "1p" for s in opts.scenarios):
        if opts.from_dir is not None:
            ranks = [torch.load(opts.from_dir / f"rank{r}.pt") for r in range(opts.ranks)]
        else:
            ranks = launch(opts, device)
        for name in opts.scenarios:
            if SCENARIOS[name][0] != "1p":
                results[name] = [r[name] for r in ranks]
    for name in opts.scenarios:
        if SCENARIOS[name][0] == "1p":
            t0 = time.perf_counter()
            results[name] = [run_scenario(name, opts, device)]
            print(f"bench parallel: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    records = build_records(opts, device, results, note)
    print(report(records, opts, device, note))
    path = getattr(args, "json", None) or results_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(report(records, opts, device, note, markdown=True))
    return records


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    worker_main(sys.argv[1:])
