"""PCA whitening, fitted in float64: DeepCluster's feature preprocessing before k-means."""

from __future__ import annotations

import torch


class PCAWhitening:
    """PCA to `dim` dimensions with whitening: y = ((x - mean) @ V) / sqrt(max(lambda, floor)).

    Fitted in float64 (eigh of the covariance); `floor` = eig_floor * largest eigenvalue
    keeps near-null directions (dead units, fewer samples than dimensions) from being
    blown up into noise. On the data it was fitted on, the output covariance is the
    identity in every direction whose eigenvalue is above the floor.
    """

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor, eigenvalues: torch.Tensor):
        self.mean = mean  # (D,) float32
        self.projection = projection  # (D, dim) float32, whitening folded in
        self.eigenvalues = eigenvalues  # (dim,) float64, before flooring

    @classmethod
    def fit(cls, x: torch.Tensor, dim: int, eig_floor: float = 1e-5, chunk: int = 8192) -> PCAWhitening:
        n, d = x.shape
        if n < 2:
            raise ValueError("PCA needs at least 2 samples")
        mean = torch.zeros(d, dtype=torch.float64)
        for i in range(0, n, chunk):
            mean += x[i:i + chunk].double().sum(0)
        mean /= n
        dim = min(dim, d)
        if n < d:
            evals, evecs = cls._eig_from_gram(x, mean, dim)
        else:
            cov = torch.zeros(d, d, dtype=torch.float64)
            for i in range(0, n, chunk):
                xc = x[i:i + chunk].double() - mean
                cov += xc.t() @ xc
            cov /= n - 1
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
        floor = max(float(evals[0]) * eig_floor, 1e-12)
        scale = evals.clamp(min=floor).rsqrt()
        return cls(mean.float(), (evecs * scale).float(), evals)

    @staticmethod
    def _eig_from_gram(x: torch.Tensor, mean: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top `dim` eigenpairs of the covariance from the n x n Gram matrix, for n < D
        (AlexNet's D = 4096 with a few thousand samples: an n x n eigh instead of 4096 x 4096,
        25-30 s on 2 cores). Directions beyond the data's rank get zero vectors: the data has
        no variance there, so they carry nothing (the covariance route gives arbitrary ones)."""
        n, d = x.shape
        xc = x.double() - mean
        evals, u = torch.linalg.eigh(xc @ xc.t() / (n - 1))  # ascending
        evals, u = evals.flip(0)[:dim].clamp(min=0), u.flip(1)[:, :dim]
        rank_ok = evals > evals[0] * 1e-12
        evecs = (xc.t() @ u) / (evals * (n - 1)).sqrt().clamp(min=1e-300)  # unit-norm eigenvectors of xc^T xc
        evecs[:, ~rank_ok] = 0
        if dim > len(evals):  # fewer samples than dimensions asked for
            evals = torch.cat([evals, evals.new_zeros(dim - len(evals))])
            evecs = torch.cat([evecs, evecs.new_zeros(d, dim - evecs.shape[1])], dim=1)
        return evals, evecs

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.projection
