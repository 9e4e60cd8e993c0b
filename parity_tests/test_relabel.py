"""A relabeled model is the same function: float64 within the float64 bound, float32 rounded otherwise."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from parity_tests.cases import cait_cases, cases, family_cases
from parity_tests.relabel import _param_axes, random_relabeling
from parity_tests.strategies import family_configs
from parity_tests.tolerances import assert_close_f64
from vitspec.params import param_shapes


@given(st.one_of(cases, cait_cases))
def test_relabeled_reference_is_the_same_function(case):
    check_same_function(case)


@given(family_cases)
def test_relabeled_family_reference_is_the_same_function(case):
    # Every family knob's parameters (dist_token, head_dist, pre_norm, attention_dim's q/k/v/out,
    # the optional biases) relabeled; channels fixed under Scenic's sinusoidal posembs.
    check_same_function(case)


def check_same_function(case):
    named, grads = case.reference(np.float64)
    relabeling = random_relabeling(case.cfg, np.random.default_rng(case.seed))
    named_r, grads_r = case.reference(np.float64, relabeling=relabeling)
    assert_close_f64(named_r, named, "forward")
    assert_close_f64(grads_r, grads, "grad")


@given(family_configs())
def test_every_parameter_axis_has_a_label_of_its_size(cfg):
    # A label on an axis of another size would fail loudly or, worse, permute a real axis wrongly
    # (a head's classes as if they were channels); every axis is named, None where it stays put.
    perms = random_relabeling(cfg, np.random.default_rng(0))
    for name, shape in param_shapes(cfg).items():
        axes = _param_axes(cfg, name)
        assert len(axes) == len(shape), (name, axes, shape)
        for label, size in zip(axes, shape, strict=True):
            assert label is None or len(perms[label]) == size, (name, label, size)


def test_relabeling_changes_float32_rounding():
    # Not a bound: shows the realizations differ, so their largest error is an estimate, not a copy.
    from parity_tests.cases import Case
    from vitspec import variant

    case = Case(variant("Ti/16", image_size=32, patch_size=8, num_classes=10, depth=2), seed=0, batch=2)
    rounded = case.float32_roundings()
    assert len(rounded) > 1
    assert not all(np.array_equal(rounded[0][0]["logits"], other[0]["logits"]) for other in rounded[1:])
