"""Build of the cat-pruning distribution: two packages and an optional compiled extension.

cat_kernels lives in ./cat_kernels, cat_pruning in ./python/cat_pruning; both are mapped in
package_dir, or cat_pruning would silently leave the wheel. The extension cat_kernels._C is
built according to CAT_KERNELS_BUILD_EXT (see the README).
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["cat_kernels", "cat_kernels.*"]) + [
    "cat_pruning" + p.removeprefix("cat_pruning") for p in find_packages("python", include=["cat_pruning*"])
]
PACKAGE_DIR = {"cat_kernels": "cat_kernels", "cat_pruning": "python/cat_pruning"}

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    include_package_data=True,
)
