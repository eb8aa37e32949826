"""The diffusers versions cat_pruning is tested with: older than the minimum raises, newer than
the newest tested warns once (CI runs the model tests on both ends, see the Makefile)."""

from __future__ import annotations

import importlib.metadata
import warnings

from packaging.version import Version

DIFFUSERS_MIN = "0.36.0"
DIFFUSERS_MAX_TESTED = "0.42.1"
_warned = False


def check_diffusers() -> str:
    """The installed diffusers version; ImportError below the minimum, a warning above the tested."""
    global _warned
    try:
        found = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError("cat_pruning.patch needs diffusers: pip install 'cat-pruning[diffusers]'") from err
    import diffusers  # the imported one can differ from the installed metadata (PYTHONPATH)

    found = getattr(diffusers, "__version__", found)
    if Version(found) < Version(DIFFUSERS_MIN):
        raise ImportError(f"cat_pruning needs diffusers >= {DIFFUSERS_MIN}, found {found}")
    if Version(Version(found).base_version) > Version(DIFFUSERS_MAX_TESTED) and not _warned:
        _warned = True
        warnings.warn(
            f"cat_pruning is tested with diffusers {DIFFUSERS_MIN} to {DIFFUSERS_MAX_TESTED}; found {found}",
            RuntimeWarning,
            stacklevel=3,
        )
    return found
