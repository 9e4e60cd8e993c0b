"""Train with PyTorch: `python -m backends.torch_vit.train --dataset fashion-mnist --model fmnist-tiny`.

The flags, data, schedule and checkpoints are `vitspec.app.training`'s; this module is the PyTorch
`Backend`: the recipe's clip written out by hand (torch's `clip_grad_norm_` divides by
norm + 1e-6, the recipe by norm; see vitspec/recipe.py), then torch's fused AdamW with weight decay
masked on the reference names through the converter's table, label smoothing via F.cross_entropy
(the same targets (1 - e) onehot + e / K), weighted over a Mixup/CutMix batch's two labels as
vitspec.recipe.MixedLabels defines. On a GPU the step runs under bfloat16 autocast; on the
CPU in float32. torch.compile is not used: the model compiles without graph breaks
(tests/test_torch_model.py), but on CPU the compiled training step was slower (S/16 batch 16:
5.6 vs 6.0 img/s after a 26 s compile; the 32 px CIFAR model: no gain after 17 s), the step
being matmul-bound (bench/PERFORMANCE.md).

Dropout and stochastic-depth masks come from `vitspec.masks`' hash of (seed, step, site, global
example, element) (backends/torch_vit/masks.py): the same masks however the batch is split, and
the Flax backend's bit for bit.

Launched by torchrun (`torchrun --nproc-per-node N -m backends.torch_vit.train ...`), each rank
trains on its rows of the global batch with DistributedDataParallel (backends/torch_vit/distributed.py):
DDP averages the ranks' gradients of their local mean losses, which is the global batch's mean
gradient (the ranks hold equal shares), so clipping sees the global norm and every rank takes the
same AdamW step. FSDP2 (`torch.distributed.fsdp.fully_shard`) would shard parameters and moments
for models that do not fit one device; it is not wired in: these models fit, and it would have to
be shown to keep the run exact (its reduce-scatter and per-shard clipping sums) first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from backends.torch_vit import distributed
from backends.torch_vit.cait import model_for
from backends.torch_vit.convert import from_reference, mapping_table, to_reference
from backends.torch_vit.masks import CounterMasks
from vitspec.config import ViTConfig
from vitspec.recipe import AdamState, MixedLabels, Recipe, clip_scale, decays

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.float32}  # bf16: fp32 params, autocast


def decay_mask(cfg: ViTConfig) -> dict[str, bool]:
    """timm name -> whether the recipe decays it; a fused tensor's reference names must agree."""
    mask = {}
    for rule in mapping_table(cfg):
        flags = {decays(name) for name in rule.reference}
        if len(flags) != 1:
            raise ValueError(f"{rule.native} fuses decayed and undecayed parameters: {rule.reference}")
        mask[rule.native] = flags.pop()
    return mask


