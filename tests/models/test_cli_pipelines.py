"""`python -m cat_pruning generate` on pipeline folders saved on disk: a diffusers DiTPipeline
(class-conditional: the prompt is a class name), the tiny model's own folder, and folders that
cat_pruning cannot patch (refused before anything loads)."""

from __future__ import annotations

import json

import harness
import numpy as np
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


# Qwen-Image and FLUX.2 folders with stand-in text encoders built here (no download): a byte-level
# Qwen2 tokenizer (every byte a token, no merges) and tiny Qwen2.5-VL / Qwen3 text models.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    from transformers import Qwen2Tokenizer

    # GPT-2's byte-to-character map: the printable bytes stand for themselves, the others after 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    vocab = {chr(c): i for i, c in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _new_family(name: str) -> None:
    import diffusers

    from cat_pruning.adapters.qwenimage import MIN_DIFFUSERS

    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2])
    if name.startswith("QwenImage") and version < MIN_DIFFUSERS:
        pytest.skip(f"Qwen-Image needs diffusers >= {MIN_DIFFUSERS}")


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    _new_family("QwenImagePipeline")
    from diffusers import QwenImagePipeline
    from qwen_models import JOINT_DIM
    from test_qwenimage import tiny_pipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    text = dict(hidden_size=JOINT_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=len(tokenizer) - 1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=JOINT_DIM)
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    base = tiny_pipeline()
    pipe = QwenImagePipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=encoder, tokenizer=tokenizer,
                             transformer=base.transformer)
    path = tmp_path_factory.mktemp("qwen-image")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    """A FLUX.2 [klein] folder (Qwen3 text model, 28 layers: the pipeline stacks layers 9, 18 and
    27), not distilled: CFG runs the transformer once per branch."""
    _new_family("Flux2KleinPipeline")
    from diffusers import Flux2KleinPipeline
    from flux2_models import JOINT_DIM
    from test_flux2 import tiny_pipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = Qwen3Config(hidden_size=JOINT_DIM // 3, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=len(tokenizer) - 1)  # fmt: skip
    base = tiny_pipeline()
    pipe = Flux2KleinPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=Qwen3ForCausalLM(config).eval(),
                              tokenizer=tokenizer, transformer=base.transformer)
    path = tmp_path_factory.mktemp("flux2-klein")
    pipe.save_pretrained(path)
    return path


@pytest.mark.parametrize(("folder", "size", "family"), [
    ("qwen_folder", ("48", "40"), "Qwen-Image"),
    ("klein_folder", ("24", "20"), "FLUX.2"),
])  # fmt: skip
def test_generate_on_saved_qwen_image_and_flux2_pipelines(folder, size, family, request, tmp_path, capsys):
    """`generate --model FOLDER` on a QwenImagePipeline and a Flux2KleinPipeline saved on disk:
    the prompt goes through the pipelines' own text encoding, CFG runs each branch on its own
    caches (Qwen-Image: --guidance is its true CFG scale, with a negative prompt), the images are
    written, and CAT at keep_ratio 1 writes the dense image."""
    from PIL import Image

    path = request.getfixturevalue(folder)
    # 6 steps: full 2, two pruned, the last two in full
    args = ("--prompt", "a cat", "--height", size[0], "--width", size[1], "--guidance", "3", "--steps", "6")
    assert _generate(path, tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert f"CAT Pruning on {family}" in out and "2 branches (cond, uncond)" in out and "2 pruned" in out
    assert _generate(path, tmp_path, *args, "--keep-ratio", "1") == 0
    assert _generate(path, tmp_path, *args, "--dense") == 0
    images = {}
    for file in tmp_path.glob("a-cat-seed0-*.png"):
        run = file.name.removeprefix("a-cat-seed0-")  # "cat-k0.02-f2-...", "dense-..."
        if not run.endswith("-tokens.png"):
            images["dense" if run.startswith("dense") else run.split("-")[1]] = np.asarray(Image.open(file)).astype(int)
    assert sorted(images) == ["dense", "k0.02", "k1.0"]
    assert np.abs(images["k1.0"] - images["dense"]).max() <= 1  # 8-bit images: at most a rounding apart
