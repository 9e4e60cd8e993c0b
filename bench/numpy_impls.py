"""The NumPy reference forward, for scale (inference only: its analytic backward is a spec, not a trainer)."""

from __future__ import annotations

import vitspec
from bench.runners import Runner, float_batch, random_batch
from vitspec.config import ViTConfig


def reference(cfg: ViTConfig, batch: int) -> Runner:
    params = vitspec.init_params(cfg, seed=0)
    images = float_batch(random_batch(cfg, batch)[0])
    return Runner(forward=lambda: vitspec.forward(cfg, params, images), train_step=None)


IMPLEMENTATIONS = {"reference": reference}
