"""CATConfig's validation: a wrong type is a TypeError, a wrong value a ValueError, each naming
the field, what it takes and what it got; knobs the chosen forecast ignores are refused."""

import dataclasses

import numpy as np
import pytest

import cat_pruning
from cat_pruning import CATConfig


@pytest.mark.parametrize("field, value, expected", [
    ("keep_ratio", True, "a number in (0, 1]"),  # ran as 1.0
    ("keep_ratio", "a", "a number in (0, 1]"),
    ("keep_ratio", None, "a number in (0, 1]"),
    ("full_steps", 8.0, "an int >= 2"),
    ("num_clusters", True, "an int in [1, 1023]"),
    ("cfg_pairs", 1, "None, True or False"),  # equal to True, but not a bool
    ("cfg_pairs", 0, "None, True or False"),
    ("cfg_pairs", "yes", "None, True or False"),
    ("manual_steps", 1, "True or False"),
    ("backend", None, "one of"),
    ("forecast", 1, "one of"),
    ("refresh_every", 1.5, "an int >= 0"),
    ("forecast_damping", True, "a number in [0, 1]"),
    ("forecast_order", True, "1 or 2"),
    ("cluster_content_weight", "0.05", "a finite number >= 0"),
    ("refresh_offset", 2.0, "an int >= 0"),
    ("final_full_steps", 1.0, "an int >= 0"),
    ("refresh_phase", None, "one of"),
    ("importance", 1, "one of"),
])  # fmt: skip
def test_a_wrong_type_is_a_type_error(field, value, expected):
    with pytest.raises(TypeError) as err:
        CATConfig(**{field: value})
    assert not isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"CATConfig.{field}" in message and expected in message and repr(value) in message, message


@pytest.mark.parametrize("field, value, expected", [
    ("keep_ratio", 0, "a number in (0, 1]"),
    ("keep_ratio", 1.5, "a number in (0, 1]"),
    ("keep_ratio", float("nan"), "a number in (0, 1]"),
    ("full_steps", 1, "an int >= 2"),
    ("cluster_content_weight", float("inf"), "a finite number >= 0"),
    ("cluster_content_weight", float("nan"), "a finite number >= 0"),
    ("cluster_content_weight", -0.1, "a finite number >= 0"),
    ("staleness_decay", float("nan"), "a number in [0, 1]"),
    ("backend", "tpu", "one of"),
    ("selection", "best", "one of"),
    ("forecast_order", 3, "1 or 2"),
    ("final_full_steps", -1, "an int >= 0"),
    ("refresh_phase", "start", "one of"),
    ("importance", "change-since-anchor", "one of"),
])  # fmt: skip
def test_a_wrong_value_is_a_value_error(field, value, expected):
    with pytest.raises(ValueError) as err:
        CATConfig(**{field: value})
    message = str(err.value)
    assert f"CATConfig.{field}" in message and expected in message and repr(value) in message, message


@pytest.mark.parametrize("field, value", [("forecast_from", "all"), ("forecast_order", 1),
                                          ("forecast_damping", 0.4), ("forecast_kv_damping", 0.5),
                                          ("forecast_horizon", 2.0)])  # fmt: skip
def test_taylor_knobs_are_refused_without_the_taylor_forecast(field, value):
    """forecast="none" reads none of them, so setting one would be silently ignored."""
    for make in (lambda: CATConfig(forecast="none", **{field: value}),
                 lambda: CATConfig.paper(**{field: value}),
                 lambda: CATConfig(**{field: value}).replace(forecast="none")):  # fmt: skip
        with pytest.raises(ValueError, match=f'{field}.*only applies with forecast="taylor"'):
            make()
    # with the forecast on (the default) the same value is taken
    assert getattr(CATConfig(**{field: value}), field) == value
    assert getattr(CATConfig.paper(forecast="taylor", refresh_every=3, **{field: value}), field) == value


def test_the_paper_preset_and_its_overrides_still_build():
    paper = CATConfig.paper()
    assert (paper.forecast, paper.keep_ratio, paper.refresh_every) == ("none", 0.3, 0)
    assert CATConfig.paper(full_steps=4, keep_ratio=0.5).full_steps == 4
    # a Taylor knob left at its default (even when spelled out) is fine without the forecast
    defaults = CATConfig()
    assert CATConfig(forecast="none", forecast_order=defaults.forecast_order,
                     forecast_damping=defaults.forecast_damping).forecast == "none"


def test_numbers_of_other_numeric_types_are_taken():
    cfg = CATConfig(keep_ratio=np.float32(0.5), full_steps=np.int64(4), forecast_horizon=1)
    assert cfg.tokens_kept(10) == 5 and cfg.full_steps == 4


def test_patch_refuses_a_config_that_is_not_a_catconfig():
    """A dict used to fail deep inside with AttributeError: 'dict' object has no attribute 'cfg_pairs'."""
    transformer = object()  # the config is checked before the model
    for bad in ({"keep_ratio": 0.3}, 0.3, "paper", dataclasses.asdict(CATConfig())):
        with pytest.raises(TypeError, match=r"CATConfig\(\.\.\.\).*keyword arguments"):
            cat_pruning.patch(transformer, bad)
        with pytest.raises(TypeError, match=r"CATConfig\(\.\.\.\)"):
            with cat_pruning.patched(transformer, bad):
                pass


def test_importance_by_forecast_error_needs_the_forecast():
    with pytest.raises(ValueError, match='importance="forecast-error" needs forecast="taylor"'):
        CATConfig.paper(importance="forecast-error")
    assert CATConfig.paper(importance="change").importance == "change"


@pytest.mark.parametrize("field, value", [("importance_fraction", 0.5), ("staleness_decay", 0.9)])
def test_cat_selection_knobs_are_refused_with_regions(field, value):
    """The default selection ("regions") reads neither, so setting one would be silently ignored."""
    with pytest.raises(ValueError, match=f'{field}=.*does not apply to selection="regions"'):
        CATConfig(**{field: value})
    assert getattr(CATConfig(selection="cat", **{field: value}), field) == value
    assert getattr(CATConfig.paper(**{field: value}), field) == value
    assert (CATConfig().selection, CATConfig.paper().selection) == ("regions", "cat")


@pytest.mark.parametrize("knobs, named", [
    (dict(kv_dtype="float8"), "kv_dtype='float8'"),
    (dict(kv_dtype="float8-values"), "kv_dtype='float8-values'"),
    (dict(slope_dtype="float8"), "slope_dtype='float8'"),
    (dict(forecast_from="all"), "forecast_from='all'"),
    (dict(forecast_from="rebase"), "forecast_from='rebase'"),
    (dict(forecast="none", refresh_every=0, kv_dtype="float8"), "kv_dtype='float8'"),
])  # fmt: skip
def test_fused_attention_refuses_what_it_cannot_read(knobs, named):
    """fused_attention forms skipped rows from values and slopes in the model's dtype, as the last
    full or refresh step stored them; each knob that breaks that is named."""
    with pytest.raises(ValueError, match="fused_attention") as err:
        CATConfig(fused_attention=True, **knobs)
    assert named in str(err.value)
    CATConfig(**knobs)  # each is fine without it
    CATConfig(fused_attention=True, forecast="none", refresh_every=0)  # the paper's reuse is fused too
    with pytest.raises(TypeError, match="fused_attention"):
        CATConfig(fused_attention=1)