def adamw(
    params: Mapping[str, torch.nn.Parameter], decayed: Mapping[str, bool], recipe: Recipe
) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all tensors; 6x faster than the unfused update on CPU for
    B/16), in two groups: weight decay on the recipe's decayed parameters only. Its update is the
    recipe's, p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), with the decay applied first as
    p * (1 - lr * wd): the same expression, rounded in another order."""
    groups = [
        {
            "params": [p for name, p in params.items() if decayed[name] == flag],
            "weight_decay": recipe.weight_decay if flag else 0.0,
        }
        for flag in (True, False)
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=recipe.base_lr,
        betas=(recipe.beta1, recipe.beta2),
        eps=recipe.eps,
        fused=True,
    )


class TorchBackend:
    """vitspec.app.training.Backend in PyTorch; `precision` 'fp64' is for the parity tests."""

    def __init__(
        self,
        cfg: ViTConfig,
        params: Mapping[str, np.ndarray],
        recipe: Recipe,
        normalization: np.ndarray,
        precision: str,
        seed: int,
        device: str | None = None,
    ):
        self.cfg, self.recipe, self.seed = cfg, recipe, seed
        self.device = torch.device(device) if device else distributed.device()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.dtype = DTYPES[precision]
        self.autocast = precision == "bf16"
        self.model = model_for(cfg).to(self.device, self.dtype)
        self.model.load_state_dict(from_reference(params, cfg))
        self.params = dict(self.model.named_parameters())
        self.decays = decay_mask(cfg)
        self.optimizer = adamw(self.params, self.decays, recipe)
        self.step = 0
        self.set_moments(
            {k: torch.zeros_like(p) for k, p in self.params.items()},
            {k: torch.zeros_like(p) for k, p in self.params.items()},
        )
        self.table = torch.from_numpy(normalization).to(self.device)
        self.channels = torch.arange(cfg.in_channels, device=self.device)
        self._ddp: DistributedDataParallel | None = None

    @property
    def trainer(self) -> torch.nn.Module:
        """The model under DDP when there are several ranks (wrapped at the first step: a Backend made
        only to evaluate never joins DDP's parameter broadcast)."""
        if self.world_size == 1:
            return self.model
        if self._ddp is None:
            # The buffers (a fixed position table) are constants: nothing to broadcast every step.
            self._ddp = DistributedDataParallel(self.model, forward_sync_buffers=False)
        return self._ddp

    def normalize(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> NCHW in the model dtype: datasets.normalize's float32 values, then cast."""
        pixels = torch.from_numpy(images).to(self.device, non_blocking=True).long()
        return self.table[pixels, self.channels].permute(0, 3, 1, 2).to(self.dtype)

    def logits(self, images: np.ndarray, model: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return (model or self.model)(self.normalize(images))

    def train_step(
        self, images: np.ndarray, labels: np.ndarray, lr: float, mix: MixedLabels | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on this rank's rows of the global batch (rows rank * n ... of it); the loss and
        count returned are the global batch's. With `mix` (Mixup/CutMix), the loss is
        mix.weight * CE(labels) + (1 - mix.weight) * CE(mix.partner_labels); top-1 counts `labels`."""
        self.model.train()
        targets = torch.from_numpy(labels).to(self.device)
        with CounterMasks(self.seed, self.step, first_example=self.rank * len(labels)):
            logits = self.logits(images, self.trainer)
        # At least float32: a bfloat16 log-softmax would lose the loss to rounding.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(logits, targets, label_smoothing=self.recipe.label_smoothing)
        if mix is not None:
            partners = torch.from_numpy(mix.partner_labels).to(self.device)
            partner_loss = F.cross_entropy(logits, partners, label_smoothing=self.recipe.label_smoothing)
            loss = mix.weight * loss + (1 - mix.weight) * partner_loss
        loss.backward()  # under DDP: the gradients averaged over the ranks
        self.apply_update({name: p.grad for name, p in self.params.items()}, lr)
        correct = (logits.argmax(-1) == targets).sum()
        if self.world_size == 1:
            return loss.detach(), correct
        sums = distributed.sum_over_ranks(torch.stack([loss.detach(), correct.to(loss.dtype)]))
        return sums[0] / self.world_size, sums[1]

    @torch.no_grad()
    def apply_update(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """vitspec.recipe.adamw_step on device: the clip factor without a host sync, then AdamW."""
        recipe = self.recipe
        self.step += 1
        if recipe.clip_norm is not None:
            norm = torch.sqrt(sum(torch.sum(g * g) for g in grads.values()))
            scale = clip_scale(norm, recipe.clip_norm, torch.where)
            for g in grads.values():
                g.mul_(scale)
        for name, p in self.params.items():
            # The fused kernel walks grad and param memory in step: a grad must share its param's strides.
            p.grad = grads[name].contiguous()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of the whole batch `images` (every rank passes all of it), computed sharded: the
        batch padded to a multiple of the ranks, each rank its share, gathered."""
        self.model.eval()
        n = len(images)
        share = -(-n // self.world_size)
        padded = np.concatenate([images, np.repeat(images[-1:], share * self.world_size - n, axis=0)])
        mine = self.logits(padded[self.rank * share : (self.rank + 1) * share]).float()
        return distributed.gather_rows(mine).cpu().numpy()[:n]

    def reference_params(self) -> dict[str, np.ndarray]:
        return to_reference(self.model.state_dict(), self.cfg)

    def moments(self, key: str) -> dict[str, torch.Tensor]:
        """The optimizer's 'exp_avg' (mu) or 'exp_avg_sq' (nu) by timm name."""
        return {name: self.optimizer.state[p][key] for name, p in self.params.items()}

    def set_moments(self, mu: Mapping[str, torch.Tensor], nu: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            # The fused kernel keeps the step count per tensor, as a float32 tensor beside it.
            step = torch.tensor(float(self.step), dtype=torch.float32, device=self.device)
            self.optimizer.state[p] = {"step": step, "exp_avg": mu[name], "exp_avg_sq": nu[name]}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        mu, nu = (to_reference(self.moments(key), self.cfg) for key in ("exp_avg", "exp_avg_sq"))
        return AdamState(self.step, mu, nu).to_arrays()

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        adam = AdamState.from_arrays(state)
        self.step = adam.step
        self.set_moments(
            *(
                {k: t.to(self.device, self.dtype) for k, t in from_reference(m, self.cfg).items()}
                for m in (adam.mu, adam.nu)
            )
        )


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def topology() -> tuple[int, int, int, Callable[[], None], Callable[[], None]]:
    """(rank, ranks, devices: one per rank, barrier, leave), after joining torchrun's process group."""
    distributed.init()
    ranks = distributed.world_size()
    return distributed.rank(), ranks, ranks, distributed.barrier, distributed.leave


if __name__ == "__main__":  # the training command with this backend; the app layer, entered from here
    import sys

    from vitspec.app.cli import run

    sys.exit(run("train", sys.argv[1:], "python -m backends.torch_vit.train", backend="torch"))
