"""The patch stream's random numbers: a counter-based hash, not a generator with state.

Every random number of patch i is u(seed, i, slot) = mix(mix(key(seed) ^ mix(i + G)) + (slot + 1) G),
with mix the SplitMix64 finaliser: a pure function of its inputs, vectorised in numpy. So patch i
is the same in every process, batch, worker and device, and no draw depends on another patch's.
The slot constants say which random number of a patch drives what (data/patch_params.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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
