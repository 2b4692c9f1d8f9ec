"""Normalised mutual information of two labelings: how much DeepCluster's clusters change between epochs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Normalised mutual information of two labelings, I(a;b) / mean(H(a), H(b)).

    The arithmetic-mean normalisation of scikit-learn's default; 1.0 for identical
    partitions (up to renaming), 0.0 for independent ones. Two single-cluster labelings
    count as identical (1.0).
    """
    from scipy.sparse import coo_matrix

    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError("nmi: the labelings have different lengths")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n = a.size
    joint = coo_matrix((np.ones(n), (ai, bi)), shape=(ai.max() + 1, bi.max() + 1)).tocsr()
    joint.sum_duplicates()
    ha, hb = _entropy(np.bincount(ai)), _entropy(np.bincount(bi))
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    pa, pb = np.bincount(ai) / n, np.bincount(bi) / n
    rows, cols = joint.nonzero()
    pij = np.asarray(joint[rows, cols]).ravel() / n
    mi = float((pij * (np.log(pij) - np.log(pa[rows]) - np.log(pb[cols]))).sum())
    return max(0.0, min(1.0, mi / ((ha + hb) / 2)))
