"""Look at a model of the spec and check the reference's gradients.

vitspec summary B/16 [--time]      parameter table, counts, forward time
vitspec gradcheck [--examples N]   analytic gradients vs finite differences
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import vitspec
from vitspec.config import ViTConfig
from vitspec.gradcheck import REL_BOUND, fd_errors, random_images, random_params, random_small_config


def summary(cfg: ViTConfig, time_forward: bool, batch: int, repeats: int) -> None:
    shapes = vitspec.param_shapes(cfg)
    width = max(map(len, shapes))
    print(cfg)
    print(f"\n{'parameter':<{width}}  {'shape':<20}  {'count':>12}")
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {str(shape):<20}  {int(np.prod(shape)):>12,}")
    print(f"{'total':<{width}}  {'':<20}  {vitspec.num_params(cfg):>12,}")
    print(
        f"\ntokens {cfg.num_tokens} (prefix {cfg.num_prefix_tokens} + patches "
        f"{cfg.grid_size[0]}x{cfg.grid_size[1]})"
    )
    if time_forward:
        params = vitspec.init_params(cfg, seed=0)
        images = (
            np.random.default_rng(0)
            .standard_normal((batch, *cfg.image_size, cfg.in_channels))
            .astype(np.float32)
        )
        vitspec.forward(cfg, params, images)  # warm-up: first-touch of the weights
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            vitspec.forward(cfg, params, images)
            times.append(time.perf_counter() - start)
        print(
            f"float32 forward, batch {batch}: median {np.median(times):.3f} s, "
            f"min {min(times):.3f} s, max {max(times):.3f} s over {repeats} runs"
        )


def gradcheck(examples: int, seed: int) -> bool:
    """Finite differences on `examples` random small configs with every knob varied."""
    rng = np.random.default_rng(seed)
    worst_overall = 0.0
    for i in range(examples):
        cfg = random_small_config(rng)
        params = random_params(cfg, seed + i)
        images = random_images(cfg, 2, seed + i)
        labels = rng.integers(0, cfg.num_classes, size=2)
        _, grads = vitspec.loss_and_grad(cfg, params, images, labels, label_smoothing=0.1)
        errors = fd_errors(
            lambda p, x, cfg=cfg, labels=labels: vitspec.cross_entropy(
                vitspec.forward(cfg, p, x), labels, 0.1
            ),
            params,
            images,
            grads,
            rng,
        )
        name = max(errors, key=errors.get)
        worst_overall = max(worst_overall, errors[name])
        knobs = (
            f"pool={cfg.pool} posemb={cfg.posemb} on_cls={cfg.posemb_on_cls} cls={cfg.class_token} "
            f"reg={cfg.num_registers} qk_norm={cfg.qk_norm} ls={cfg.layer_scale} fc_norm={cfg.fc_norm} "
            f"rep={cfg.representation_size} gelu={cfg.gelu}"
        )
        knobs += (
            f" pre_norm={cfg.pre_norm} patch_bias={cfg.patch_bias} final_norm={cfg.final_norm} "
            f"proj_bias={cfg.proj_bias} include_prefix={cfg.pool_include_prefix} distilled={cfg.distilled} "
            f"attention_dim={cfg.attention_dim}"
        )
        if cfg.class_attention_depth:
            knobs += f" cait: talking={cfg.talking_heads} class_blocks={cfg.class_attention_depth}"
        print(f"[{i + 1}/{examples}] {len(errors)} tensors, worst {name}: {errors[name]:.2e}   {knobs}")
    ok = worst_overall <= REL_BOUND
    print(f"\nmax relative error {worst_overall:.2e} (bound {REL_BOUND:g}): {'OK' if ok else 'FAILED'}")
    return ok


def summary_main(argv: list[str] | None = None, prog: str = "vitspec summary") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="parameter table of a variant or preset")
    parser.add_argument("variant", help="e.g. B/16, Ti/4, cifar-notebook")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--time", action="store_true", help="time the float32 NumPy forward")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    overrides = {
        k: v for k, v in (("num_classes", args.num_classes), ("image_size", args.image_size)) if v is not None
    }
    try:
        cfg = vitspec.variant(args.variant, **overrides)
    except ValueError as e:
        parser.error(str(e))
    summary(cfg, args.time, args.batch, args.repeats)
    return 0


def gradcheck_main(argv: list[str] | None = None, prog: str = "vitspec gradcheck") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="analytic gradients vs finite differences, float64"
    )
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return 0 if gradcheck(args.examples, args.seed) else 1
