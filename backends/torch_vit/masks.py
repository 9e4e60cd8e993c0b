"""Training's dropout and stochastic-depth masks in PyTorch, from `vitspec.masks`' counter hash.

`CounterMasks(seed, step, first_example)` is a TorchFunctionMode: while it is active, the model's
three kinds of draw take their keep-masks from the hash of (seed, step, site, global example,
element) instead of torch's generator:

    F.dropout (nn.Dropout)                     where(mask, x / keep, 0), mask over all of x's axes
    Tensor.bernoulli_ (DropPath's [n, 1, 1])   filled with the mask as 0/1
    F.scaled_dot_product_attention, dropout_p  softmax((q / sqrt(dh)) k^T), masked, then @ v

The draws are intercepted where torch makes them, so the model files keep torch's own idiom, and
a rank holding examples [first_example, first_example + n) of the global batch draws exactly
their masks: the same as one process holding the whole batch, and the same as the JAX backend.
Int64 arithmetic, masked to 32 bits after each product (see vitspec.masks), on the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vitspec import masks

WORD = masks.WORD


def mix(x: torch.Tensor) -> torch.Tensor:
    """vitspec.masks.mix on an int64 tensor of 32-bit words, in place (x is returned): one scratch
    tensor instead of one per operation (the draws are memory-bound)."""
    shifted = x >> masks.SHIFTS[0]
    x ^= shifted
    x.mul_(masks.MULTIPLIERS[0]).bitwise_and_(WORD)
    x ^= torch.bitwise_right_shift(x, masks.SHIFTS[1], out=shifted)
    x.mul_(masks.MULTIPLIERS[1]).bitwise_and_(WORD)
    x ^= torch.bitwise_right_shift(x, masks.SHIFTS[2], out=shifted)
    return x


@functools.lru_cache(maxsize=64)
def element_hashes(size: int, device: torch.device) -> torch.Tensor:
    """mix(element ^ ELEMENT) for elements 0..size-1: the same at every step, so computed once."""
    return mix(torch.arange(size, dtype=torch.int64, device=device) ^ masks.ELEMENT)


class CounterMasks(TorchFunctionMode):
    """Within `with CounterMasks(seed, step, first_example):` the forward pass draws vitspec.masks'
    masks; `sites` counts the draws made (at nonzero rates)."""

    def __init__(self, seed: int, step: int, first_example: int = 0):
        super().__init__()
        self.key = masks.step_key(seed, step)
        self.first_example = first_example
        self.sites = 0

    def keep_mask(self, shape: torch.Size, keep: float, device: torch.device) -> torch.Tensor:
        """bool `shape` ([examples, ...]): the next site's mask for this rank's examples."""
        key = masks.site_key(self.key, self.sites)
        self.sites += 1
        n, size = shape[0], shape[1:].numel()
        index = torch.arange(self.first_example, self.first_example + n, dtype=torch.int64, device=device)
        example = mix(mix(index ^ masks.EXAMPLE) ^ key)
        hashed = mix(example[:, None] ^ element_hashes(size, device)[None, :])
        return (hashed < masks.keep_threshold(keep)).reshape(shape)

    def dropout(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        keep = 1.0 - rate
        return torch.where(self.keep_mask(x.shape, keep, x.device), x / keep, torch.zeros_like(x))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout_call(*args, **kwargs)
        if func is torch.Tensor.bernoulli_:
            return self._bernoulli_call(*args, **kwargs)
        if func is F.scaled_dot_product_attention and _dropout_p(args, kwargs) > 0:
            return self._attention_call(*args, **kwargs)
        return func(*args, **kwargs)

    def _dropout_call(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        return self.dropout(x, p)

    def _bernoulli_call(self, mask, p=0.5, *, generator=None):
        if not isinstance(p, float):
            raise NotImplementedError("CounterMasks: bernoulli_ with a tensor of probabilities")
        return mask.copy_(self.keep_mask(mask.shape, p, mask.device))

    def _attention_call(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or kwargs:
            raise NotImplementedError("CounterMasks: attention dropout with a mask or other options")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        probs = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        return self.dropout(probs, dropout_p) @ v


def _dropout_p(args, kwargs) -> float:
    return kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
