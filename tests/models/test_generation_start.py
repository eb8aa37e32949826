"""Where a generation starts: every pipeline call, whether the pipeline or only its transformer was
patched, and a bare denoising loop that starts over without cat_pruning.reset() (its timestep
moves back: reset with a warning where the timestep is on the CPU, refused a few steps late where
it is read asynchronously, as on CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch
from harness import assert_all_equal
from sd3_models import JOINT_DIM, POOLED_DIM, TEXT_TOKENS, inputs, run_steps, tiny_sd3
from test_sd3_pipeline import tiny_pipeline

import cat_pruning
from cat_pruning import generation
from cat_pruning.generation import Restart, TimestepWatch

PATCH = dict(keep_ratio=0.3, full_steps=4, backend="torch", final_full_steps=0)  # bare loops: no step count
STEPS = 9  # test_sd3_pipeline.call's steps


def call(pipe, guidance: float = 3.0, seed: int = 3, **extra) -> torch.Tensor:
    """test_sd3_pipeline.call with extra pipeline arguments."""
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, TEXT_TOKENS, JOINT_DIM, generator=g), torch.randn(2, POOLED_DIM, generator=g)
    return pipe(
        prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
        negative_pooled_prompt_embeds=pooled[1:], height=24, width=20, num_inference_steps=STEPS,
        guidance_scale=guidance, output_type="pt", generator=torch.Generator().manual_seed(seed), **extra,
    ).images


def modes(obj) -> list[str]:
    return [s.mode for s in cat_pruning.stats(obj).steps]


# ---------------------------------------------------------------------- pipeline calls


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_every_pipeline_call_starts_a_generation_whichever_object_is_patched(guidance):
    """patch(pipe) and patch(pipe.transformer): two calls with different seeds give the same images
    bit for bit, each call one generation of STEPS steps with the pipeline's CFG pairing."""
    whole, alone = tiny_pipeline(), tiny_pipeline()
    cat_pruning.patch(whole, **PATCH)
    cat_pruning.patch(alone.transformer, **PATCH)
    for seed in (3, 5):
        want = call(whole, guidance, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = call(alone, guidance, seed=seed)
        assert torch.equal(got, want), seed
        assert len(cat_pruning.stats(alone.transformer).steps) == STEPS
        assert modes(alone.transformer) == modes(whole) and "pruned" in modes(whole)
        assert alone.transformer._cat_pruning.state.cfg_pairs == (guidance > 1)
    cat_pruning.unpatch(alone.transformer)
    assert not {"step", "set_timesteps"} & set(vars(alone.scheduler))
    assert torch.equal(call(alone, guidance), call(tiny_pipeline(), guidance))


def test_a_transformer_patch_counts_a_bare_loop_itself_again_after_pipeline_calls():
    """After pipeline calls the transformer patch's own driver counts a bare loop's steps, from step 0
    and with its own CFG setting; a bare loop stepping the pipeline's scheduler is not counted twice."""
    pipe = tiny_pipeline()
    cat_pruning.patch(pipe.transformer, **PATCH)
    call(pipe)
    kw = inputs(batch=2)
    got = run_steps(pipe.transformer, kw, 6)
    twin = tiny_pipeline().transformer
    cat_pruning.patch(twin, **PATCH)
    assert_all_equal(got, run_steps(twin, kw, 6))
    assert modes(pipe.transformer) == modes(twin) and not pipe.transformer._cat_pruning.state.cfg_pairs

    def step_scheduler():
        pipe.scheduler.step(torch.zeros(1), pipe.scheduler.timesteps[0], torch.zeros(1))

    pipe.scheduler.set_timesteps(6)  # a bare loop on the followed scheduler: a new generation
    run_steps(pipe.transformer, kw, 6, step_fn=step_scheduler)
    assert len(cat_pruning.stats(pipe.transformer).steps) == 6


def test_manual_steps_transformer_in_a_pipeline_counts_scheduler_steps():
    """patch(pipe.transformer, manual_steps=True): inside a pipeline call the scheduler counts the
    steps (an advance() from a callback is not a second count); in a bare loop after it, advance()
    without reset() is refused."""
    whole, alone = tiny_pipeline(), tiny_pipeline()
    cat_pruning.patch(whole, **PATCH)
    cat_pruning.patch(alone.transformer, manual_steps=True, **PATCH)

    def advance(pipe, i, t, kw):
        cat_pruning.advance(pipe.transformer)
        return {}

    for seed in (3, 5):
        assert torch.equal(call(alone, seed=seed, callback_on_step_end=advance), call(whole, seed=seed))
        assert len(cat_pruning.stats(alone.transformer).steps) == STEPS
    with pytest.raises(ValueError, match=r"reset\(transformer\) before each generation"):
        cat_pruning.advance(alone.transformer)
    cat_pruning.reset(alone.transformer)
    kw = inputs(batch=2)
    got = run_steps(alone.transformer, kw, 6, step_fn=lambda: cat_pruning.advance(alone.transformer))
    twin = tiny_pipeline().transformer
    cat_pruning.patch(twin, **PATCH)
    assert_all_equal(got, run_steps(twin, kw, 6))


# ---------------------------------------------------------------------- bare loops


def test_bare_loop_restarting_without_reset_starts_a_new_generation_with_a_warning():
    model, twin = tiny_sd3(), tiny_sd3()
    for m in (model, twin):
        cat_pruning.patch(m, **PATCH)
    first, second = inputs(seed=1), inputs(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_steps(model, first, 6)
    with pytest.warns(RuntimeWarning, match=r"timestep went from 166\.667 back to 1000.*reset\(transformer\)"):
        got = run_steps(model, second, 6)
    assert_all_equal(got, run_steps(twin, second, 6))
    assert len(cat_pruning.stats(model).steps) == 6 and "pruned" in modes(model)
    cat_pruning.reset(model)  # what the warning asks for: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_all_equal(run_steps(model, second, 6), got)


class _AsyncRead:
    """A timestep read that completes one observed step later, as a CUDA copy may."""

    def __init__(self, value: float) -> None:
        self.val, self.polls = value, 0

    def ready(self) -> bool:
        self.polls += 1
        return self.polls > 1

    def value(self) -> float:
        return self.val


def test_bare_loop_restart_seen_late_is_refused(monkeypatch):
    """Where the timestep is read asynchronously (CUDA), the restart is seen a step or more after it
    ran: the next forward raises, the patch resets, and a generation after it runs as a fresh one."""
    monkeypatch.setattr(generation, "_CudaRead", _AsyncRead)
    monkeypatch.setattr(generation, "_read", lambda t: _AsyncRead(float(t.reshape(-1)[0])))
    model, twin = tiny_sd3(), tiny_sd3()
    for m in (model, twin):
        cat_pruning.patch(m, **PATCH)
    run_steps(model, inputs(seed=1), 6)
    second = inputs(seed=2)
    with pytest.raises(RuntimeError, match=r"back to 1000 2 step\(s\) ago.*reset\(transformer\) before each"):
        run_steps(model, second, 6)
    assert_all_equal(run_steps(model, second, 6), run_steps(twin, second, 6))


@pytest.mark.gpu
def test_bare_loop_restart_on_cuda_is_refused():
    """The real asynchronous read: a CUDA timestep, copied without blocking, is compared once its copy
    has landed (here within the restarted generation's first steps: the first one ran on the device
    before the second is called)."""
    model = tiny_sd3().cuda()
    cat_pruning.patch(model, **PATCH)
    run_steps(model, inputs(seed=1, device="cuda"), 6)
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"back to 1000 \d step\(s\) ago"):
        run_steps(model, inputs(seed=2, device="cuda"), 6)


# ---------------------------------------------------------------------- the watch itself


def watch_steps(values, per_step=1, watch=None):
    """Feed values (one per step, each seen by per_step forwards); the restarts reported."""
    watch = watch or TimestepWatch()
    found = []
    step = 0
    for value in values:
        for _ in range(per_step):
            before = len(found)
            watch.observe(step, torch.tensor([value, value]), False, found.append)
            if len(found) > before and found[-1].late == 0:
                step = 0  # the caller resets its state
        step += 1
    return found


def test_watch_directions_repeats_and_forwards_per_step():
    down = [1000.0, 750.0, 500.0, 500.0, 250.0]  # Heun-style repeated timesteps are not restarts
    assert watch_steps(down) == []
    assert watch_steps(down + down) == [Restart(250.0, 1000.0, 0)]
    up = [0.0, 0.25, 0.5, 0.75]  # flow-matching loops that count time up
    assert watch_steps(up + up, per_step=2) == [Restart(0.75, 0.0, 0)]
    assert watch_steps([1000.0] * 3 + down) == []  # equal values set no direction
    assert watch_steps(down + [1000.0, 900.0, 800.0]) == [Restart(250.0, 1000.0, 0)]


def test_watch_skips_what_it_cannot_read_for_free():
    watch = TimestepWatch()
    found = []
    for step, t in enumerate([torch.empty(2, device="meta"), None, torch.tensor([]), 900, 500.0, 800.0]):
        watch.observe(step, t, False, found.append)
    assert found == [Restart(500.0, 800.0, 0)]
    watch.observe(7, 1000.0, True, found.append)  # another geometry: a new generation anyway
    assert len(found) == 1 and watch.last == 1000.0 and watch.direction == 0


# ---------------------------------------------------------------------- one call per step


def test_a_second_transformer_call_in_one_step_is_refused_before_it_runs():
    """A patched transformer holds one set of caches: a second call within a denoising step (true
    CFG in two calls, a second evaluation per step) would overwrite the first's rows, so it raises."""
    pipe = tiny_pipeline()
    cat_pruning.patch(pipe, **PATCH)
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)

    def again(p, i, t, kw):  # after step 5: one more call, the pipeline's own call of step 6 is the second
        if i == 5:
            p.transformer(**seen)
        return kw

    with pytest.raises(RuntimeError, match="called 2 times in denoising step 6"):
        call(pipe, callback_on_step_end=again)
    cat_pruning.patch(pipe, **PATCH)
    assert torch.equal(call(pipe), call(pipe))  # one call per step, as before

    model = tiny_sd3("sd3", layers=1)
    cat_pruning.patch(model, manual_steps=True, **PATCH)
    kw = dict(inputs(), timestep=torch.full((2,), 500.0))
    model(**kw)
    cat_pruning.advance(model)
    model(**kw)
    with pytest.raises(RuntimeError, match=r"call cat_pruning.advance\(transformer\) after each denoising step"):
        model(**kw)
