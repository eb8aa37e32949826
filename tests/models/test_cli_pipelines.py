"""`python -m cat_pruning generate` on pipeline folders saved on disk: a diffusers DiTPipeline
(class-conditional: the prompt is a class name), the tiny model's own folder, and folders that
cat_pruning cannot patch (refused before anything loads)."""

from __future__ import annotations

import json

import harness
import pytest
import torch
from dit_models import IN_CHANNELS, tiny_dit

from cat_pruning.cli import main
from cat_pruning.tiny import WEIGHTS_DIR


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    vae = harness.tiny_vae(IN_CHANNELS, block_out_channels=(8,), norm_num_groups=4, sample_size=8)
    pipe = DiTPipeline(transformer=tiny_dit(sample_size=10), vae=vae, scheduler=DPMSolverMultistepScheduler())
    path = tmp_path_factory.mktemp("dit")
    pipe.save_pretrained(path)
    # Hub DiT folders carry the ImageNet class names in model_index.json; save_pretrained does not.
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {"3": "tabby cat, tabby", "7": "golden retriever"}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def _generate(folder, tmp_path, *extra):
    return main(["generate", "--model", str(folder), "--steps", "5", "--full-steps", "2", "--out", str(tmp_path),
                 "--device", "cpu", "--backend", "torch", *extra])


def test_generate_on_a_saved_dit_pipeline(dit_folder, tmp_path, capsys):
    assert _generate(dit_folder, tmp_path, "--prompt", "golden retriever", "--paper") == 0
    assert _generate(dit_folder, tmp_path, "--prompt", "golden retriever", "--dense") == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    tail = f"-{dit_folder.name}-10x10-5steps-g4-fp32"  # model, size, steps, guidance, dtype: no two runs share a name
    cat = f"golden-retriever-seed0-cat-k0.3-f2{tail}"
    assert names == [f"{cat}-tokens.png", f"{cat}.png", f"golden-retriever-seed0-dense{tail}.png"]
    out = capsys.readouterr().out
    assert "CAT Pruning on DiT" in out and "3 pruned" in out


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "unicorn"], "takes an ImageNet class name"),
    (["--prompt", "tabby", "--height", "64"], "takes no height"),
])  # fmt: skip
def test_generate_dit_bad_input(dit_folder, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exc:
        _generate(dit_folder, tmp_path, *extra)
    assert message in str(exc.value)


def test_generate_on_the_tiny_model_folder(tmp_path):
    """The shipped weights are a folder like any other; its pipeline class is not in diffusers."""
    assert _generate(WEIGHTS_DIR, tmp_path, "--prompt", "a red circle on a blue background", "--steps", "3") == 0
    assert len(list(tmp_path.glob("a-red-circle-on-a-blue-background-seed0-cat-*.png"))) == 2


@pytest.mark.parametrize("index, message", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "has no transformer"),
    ({"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]},
     "HunyuanDiT2DModel is not supported"),
])  # fmt: skip
def test_unsupported_pipeline_is_refused_before_loading(tmp_path, index, message):
    (tmp_path / "model_index.json").write_text(json.dumps(index))  # no weights: nothing may load
    with pytest.raises(SystemExit) as exc:
        _generate(tmp_path, tmp_path, "--prompt", "x")
    assert message in str(exc.value)
