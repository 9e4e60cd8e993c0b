"""`vitspec attention CKPT IMAGE... --out DIR`: where a model looks, as pictures.

For each image it writes DIR/<image name>.attention.png: the input, its attention rollout
(Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), and the last block's
attention of the class token (or of the MAP head's probe) in each head, each upsampled onto the
image. The maps are the reference's attention probabilities (`attn_{i}`, `map_attn`), computed by
the backend asked for; every backend gives the same maps.

Rollout: each block's map averaged over heads, mixed with the identity for the residual stream
(0.5 A + 0.5 I, rows renormalized), multiplied from the first block to the last; the row read out is
the class token's, else the MAP probe's attention through the rollout, else (average pooling) the
mean over patch rows. A CaiT's are its class token's attention in the last class-attention block
(what its paper shows). Images are resized to the model's size (bilinear) and normalized with
--mean/--std (default: the dataset's statistics with --dataset, else 0.5/0.5 as big_vision).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

import vitspec
from vitspec.app import datasets
from vitspec.app.training.config import DATASETS
from vitspec.config import ViTConfig

BACKENDS = ("numpy", "torch", "flax")


def read_image(path: Path, cfg: ViTConfig) -> np.ndarray:
    """uint8 [H, W, C] at the model's size and channels (PIL: any format it reads)."""
    from PIL import Image

    try:
        image = Image.open(path)
        image = image.convert("L" if cfg.in_channels == 1 else "RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if cfg.in_channels not in (1, 3):
        raise ValueError(
            f"the model takes {cfg.in_channels}-channel images; only 1 (grey) or 3 (RGB) can be read"
        )
    height, width = cfg.image_size
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    return pixels.reshape(height, width, cfg.in_channels)


def attention_maps(backend: str, cfg: ViTConfig, params: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's attention maps (attn_{i}, map_attn) of float32 NHWC images, by `backend`."""
    if backend == "numpy":
        return vitspec.forward(cfg, params, images, attention_maps=True)
    if backend == "torch":
        import torch

        from backends.torch_vit import from_reference, model_for

        model = model_for(cfg).eval()
        model.load_state_dict(from_reference({k: v.astype(np.float32) for k, v in params.items()}, cfg))
        with torch.no_grad():
            maps = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), attention_maps=True)
        return {k: v.numpy() for k, v in maps.items()}
    if backend == "flax":
        from backends.flax_vit import from_reference, module_for

        variables = from_reference({k: v.astype(np.float32) for k, v in params.items()}, cfg)
        maps = module_for(cfg).apply(variables, images, attention_maps=True)
        return {k: np.asarray(v) for k, v in maps.items()}
    raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def rollout(cfg: ViTConfig, maps: dict[str, np.ndarray]) -> np.ndarray:
    """Attention rollout onto the patch grid: [n, grid_h, grid_w], each map summing to 1."""
    if cfg.class_attention_depth:
        # CaiT: the class token's attention in the last class-attention block, as its paper shows
        # (the talking-heads weights of the patch blocks are no distribution to roll out).
        weights = last_block_heads(cfg, maps).mean(axis=1)
        return weights / weights.sum(axis=(-2, -1), keepdims=True)
    n, _, tokens, _ = maps["attn_0"].shape
    flow = np.broadcast_to(np.eye(tokens), (n, tokens, tokens))
    for i in range(cfg.depth):
        mixed = 0.5 * maps[f"attn_{i}"].mean(axis=1) + 0.5 * np.eye(tokens)
        flow = (mixed / mixed.sum(axis=-1, keepdims=True)) @ flow
    prefix = cfg.num_prefix_tokens
    if cfg.class_token and cfg.pool != "map":
        weights = flow[:, 0, prefix:]
    elif cfg.pool == "map":  # the probe attends to the patch tokens' outputs
        weights = np.einsum("np,npq->nq", maps["map_attn"].mean(axis=1)[:, 0], flow[:, prefix:, prefix:])
    else:
        weights = flow[:, prefix:, prefix:].mean(axis=1)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.reshape(n, *cfg.grid_size)


