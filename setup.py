"""Build of the cat-pruning distribution: two packages and an optional compiled extension.

cat_kernels lives in ./cat_kernels, cat_pruning in ./python/cat_pruning; both are mapped in
package_dir, or cat_pruning would silently leave the wheel. The extension cat_kernels._C is
built according to CAT_KERNELS_BUILD_EXT (see build_ext.py and the README):

    pip install .                                              # auto: pure Python under build isolation
    CAT_KERNELS_BUILD_EXT=1 pip install --no-build-isolation . # with the extension (needs torch)
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_ext import extension_setup_kwargs  # noqa: E402

# Every subpackage of both (adapters, the shipped model, ...); tests/test_packaging.py checks the wheel.
PACKAGES = find_packages(include=["cat_kernels", "cat_kernels.*"]) + find_packages(
    "python", include=["cat_pruning", "cat_pruning.*"]
)
PACKAGE_DIR = {"cat_kernels": "cat_kernels", "cat_pruning": "python/cat_pruning"}

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    include_package_data=True,
    **extension_setup_kwargs(),
)
