"""The patch stream's random numbers: a counter-based hash, not a generator with state.

Every random number of patch i is u(seed, i, slot) = mix(mix(key(seed) ^ mix(i + G)) + (slot + 1) G),
with mix the SplitMix64 finaliser: a pure function of its inputs, vectorised in numpy. So patch i
is the same in every process, batch, worker and device, and no draw depends on another patch's.
The slot constants say which random number of a patch drives what (data/patch_params.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Slots (which random number of a patch drives what).
SLOT_SOURCE, SLOT_JITTER, SLOT_BRIGHT, SLOT_CONTRAST, SLOT_SAT, SLOT_HUE = 0, 1, 2, 3, 4, 5
SLOT_HFLIP, SLOT_VFLIP, SLOT_ANGLE, SLOT_SHEAR = 6, 7, 8, 9
SLOT_CROP_X, SLOT_CROP_Y, SLOT_POS_X, SLOT_POS_Y = 10, 11, 12, 13
SLOT_ATTEMPTS = 14  # attempt k uses slots 14 + 2k (area) and 15 + 2k (aspect)


def mix(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser of uint64 values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def patch_keys(seed: int, indices: np.ndarray) -> np.ndarray:
    """One uint64 key per patch index: everything random about patch i derives from it."""
    with np.errstate(over="ignore"):
        key = mix(np.array([seed], dtype=np.uint64) * _G + np.uint64(0x632BE59BD9B4E019))
        return mix(key ^ mix(indices.astype(np.uint64) + _G))


def key_uniforms(keys: np.ndarray, slots: npt.ArrayLike) -> np.ndarray:
    """(len(keys), len(slots)) float64 uniforms in [0, 1), 53 random bits each."""
    slots = np.asarray(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = mix(keys[:, None] + (slots[None, :] + np.uint64(1)) * _G)
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def uniforms(seed: int, indices: npt.ArrayLike, slots: npt.ArrayLike) -> np.ndarray:
    """The raw random numbers of patches `indices` (for tests and tools)."""
    return key_uniforms(patch_keys(int(seed), np.asarray(indices, dtype=np.int64)), slots)


# ---------------------------------------------------------------------------- the same hash in torch
# The procedural sources (data/fractals.py, data/spectral.py) need far more random numbers per sample
# than a patch (one per walker step, one per Fourier coefficient), so they draw them where the pixels
# are made: the same SplitMix64 finaliser on int64 tensors, whose multiplication wraps like uint64's
# (two's complement) and whose right shifts are made logical by a mask.

def _signed(value: np.uint64) -> int:
    return int(value) - (1 << 64) if int(value) >= 1 << 63 else int(value)


_G_SIGNED, _M1_SIGNED, _M2_SIGNED = _signed(_G), _signed(_M1), _signed(_M2)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def torch_keys(keys: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The uint64 keys of `patch_keys` as an int64 tensor with the same bits."""
    return torch.from_numpy(keys.astype(np.uint64).view(np.int64).copy()).to(device)


def counter_offsets(counters: torch.Tensor) -> torch.Tensor:
    """(counter + 1) G for int64 counters: the part of `torch_bits`' input that does not depend on the key,
    so a caller drawing the same counters for every batch computes it once."""
    return (counters + 1) * _G_SIGNED


def torch_bits(keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) per (key, counter): mix(key + (counter + 1) G), broadcast over the shapes of
    `keys` and `offsets` (from `counter_offsets`); the same bits as `key_uniforms` hashes."""
    z = keys + offsets
    z = (z ^ _shift_right(z, 30)) * _M1_SIGNED
    z = (z ^ _shift_right(z, 27)) * _M2_SIGNED
    return z ^ _shift_right(z, 31)


def bits_to_unit(bits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniforms in [0, 1) from the top 24 bits (float32's mantissa) of random bits."""
    return _shift_right(bits, 40).to(dtype or torch.float32) * (2.0 ** -24)
