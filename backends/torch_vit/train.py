"""Train with PyTorch: `python -m backends.torch_vit.train --dataset fashion-mnist --model fmnist-tiny`.

The flags, data, schedule and checkpoints are `vitspec.training`'s; this module is the PyTorch
`Backend`: the recipe's update written out by hand (torch's `clip_grad_norm_` divides by
norm + 1e-6, the recipe by norm; see vitspec/recipe.py), weight decay masked on the reference
names through the converter's table, label smoothing via F.cross_entropy (the same targets
(1 - e) onehot + e / K). On a GPU the step runs under bfloat16 autocast; on the CPU in float32.
torch.compile is not used yet: the model compiles without graph breaks (tests/test_torch_model.py), but
whether it pays for the training step has not been measured (the speed issue will).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch_vit.convert import from_reference, mapping_table, to_reference
from backends.torch_vit.model import VisionTransformer
from vitspec import training
from vitspec.config import ViTConfig
from vitspec.datasets import ChannelStats
from vitspec.recipe import Recipe, decays

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.float32}  # bf16: fp32 params, autocast


def decay_mask(cfg: ViTConfig) -> dict[str, bool]:
    """timm name -> whether the recipe decays it; a fused tensor's reference names must agree."""
    mask = {}
    for rule in mapping_table(cfg):
        flags = {decays(name) for name in rule.reference_names}
        if len(flags) != 1:
            raise ValueError(f"{rule.timm_name} fuses decayed and undecayed parameters: {rule.reference_names}")
        mask[rule.timm_name] = flags.pop()
    return mask


def step_seed(seed: int, step: int) -> int:
    """The dropout seed of one step: a function of (seed, step), so resuming needs no RNG state."""
    return int(np.random.SeedSequence(seed, spawn_key=(step,)).generate_state(1, np.uint64)[0] >> 1)


class TorchBackend:
    """vitspec.training.Backend in PyTorch; `precision` 'fp64' is for the parity tests."""

    def __init__(self, cfg: ViTConfig, params: Mapping[str, np.ndarray], recipe: Recipe, stats: ChannelStats,
                 precision: str, seed: int, device: str | None = None):
        self.cfg, self.recipe, self.seed = cfg, recipe, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[precision]
        self.autocast = precision == "bf16"
        self.model = VisionTransformer(cfg).to(self.device, self.dtype)
        self.model.load_state_dict(from_reference(params, cfg))
        self.params = dict(self.model.named_parameters())
        self.decays = decay_mask(cfg)
        self.mu = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.nu = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.step = 0
        self.table = torch.from_numpy(training.normalization_table(stats)).to(self.device)
        self.channels = torch.arange(cfg.in_channels, device=self.device)

    def normalize(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> NCHW in the model dtype: datasets.normalize's float32 values, then cast."""
        pixels = torch.from_numpy(images).to(self.device, non_blocking=True).long()
        return self.table[pixels, self.channels].permute(0, 3, 1, 2).to(self.dtype)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(self.normalize(images))

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(step_seed(self.seed, self.step))
        self.model.train()
        targets = torch.from_numpy(labels).to(self.device)
        logits = self.logits(images)
        # At least float32: a bfloat16 log-softmax would lose the loss to rounding.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits, targets, label_smoothing=self.recipe.label_smoothing)
        grads = torch.autograd.grad(loss, list(self.params.values()))
        self.apply_update(dict(zip(self.params, grads)), lr)
        correct = (logits.argmax(-1) == targets).sum()
        return loss.detach(), correct

    @torch.no_grad()
    def apply_update(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """vitspec.recipe.adamw_step, op for op, on device (no host sync for the clip factor)."""
        recipe = self.recipe
        self.step += 1
        bias1, bias2 = 1 - recipe.beta1**self.step, 1 - recipe.beta2**self.step
        norm = torch.sqrt(sum(torch.sum(g * g) for g in grads.values()))
        scale = torch.ones_like(norm)
        if recipe.clip_norm is not None:
            scale = torch.where(norm <= recipe.clip_norm, scale, recipe.clip_norm / norm)
        for name, p in self.params.items():
            g = grads[name] * scale
            self.mu[name] = recipe.beta1 * self.mu[name] + (1 - recipe.beta1) * g
            self.nu[name] = recipe.beta2 * self.nu[name] + (1 - recipe.beta2) * g * g
            update = (self.mu[name] / bias1) / (torch.sqrt(self.nu[name] / bias2) + recipe.eps)
            if self.decays[name]:
                update = update + recipe.weight_decay * p
            p.sub_(lr * update)

    @torch.no_grad()
    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.logits(images).float().cpu().numpy()

    def reference_params(self) -> dict[str, np.ndarray]:
        return to_reference(self.model.state_dict(), self.cfg)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        moments = {f"mu/{k}": v for k, v in to_reference(self.mu, self.cfg).items()}
        moments |= {f"nu/{k}": v for k, v in to_reference(self.nu, self.cfg).items()}
        return {"step": np.asarray(self.step, dtype=np.int64), **moments}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.step = int(state["step"])
        for moment in ("mu", "nu"):
            tree = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{moment}/")}
            tensors = {k: t.to(self.device, self.dtype) for k, t in from_reference(tree, self.cfg).items()}
            setattr(self, moment, tensors)


def create_backend(cfg: ViTConfig, params, recipe: Recipe, stats: ChannelStats, precision: str,
                   seed: int) -> TorchBackend:
    return TorchBackend(cfg, params, recipe, stats, precision, seed)


def main(argv: Sequence[str] | None = None) -> dict:
    return training.main(argv, prog="python -m backends.torch_vit.train", backend_name="torch",
                         create_backend=create_backend,
                         default_precision="bf16" if torch.cuda.is_available() else "fp32")


if __name__ == "__main__":
    main()
