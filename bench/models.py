"""The benchmarked models: config, batch and repeat counts, for the full run and for --quick, on the
CPU and on a GPU."""

from __future__ import annotations

import dataclasses

import vitspec
from vitspec.config import ViTConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    batch: int
    repeats: int
    warmup: int
    reference_batch: int  # the NumPy forward's batch: it is ~10x slower, images/s is per image anyway
    reference_repeats: int
    calls: int = 1  # calls a timed turn makes: on a GPU, enough steps that one wait ends many

    @property
    def config(self) -> ViTConfig:
        return QUICK_CONFIGS[self.name] if self.name in QUICK_CONFIGS else vitspec.variant(self.name)

    @property
    def is_cait(self) -> bool:
        return bool(self.config.class_attention_depth)


# --quick: small enough that every implementation (and every jit compile) runs in seconds.
TINY = vitspec.ViTConfig(
    image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=10
)
# TINY's sizes with the released CaiTs' knobs (talking heads, two class-attention blocks, LayerScale).
CAIT_TINY = TINY.replace(
    talking_heads=True,
    class_attention_depth=2,
    posemb_on_cls=False,
    layer_scale=1e-5,
    drop_path_schedule="constant",
)
QUICK_CONFIGS = {"tiny": TINY, "cait-tiny": CAIT_TINY}

# Fewer repeats for the 224 models: one B/16 training step at batch 8 takes seconds on 2 cores.
FULL = {
    "cifar-notebook": ModelSpec(
        "cifar-notebook", batch=128, repeats=5, warmup=2, reference_batch=32, reference_repeats=3
    ),
    "S/16": ModelSpec("S/16", batch=16, repeats=5, warmup=1, reference_batch=4, reference_repeats=2),
    "B/16": ModelSpec("B/16", batch=8, repeats=5, warmup=1, reference_batch=2, reference_repeats=1),
    # CaiT-XXS-24: 2.5 GMACs a 224 image (S/16: 4.6), in 24 narrow blocks; measured by ours only.
    "cait-xxs24-224": ModelSpec(
        "cait-xxs24-224", batch=16, repeats=5, warmup=1, reference_batch=4, reference_repeats=2
    ),
}
QUICK = {
    "tiny": ModelSpec("tiny", batch=2, repeats=2, warmup=1, reference_batch=2, reference_repeats=1),
    "cait-tiny": ModelSpec("cait-tiny", batch=2, repeats=2, warmup=1, reference_batch=2, reference_repeats=1),
}


# On a GPU: batches that fill it (the NumPy reference does not run there), and turns of ~0.1 s.
GPU = {
    "cifar-notebook": ModelSpec(
        "cifar-notebook", batch=256, repeats=8, warmup=3, reference_batch=0, reference_repeats=0, calls=20
    ),
    "S/16": ModelSpec(
        "S/16", batch=128, repeats=8, warmup=3, reference_batch=0, reference_repeats=0, calls=10
    ),
    "B/16": ModelSpec("B/16", batch=64, repeats=8, warmup=3, reference_batch=0, reference_repeats=0, calls=5),
}
GPU_QUICK = {
    "tiny": ModelSpec("tiny", batch=2, repeats=2, warmup=1, reference_batch=0, reference_repeats=0, calls=2),
}
TABLES = {("cpu", False): FULL, ("cpu", True): QUICK, ("gpu", False): GPU, ("gpu", True): GPU_QUICK}


def specs(names: list[str] | None, quick: bool, device: str = "cpu") -> list[ModelSpec]:
    table = TABLES[device, quick]
    unknown = set(names or ()) - set(table)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}: expected some of {list(table)}")
    return [table[name] for name in (names or table)]
