"""One way to derive the seed of a random stream from the run's seed.

Every seeded draw that is not the run's own seed (an epoch's shuffle, a training step's
augmentations, DeepCluster's k-means) takes its seed from `derive_seed(seed, *keys)`, so two
streams of one run never share a seed by accident and a stream never depends on how many
draws came before it (which is what lets an interrupted run resume bit-identically).
"""

from __future__ import annotations

#: primes that weight the run's seed and up to three keys (epoch, step, purpose...)
_WEIGHTS = (1_000_003, 1, 7919, 104_729)


def derive_seed(seed: int, *keys: int) -> int:
    """seed * 1_000_003 + keys[0] + 7919 * keys[1] + 104_729 * keys[2] (a key left out counts 0).

    Examples: an epoch's shuffle `derive_seed(seed, epoch)`; a training step's draws
    `derive_seed(seed, 0, step)`; DeepCluster's k-means of an epoch `derive_seed(seed, 0, epoch, 2)`."""
    if len(keys) > len(_WEIGHTS) - 1:
        raise ValueError(f"derive_seed takes at most {len(_WEIGHTS) - 1} keys, got {len(keys)}")
    return sum(w * int(k) for w, k in zip(_WEIGHTS, (seed, *keys)))
