"""The wheel carries both packages (and the shipped model) and imports in a fresh venv."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_and_imports(tmp_path):
    env = {**os.environ, "CAT_KERNELS_BUILD_EXT": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist")],
        check=True, env=env, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("cat_pruning-*.whl")
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch and diffusers come from the test environment (a path entry, not its .pth files, so the
    # editable install of this checkout stays invisible and the wheel's copy is what imports).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, env=env)
    probe = (
        "import cat_kernels, cat_pruning, cat_pruning.tiny, cat_pruning.photos, cat_pruning.video, cat_kernels.triton;"
        "print(cat_kernels.__file__); print(cat_pruning.__file__);"
        "print(*((m.WEIGHTS_DIR / 'transformer' / 'diffusion_pytorch_model.safetensors').is_file()"
        " for m in (cat_pruning.tiny, cat_pruning.photos, cat_pruning.video)))"
    )
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    kernels_file, pruning_file, *weights = out.split()
    assert kernels_file.startswith(site) and pruning_file.startswith(site), out
    assert weights == ["True"] * 3  # the scene, photo and video models
