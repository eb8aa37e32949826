import warnings

import pytest

from cat_pruning import compat


def test_diffusers_version_bounds(monkeypatch):
    import diffusers

    assert compat.check_diffusers() == diffusers.__version__
    monkeypatch.setattr(diffusers, "__version__", "0.30.0")
    with pytest.raises(ImportError, match="needs diffusers >= 0.36.0"):
        compat.check_diffusers()
    monkeypatch.setattr(diffusers, "__version__", "9.0.0")
    monkeypatch.setattr(compat, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_diffusers()
        compat.check_diffusers()
    assert [str(w.message) for w in caught] == ["cat_pruning is tested with diffusers 0.36.0 to 0.42.1; found 9.0.0"]
