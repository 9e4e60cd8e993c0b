"""The PyTorch implementations on a GPU, all in bfloat16 autocast with float32 parameters (the
training backend's precision there): ours eager, ours torch.compile'd, ours with SDPA held to each of
its GPU kernels, and the peers (HF ViTForImageClassification, the per-head notebook ViT) eager with
torch's fused AdamW. A forward returns the logits on the host, as an evaluation does; a training step
returns its loss without waiting for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from backends.torch_vit.train import TorchBackend
from bench.accelerator import DeviceRunner, Placement, synchronizer
from bench.peers.torch_notebook import NotebookViT
from bench.runners import LEARNING_RATE, float_batch, make_backend, random_batch
from bench.torch_impls import hf_vit
from vitspec.config import ViTConfig

# The kernels SDPA can be held to; left alone, it takes the first of its priority list that accepts
# the inputs (which one is read back from the profile: attention_kernels).
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
SDPA_OP = "aten::_scaled_dot_product_"  # the private ATen op each SDPA kernel dispatches to
NO_SDPA = "no SDPA: explicit matmul + softmax"


def ours(
    cfg: ViTConfig, batch: int, placement: Placement, compiled: bool = False, kernel: str | None = None
) -> DeviceRunner:
    backend = make_backend(TorchBackend, cfg, placement.precision, device=placement.device)
    if compiled:
        backend.model.compile(backend=placement.compile_backend)
    images, labels = random_batch(cfg, batch)
    held = contextlib.nullcontext if kernel is None else partial(sdpa_kernel, SDPA_KERNELS[kernel])

    def forward():
        with held():
            return backend.eval_logits(images)

    def train_step():
        with held():
            return backend.train_step(images, labels, LEARNING_RATE)[0]

    runner = DeviceRunner(forward, train_step)
    runner.attention = partial(attention_kernels, runner, placement)
    return runner


def huggingface(cfg: ViTConfig, batch: int, placement: Placement) -> DeviceRunner:
    return _module_runner(*hf_vit(cfg), cfg, batch, placement)


def notebook(cfg: ViTConfig, batch: int, placement: Placement) -> DeviceRunner:
    model = NotebookViT(cfg)
    return _module_runner(model, model, cfg, batch, placement)


def _module_runner(
    model: torch.nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    cfg: ViTConfig,
    batch: int,
    placement: Placement,
) -> DeviceRunner:
    """Forward under no_grad in eval mode; training: cross-entropy in float32, backward, fused AdamW.
    The images are on the device already, as float32 (the normalization ours does there is left out)."""
    device = torch.device(placement.device)
    model.to(device)
    images, labels = random_batch(cfg, batch)
    x = torch.from_numpy(float_batch(images)).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(labels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.05, fused=True)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=placement.precision == "bf16")

    @torch.no_grad()
    def forward():
        model.eval()
        with autocast():
            return logits_of(x).float().cpu().numpy()

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = logits_of(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return loss.detach()

    runner = DeviceRunner(forward, train_step)
    runner.attention = partial(attention_kernels, runner, placement)
    return runner


def attention_kernels(runner: DeviceRunner, placement: Placement) -> dict[str, str]:
    """The SDPA kernels one forward and one training step dispatched to, from torch's profiler (it
    records the ATen op SDPA chose: _scaled_dot_product_flash_attention, ..._cudnn_attention, ...)."""
    synchronize = synchronizer("torch", placement)
    found = {}
    for mode, call in {"forward": runner.forward, "train": runner.train_step}.items():
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            synchronize(call())
        ops = {
            event.key.removeprefix(SDPA_OP)
            for event in recorded.key_averages()
            if event.key.startswith(SDPA_OP) and not event.key.endswith("_backward")
        }
        found[mode] = ", ".join(sorted(ops)) or NO_SDPA
    return found


# (implementation, variant) -> build(cfg, batch, placement). The variants of ours are each a row beside
# the peers, each with its own ratio to the fastest peer.
IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., DeviceRunner]] = {
    ("ours", "eager"): ours,
    ("ours", "torch.compile"): partial(ours, compiled=True),
    **{("ours", f"eager, sdpa_kernel {name}"): partial(ours, kernel=name) for name in SDPA_KERNELS},
    ("hf-transformers", "eager"): huggingface,
    ("notebook-per-head", "eager"): notebook,
}
