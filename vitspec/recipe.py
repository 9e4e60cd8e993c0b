"""The training recipe, defined once: schedule, clipping, masked weight decay, AdamW.

Both backends call `learning_rate` on the host each step and implement `clip_scale`, the decay
mask and the AdamW update exactly as written here; `adamw_step` is the NumPy reference of one
update that the backends' optimizer steps are tested against.

The two frameworks' stock pieces differ, so one is chosen:
- clipping: optax's `clip_by_global_norm` formula, scale = min(1, max_norm / norm); torch's
  `clip_grad_norm_` divides by (norm + 1e-6) instead, a different number on every clipped step.
- AdamW: decoupled decay multiplied by the learning rate, bias-corrected moments, eps added to
  sqrt(v_hat): p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p). torch.optim.AdamW and
  optax.adamw compute this same expression.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class MixedLabels(NamedTuple):
    """A Mixup/CutMix batch's targets (vitspec.app.mixing): the loss is weight * CE(labels) + (1 - weight)
    * CE(partner_labels), each with the recipe's label smoothing; top-1 accuracy counts the own labels."""

    partner_labels: np.ndarray  # int64 [B]: the label of the image each row was mixed with
    weight: float


@dataclasses.dataclass(frozen=True)
class Recipe:
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    total_steps: int = 1
    label_smoothing: float = 0.1
    clip_norm: float | None = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}),"
                " total_steps >= 1"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm!r}: expected None or a value > 0")


def learning_rate(step: int, recipe: Recipe) -> float:
    """Learning rate of the update at `step` (0-based): linear warmup, then cosine decay to 0.

    Warmup reaches base_lr at the last warmup step ((step + 1) / warmup, so no step has lr 0);
    the cosine then runs over the remaining steps and ends at 0 after the final one.
    """
    if step < recipe.warmup_steps:
        return recipe.base_lr * (step + 1) / recipe.warmup_steps
    decay_steps = recipe.total_steps - recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / decay_steps) if decay_steps else 1.0
    return recipe.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def decays(name: str) -> bool:
    """Weight decay applies to dense and patch kernels only: not to biases, norms, LayerScale,
    the position embedding, the class and register tokens, or the MAP probe."""
    return name.endswith("/kernel")


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def clip_scale(norm, clip_norm: float | None, where=None):
    """The factor every gradient is multiplied by: min(1, clip_norm / norm) (optax's, not torch's
    clip_grad_norm_, which divides by norm + 1e-6).

    `norm` is a float, or a device scalar with `where` its framework's `where` (torch.where,
    jnp.where): the backends compute the factor on the device, without a host sync.
    """
    if clip_norm is None:
        return 1.0
    if where is None:
        return 1.0 if norm <= clip_norm else clip_norm / norm
    return where(norm <= clip_norm, 1.0, clip_norm / norm)


@dataclasses.dataclass
class AdamState:
    step: int  # updates done so far
    mu: dict[str, np.ndarray]
    nu: dict[str, np.ndarray]

    @classmethod
    def zeros_like(cls, params: Mapping[str, np.ndarray]) -> AdamState:
        return cls(
            0,
            {k: np.zeros_like(v) for k, v in params.items()},
            {k: np.zeros_like(v) for k, v in params.items()},
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """One flat tree, as checkpoints store it: 'step', 'mu/<reference name>', 'nu/<reference name>'."""
        return {
            "step": np.asarray(self.step, dtype=np.int64),
            **{f"mu/{k}": v for k, v in self.mu.items()},
            **{f"nu/{k}": v for k, v in self.nu.items()},
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> AdamState:
        moments = {
            m: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{m}/")}
            for m in ("mu", "nu")
        }
        return cls(int(arrays["step"]), moments["mu"], moments["nu"])


def adamw_step(
    params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], state: AdamState, recipe: Recipe
) -> tuple[dict[str, np.ndarray], AdamState]:
    """One update of the recipe on the reference tree: clip, AdamW with masked decay."""
    lr = learning_rate(state.step, recipe)
    scale = clip_scale(global_norm(grads), recipe.clip_norm)
    t = state.step + 1
    new_params, mu, nu = {}, {}, {}
    for name, p in params.items():
        g = grads[name] * scale
        mu[name] = recipe.beta1 * state.mu[name] + (1 - recipe.beta1) * g
        nu[name] = recipe.beta2 * state.nu[name] + (1 - recipe.beta2) * g * g
        m_hat = mu[name] / (1 - recipe.beta1**t)
        v_hat = nu[name] / (1 - recipe.beta2**t)
        update = m_hat / (np.sqrt(v_hat) + recipe.eps)
        if decays(name):
            update = update + recipe.weight_decay * p
        new_params[name] = p - lr * update
    return new_params, AdamState(t, mu, nu)
