"""A relabeled model is the same function: float64 within the float64 bound, float32 rounded otherwise."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from parity_tests.cases import cait_cases, cases
from parity_tests.relabel import random_relabeling
from parity_tests.tolerances import assert_close_f64


@given(st.one_of(cases, cait_cases))
def test_relabeled_reference_is_the_same_function(case):
    named, grads = case.reference(np.float64)
    relabeling = random_relabeling(case.cfg, np.random.default_rng(case.seed))
    named_r, grads_r = case.reference(np.float64, relabeling=relabeling)
    assert_close_f64(named_r, named, "forward")
    assert_close_f64(grads_r, grads, "grad")


def test_relabeling_changes_float32_rounding():
    # Not a bound: shows the realizations differ, so their largest error is an estimate, not a copy.
    from parity_tests.cases import Case
    from vitspec import variant

    case = Case(variant("Ti/16", image_size=32, patch_size=8, num_classes=10, depth=2), seed=0, batch=2)
    rounded = case.float32_roundings()
    assert len(rounded) > 1
    assert not all(np.array_equal(rounded[0][0]["logits"], other[0]["logits"]) for other in rounded[1:])
