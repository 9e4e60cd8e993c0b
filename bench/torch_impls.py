"""The PyTorch implementations: ours (backends.torch_vit's training Backend), Hugging Face
ViTForImageClassification (SDPA attention) and the per-head notebook ViT."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from backends.torch_vit.train import TorchBackend
from bench.peers.torch_notebook import NotebookViT
from bench.runners import LEARNING_RATE, Runner, backend_runner, float_batch, random_batch
from vitspec.config import ViTConfig


def ours(cfg: ViTConfig, batch: int) -> Runner:
    return backend_runner(TorchBackend, cfg, batch)


def huggingface(cfg: ViTConfig, batch: int) -> Runner:
    model, logits_of = hf_vit(cfg)
    return _module_runner(model, logits_of, cfg, batch)


def hf_vit(cfg: ViTConfig) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """ViTForImageClassification with the config's sizes (SDPA attention), and its logits function."""
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf_cfg = HFConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_channels,
        num_labels=cfg.num_classes,
        layer_norm_eps=cfg.ln_eps,
        hidden_act="gelu",
        attn_implementation="sdpa",
    )
    model = ViTForImageClassification(hf_cfg)
    return model, lambda x: model(pixel_values=x).logits


def notebook(cfg: ViTConfig, batch: int) -> Runner:
    model = NotebookViT(cfg)
    return _module_runner(model, model, cfg, batch)


def _module_runner(model: torch.nn.Module, logits_of, cfg: ViTConfig, batch: int) -> Runner:
    """Forward under no_grad in eval mode; training: cross-entropy, backward, torch.optim.AdamW."""
    images, labels = random_batch(cfg, batch)
    x = torch.from_numpy(float_batch(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.05)

    @torch.no_grad()
    def forward():
        model.eval()
        return logits_of(x).numpy()

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return Runner(forward, train_step)


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


IMPLEMENTATIONS = {"ours": ours, "hf-transformers": huggingface, "notebook-per-head": notebook}
