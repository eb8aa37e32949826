"""The real pipeline path: StableDiffusion3Pipeline from tiny random components, patched."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from sd3_models import JOINT_DIM, POOLED_DIM, TEXT_TOKENS, tiny_sd3

import cat_pruning


def tiny_pipeline() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.1,
        scaling_factor=1.5,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3("sd35"), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, guidance: float = 3.0, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, TEXT_TOKENS, JOINT_DIM, generator=g)
    pooled = torch.randn(2, POOLED_DIM, generator=g)
    return pipe(
        prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
        negative_pooled_prompt_embeds=pooled[1:], height=24, width=20, num_inference_steps=9,
        guidance_scale=guidance, output_type="pt", generator=torch.Generator().manual_seed(seed),
    ).images


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_pipeline_runs_twice_and_resets(guidance):
    pipe = tiny_pipeline()
    dense = call(pipe, guidance)
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=4, backend="torch")
    first, second = call(pipe, guidance), call(pipe, guidance)
    assert torch.equal(first, second)
    assert not torch.equal(first, dense)
    state = pipe.transformer._cat_pruning.state
    assert state.cfg_pairs == (guidance > 1)
    s = cat_pruning.stats(pipe)
    # patch()'s defaults: a refresh step every third step from the fill step on, and the last two steps in full
    assert [st.mode for st in s.steps] == ["dense", "dense", "anchor", "fill"] + ["pruned", "pruned", "refresh"] + [
        "refresh", "refresh"]
    assert s.batch == (2 if guidance > 1 else 1)
    cat_pruning.unpatch(pipe)
    assert torch.equal(call(pipe, guidance), dense)
    assert "step" not in vars(pipe.scheduler)


def test_pipeline_keep_ratio_one_equals_dense():
    pipe = tiny_pipeline()
    dense = call(pipe)
    with cat_pruning.patched(pipe, keep_ratio=1.0, full_steps=2, backend="torch"):
        got = call(pipe)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_pipeline_with_compiled_transformer():
    torch._dynamo.reset()
    pipe = tiny_pipeline()
    cat_pruning.patch(pipe, keep_ratio=0.3, full_steps=4, backend="torch")
    eager = call(pipe)
    pipe.transformer.compile(fullgraph=True, backend="aot_eager")
    compiled = call(pipe)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_controlnet_pipeline_is_refused():
    class FakeControlNetPipe:
        transformer = tiny_sd3("sd3", layers=1)
        scheduler = FlowMatchEulerDiscreteScheduler()
        controlnet = torch.nn.Linear(1, 1)

    pipe = FakeControlNetPipe()
    with pytest.raises(ValueError, match="controlnet"):
        cat_pruning.patch(pipe)
    assert not cat_pruning.is_patched(pipe.transformer)