def last_block_heads(cfg: ViTConfig, maps: dict[str, np.ndarray]) -> np.ndarray:
    """The last block's attention per head onto the patch grid: [n, heads, grid_h, grid_w] (CaiT's
    last class-attention block)."""
    prefix = cfg.num_prefix_tokens
    if cfg.class_attention_depth:
        weights = maps[f"class_attn_{cfg.class_attention_depth - 1}"][:, :, 0, 1:]
    elif cfg.pool == "map":
        weights = maps["map_attn"][:, :, 0]
    elif cfg.class_token:
        weights = maps[f"attn_{cfg.depth - 1}"][:, :, 0, prefix:]
    else:
        weights = maps[f"attn_{cfg.depth - 1}"][:, :, prefix:, prefix:].mean(axis=2)
    return weights.reshape(*weights.shape[:2], *cfg.grid_size)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [gh, gw] map stretched to [H, W] pixels (bilinear between patch centres)."""
    return ndimage.zoom(
        grid, (size[0] / grid.shape[0], size[1] / grid.shape[1]), order=1, mode="nearest", grid_mode=True
    )


def draw(path: Path, image: np.ndarray, flow: np.ndarray, heads: np.ndarray, title: str) -> None:
    """One PNG: the image, its rollout, then each head of the last block, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("input", None), ("rollout", flow)] + [(f"head {h}", heads[h]) for h in range(len(heads))]
    columns = min(len(panels), 6)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    shown = image[..., 0] if image.shape[-1] == 1 else image
    for axis, (name, grid) in zip(axes.flat, panels, strict=True):
        axis.imshow(shown, cmap="gray" if image.shape[-1] == 1 else None)
        if grid is not None:
            axis.imshow(upsample(grid, image.shape[:2]), cmap="inferno", alpha=0.6)
        axis.set_title(name, fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(
    argv: Sequence[str] | None = None, prog: str = "vitspec attention"
) -> dict[str, dict[str, np.ndarray]]:
    """Writes the pictures; returns {image name: {'rollout': ..., 'heads': ...}} (the tests compare them)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", type=Path, help="a reference checkpoint (.safetensors or .npz)")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, anything PIL reads)")
    parser.add_argument("--out", type=Path, required=True, help="where the PNGs go")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help="normalize with this dataset's channel statistics",
    )
    parser.add_argument("--mean", type=float, nargs="+", default=None, help="per channel, in [0, 1] units")
    parser.add_argument("--std", type=float, nargs="+", default=None, help="per channel, in [0, 1] units")
    args = parser.parse_args(argv)
    cfg, params = vitspec.load(args.checkpoint)
    mean, std = _normalization(args, cfg)
    pixels = np.stack([read_image(path, cfg) for path in args.images])
    images = datasets.normalize(pixels, mean, std).astype(np.float32)
    maps = attention_maps(args.backend, cfg, {k: v.astype(np.float32) for k, v in params.items()}, images)
    flows, heads = rollout(cfg, maps), last_block_heads(cfg, maps)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path, image, flow, head in zip(args.images, pixels, flows, heads, strict=True):
        target = args.out / f"{path.stem}.attention.png"
        draw(target, image, flow, head, f"{path.name}: {args.checkpoint.name} ({args.backend})")
        print(target)
        results[path.name] = {"rollout": flow, "heads": head}
    return results


def _normalization(args: argparse.Namespace, cfg: ViTConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = cfg.in_channels
    if args.dataset:
        stats = datasets.STATS[DATASETS[args.dataset]]
        mean, std = stats.mean, stats.std
    else:
        mean, std = (0.5,) * channels, (0.5,) * channels
    mean, std = tuple(args.mean or mean), tuple(args.std or std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"--mean/--std need {channels} value(s) for this model, got {len(mean)} and {len(std)}"
        )
    return mean, std
