"""NumPy, PyTorch and JAX on the same drawn config and weights: outputs and gradients agree in float64.

Each backend is checked against the reference, and the two backends against each other (the
pair no single-backend test compares). PyTorch takes NCHW images, the others NHWC; both backend
computations are the ones their own parity tests run. CaiT configs (`cait_cases`) too, a few.
"""

import numpy as np
from hypothesis import given, settings

from parity_tests.cases import Case, cait_cases, cases
from parity_tests.test_flax_parity import flax_named_and_grads
from parity_tests.test_torch_parity import torch_named_and_grads
from parity_tests.tolerances import assert_close_f64


def check_three_way(case: Case) -> None:
    ref_named, ref_grads = case.reference(np.float64)
    torch_named, torch_grads = torch_named_and_grads(case, np.float64)
    jax_named, jax_grads = flax_named_and_grads(case, np.float64)
    for named, grads in ((torch_named, torch_grads), (jax_named, jax_grads)):
        assert_close_f64(named, ref_named, "forward")
        assert_close_f64(grads, ref_grads, "grad")
    assert_close_f64(jax_named, torch_named, "forward")
    assert_close_f64(jax_grads, torch_grads, "grad")


@given(cases)
def test_numpy_torch_and_jax_agree_in_float64(case):
    check_three_way(case)


@settings(max_examples=3)
@given(cait_cases)
def test_numpy_torch_and_jax_agree_in_float64_on_cait(case):
    check_three_way(case)
