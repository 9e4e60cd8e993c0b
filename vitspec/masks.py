"""Dropout and stochastic-depth keep-masks as a pure function of (seed, step, site, example, element).

Training draws every mask from this counter-based hash instead of a framework's generator, so a
mask depends on which example of the global batch it belongs to, never on how the batch is split
over devices or processes, nor on the framework: PyTorch (backends/torch_vit/masks.py) and JAX
(backends/flax_vit/masks.py) compute the same integer operations on the device, bit for bit this
NumPy definition (tests/test_data_parallel.py checks it).

    step key   absorb(seed low/high 32 bits, step low/high 32 bits), on the host
    site key   mix(step key ^ mix(site ^ SITE))         site: the draw's rank in the forward pass,
                                                        counting draws at a nonzero rate only
    example    mix(site key ^ mix(global index ^ EXAMPLE))
    element    mix(example key ^ mix(element ^ ELEMENT))  element: flat index inside one example's
                                                        mask (row-major over the mask's other axes)
    keep       element hash < round(keep * 2**32)

`mix` is a 32-bit integer finalizer (xorshift-multiply, constants from Chris Wellons' hash
prospector) whose multipliers are below 2**31, so a framework without unsigned 32-bit arithmetic
computes it exactly in int64 (a 32-bit value times a 31-bit one fits), masking to 32 bits after
each product. It is a bijection of 32-bit words, so distinct elements of one example never share
an input; hashing the element index before the xor keeps two examples' masks from being
XOR-shifted copies of each other.
"""

from __future__ import annotations

import numpy as np

WORD = 0xFFFFFFFF
MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
SHIFTS = (16, 15, 15)
# Distinct tags, so a site, an example and an element with the same small index hash apart.
SITE, EXAMPLE, ELEMENT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
START = 0x6A09E667


def mix(x):
    """The finalizer on a Python int or a uint64 NumPy array of 32-bit words."""
    x ^= x >> SHIFTS[0]
    x = (x * MULTIPLIERS[0]) & WORD
    x ^= x >> SHIFTS[1]
    x = (x * MULTIPLIERS[1]) & WORD
    x ^= x >> SHIFTS[2]
    return x


def step_key(seed: int, step: int) -> int:
    """The 32-bit key of one training step (0-based) of the run seeded `seed`."""
    if seed < 0 or step < 0 or seed >> 64 or step >> 64:
        raise ValueError(f"seed {seed} and step {step}: expected ints in [0, 2**64)")
    key = START
    for word in (seed & WORD, seed >> 32, step & WORD, step >> 32):
        key = mix(key ^ word)
    return key


def site_key(key: int, site: int) -> int:
    return mix(key ^ mix(site ^ SITE))


def keep_threshold(keep: float) -> int:
    """Hashes below this are kept: round(keep * 2**32), at most 2**32 - 1."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep probability {keep}: expected (0, 1]")
    return min(round(keep * 2.0**32), WORD)


def keep_mask(
    seed: int, step: int, site: int, examples: np.ndarray, shape: tuple[int, ...], keep: float
) -> np.ndarray:
    """bool [len(examples), *shape]: the keep-mask of draw `site` of step `step` for the examples of
    the global batch numbered `examples`."""
    key = np.uint64(site_key(step_key(seed, step), site))
    example = mix(key ^ mix(np.asarray(examples, np.uint64) ^ np.uint64(EXAMPLE)))
    element = mix(np.arange(int(np.prod(shape)), dtype=np.uint64) ^ np.uint64(ELEMENT))
    hashed = mix(example[:, None] ^ element[None, :])
    return (hashed < np.uint64(keep_threshold(keep))).reshape(len(example), *shape)
