"""How setup.py builds the optional compiled extension cat_kernels._C (csrc/).

CAT_KERNELS_BUILD_EXT selects the mode:

- ``auto`` (default): build when torch is importable at build time and a C++ compiler exists;
  a failed build warns and the pure-Python package is installed. Under pip's build isolation
  torch is not importable, so a plain ``pip install .`` installs the pure-Python package quickly.
- ``1``: build or fail. Needs torch in the build environment: ``pip install --no-build-isolation``.
- ``0``: never build.

CUDA sources are compiled when nvcc is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda-13.0,
/usr/local/cuda, or nvcc on PATH) and torch is a CUDA build; otherwise the CPU sources only,
with CAT_KERNELS_CPU_ONLY defined. CAT_KERNELS_WITH_CUDA=0|1 forces the choice (1 fails
without nvcc). TORCH_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS are honoured.

Objects go to build/ext/<variant>/ (not a temporary directory) and ninja rebuilds only what
changed, so a second build on the same machine reuses the CUDA objects.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
MODE_VAR = "CAT_KERNELS_BUILD_EXT"
CUDA_VAR = "CAT_KERNELS_WITH_CUDA"
DEFAULT_ARCHS = "8.0;9.0"
CPU_SOURCES = ["csrc/ops.cpp", "csrc/forecast.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/ops_cuda.cu", "csrc/forecast_cuda.cu"]
HEADERS = ["csrc/common.h", "csrc/ops.h", "csrc/forecast.h"]


def _log(message: str) -> None:
    print(f"cat_kernels: {message}", file=sys.stderr)


def build_mode() -> str:
    mode = os.environ.get(MODE_VAR, "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"{MODE_VAR} must be 0, 1 or auto, got {mode!r}")
    return mode


def find_cuda_home() -> str | None:
    """The CUDA toolkit root holding bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda-13.0", "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def wheel_cuda_includes() -> list[str]:
    """cuBLAS/cuSPARSE headers of the CUDA torch wheel (nvidia/cu*/include), needed by
    ATen/cuda/CUDAContext.h when the toolkit lacks them (docs/design.md section 7)."""
    spec = importlib.util.find_spec("nvidia")
    paths = []
    for base in list(spec.submodule_search_locations or []) if spec else []:
        for sub in sorted(os.listdir(base)):
            inc = os.path.join(base, sub, "include")
            if sub.startswith("cu") and os.path.isdir(inc) and os.path.exists(os.path.join(inc, "cublas_v2.h")):
                paths.append(inc)
    return paths


def _want_cuda(torch) -> tuple[bool, str | None]:
    forced = os.environ.get(CUDA_VAR, "").strip()
    home = find_cuda_home()
    usable = home is not None and torch.version.cuda is not None
    if forced == "1" and not usable:
        raise RuntimeError(f"{CUDA_VAR}=1 but nvcc or a CUDA build of torch is missing (CUDA_HOME={home})")
    if forced == "0":
        return False, home
    return usable, home


def extension_setup_kwargs() -> dict:
    """ext_modules and cmdclass for setup(), or {} when the extension is not built."""
    mode = build_mode()
    if mode == "0":
        return {}
    try:
        import torch  # noqa: F401
    except ImportError:
        if mode == "1":
            raise RuntimeError(
                f"{MODE_VAR}=1 needs torch at build time; install torch first and use "
                "`pip install --no-build-isolation .` (build isolation hides the installed torch)"
            ) from None
        _log("torch is not importable at build time (pip build isolation?); installing without cat_kernels._C")
        return {}
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(compiler.split()[0]) is None and shutil.which("c++") is None:
        if mode == "1":
            raise RuntimeError(f"{MODE_VAR}=1 but no C++ compiler was found ({compiler})")
        _log("no C++ compiler found; installing without cat_kernels._C")
        return {}

    import torch

    with_cuda, cuda_home = _want_cuda(torch)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils import cpp_extension

    cxx_flags = ["-O3"]
    include_dirs = [CSRC]
    if with_cuda:
        include_dirs += wheel_cuda_includes()
        ext = cpp_extension.CUDAExtension(
            "cat_kernels._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            depends=HEADERS,
        )
        variant = "cuda-" + os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", "_").replace(" ", "_").replace("+", "p")
    else:
        ext = cpp_extension.CppExtension(
            "cat_kernels._C",
            CPU_SOURCES,
            include_dirs=include_dirs,
            define_macros=[("CAT_KERNELS_CPU_ONLY", None)],
            extra_compile_args={"cxx": cxx_flags},
            depends=HEADERS,
        )
        variant = "cpu"
    _log(f"building cat_kernels._C ({variant}, mode {mode}, MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')})")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}-{variant}"
    build_temp = os.path.join(ROOT, "build", "ext", tag)

    class BuildExt(cpp_extension.BuildExtension):
        """Persistent build directory (ninja reuses objects); in auto mode a failure only warns."""

        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = build_temp

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if mode == "1":
                    raise
                warnings.warn(
                    f"cat_kernels: building the extension cat_kernels._C failed ({exc}); installing the "
                    f"pure-Python package. Set {MODE_VAR}=1 to see the error as a failure.",
                    stacklevel=1,
                )
                self.extensions = []

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}
