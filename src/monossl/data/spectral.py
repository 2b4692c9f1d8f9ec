"""Coloured noise with a power-law spectrum, a batch at a time: the "spectrum + colour" family of
Baradad et al., "Learning to See by Looking at Noise" (NeurIPS 2021).

Natural images' amplitude spectra fall off about as 1 / f^a with a near 1 (and vary from image to
image), which is most of what their second-order statistics are. Each sample here is such noise with
its own exponent and colours:

* three independent fields, each with amplitude |F(f)| = 1 / max(f, 1 / S)^a at spatial frequency f
  (cycles per pixel; the floor keeps the lowest frequency finite), no DC term, and a uniform random
  phase per Fourier coefficient (one of 4096 levels) (the inverse real FFT keeps the Hermitian part), each scaled
  to zero   mean and unit standard deviation over its S x S pixels;
* a drawn uniformly from [amin, amax] (default [0.5, 2.5], around natural images' 1 to 2: smaller is
  finer grain, larger is smoother blobs);
* colour statistics: the three fields are mixed by a random 3 x 3 matrix whose rows have unit length
  (random correlations between the channels), then channel c is scaled to a standard deviation drawn
  from [0.08, 0.3] and shifted to a mean drawn from [0.2, 0.8]; values outside [0, 1] are clamped.

Randomness: the per-sample numbers (exponent, colours) come from the sample's counter-based key
(data/counter_rng.py) in numpy; the phases from the same hash in torch, one per coefficient, so sample
i is the same in every batch and process.
"""

from __future__ import annotations

import numpy as np
import torch

from monossl.data.counter_rng import (
    counter_offsets,
    key_uniforms,
    torch_bits,
    torch_keys,
)

DEFAULT_EXPONENTS = (0.5, 2.5)
STD_RANGE = (0.08, 0.3)
MEAN_RANGE = (0.2, 0.8)
SLOT_EXPONENT, SLOT_MIX, SLOT_STD, SLOT_MEAN = 0, 1, 10, 13  # sample slots: mix 1..9, std 10..12, mean 13..15
PHASE_COUNTER_BASE = 1 << 20  # phases use counters from here on: clear of the slots above
PHASE_BITS, PHASES_PER_HASH = 12, 5  # 4096 phase levels (a step of 0.09 degrees); 60 of a hash's 64 bits


def amplitude(size: int, exponent: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S // 2 + 1) amplitudes 1 / max(f, 1 / S)^a of the real FFT's coefficients, DC zero."""
    dev = exponent.device
    fy = torch.fft.fftfreq(size, device=dev).view(-1, 1)
    fx = torch.fft.rfftfreq(size, device=dev).view(1, -1)
    f = torch.sqrt(fx * fx + fy * fy).clamp_min(1.0 / size)
    amp = torch.exp(-exponent.view(-1, 1, 1, 1) * torch.log(f))
    amp[..., 0, 0] = 0.0
    return amp


def colour_statistics(sample_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: the mixing matrix (B, 3, 3) with unit rows, the channels' standard deviations (B, 3)
    and means (B, 3), float64."""
    u = key_uniforms(sample_keys, range(SLOT_MIX, SLOT_MEAN + 3))
    mix = 2 * u[:, :9].reshape(-1, 3, 3) - 1
    mix /= np.maximum(np.linalg.norm(mix, axis=2, keepdims=True), 1e-12)
    std = STD_RANGE[0] + (STD_RANGE[1] - STD_RANGE[0]) * u[:, 9:12]
    mean = MEAN_RANGE[0] + (MEAN_RANGE[1] - MEAN_RANGE[0]) * u[:, 12:15]
    return mix, std, mean


class SpectralNoise:
    """Renders samples of one size on one device; holds what every batch shares (the coefficients'
    counters)."""

    def __init__(self, size: int, exponents: tuple[float, float] = DEFAULT_EXPONENTS,
                 device: torch.device | str = "cpu"):
        self.size, self.exponents, self.device = int(size), tuple(float(a) for a in exponents), torch.device(device)
        self._count = 3 * self.size * (self.size // 2 + 1)  # coefficients per sample
        # one 64-bit hash gives PHASES_PER_HASH phases of PHASE_BITS bits each: hashing and cos/sin were
        # most of the time, so phases are looked up in a table of e^(i 2 pi k / 2^PHASE_BITS)
        hashes = -(-self._count // PHASES_PER_HASH)
        counters = torch.arange(hashes, device=self.device, dtype=torch.int64) + PHASE_COUNTER_BASE
        self._offsets = counter_offsets(counters).view(1, -1)
        angle = torch.arange(1 << PHASE_BITS, device=self.device, dtype=torch.float64) * (2 * np.pi / (1 << PHASE_BITS))
        self._unit_circle = torch.stack([torch.cos(angle), torch.sin(angle)], 1).float().contiguous()

    def render(self, sample_keys: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) float32 in [0, 1], one sample per key."""
        n, S, dev = len(sample_keys), self.size, self.device
        if n == 0:
            return torch.empty(0, 3, S, S, device=dev)
        low, high = self.exponents
        exponent = low + (high - low) * key_uniforms(sample_keys, [SLOT_EXPONENT])[:, 0]
        amp = amplitude(S, torch.from_numpy(exponent.astype(np.float32)).to(dev))
        bits = torch_bits(torch_keys(sample_keys, dev).view(n, 1), self._offsets)
        mask = (1 << PHASE_BITS) - 1
        phase = torch.cat([(bits >> (PHASE_BITS * j)) & mask for j in range(PHASES_PER_HASH)], dim=1)
        rotation = torch.index_select(self._unit_circle, 0, phase[:, :self._count].reshape(-1))
        spectrum = torch.view_as_complex(rotation).view(n, 3, S, S // 2 + 1) * amp
        fields = torch.fft.irfft2(spectrum, s=(S, S)).view(n, 3, S * S)
        mixing, std, means = colour_statistics(sample_keys)
        # unit-variance fields, mixed, scaled and shifted in one batched multiply-add: field j's
        # 1 / std folds into column j of the mixing matrix
        mix = torch.from_numpy((mixing * std[:, :, None]).astype(np.float32)).to(dev)
        # the fields have zero mean (no DC term), so their standard deviation is their RMS
        rms = torch.linalg.vector_norm(fields, dim=2) / S
        mix = mix / rms.clamp_min(1e-12).view(n, 1, 3)
        mean = torch.from_numpy(means.astype(np.float32)).to(dev).view(n, 3, 1)
        image = torch.baddbmm(mean, mix, fields).view(n, 3, S, S)
        return image.clamp_(0.0, 1.0)
