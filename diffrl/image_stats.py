"""Statistics of image sets shared by the built-in worlds' held-out metrics: the Fréchet distance
between Gaussians fitted to two sets of feature rows (``fid_shapes``, ``fid_text``; no weights, no
scipy) and the within-prompt disagreement of per-pixel labels (``diversity``)."""

from __future__ import annotations

import numpy as np

FRECHET_EPS: float = 1e-6
"""Added to the diagonal of both covariances before the matrix square root (feature units squared):
keeps sqrt well defined when N <= FEATURE_DIM or a feature is constant (off-palette ink is 0 on
every render), and cancels exactly when the two sets have the same covariance."""
FRECHET_SCALE: float = 100.0
"""``fid_shapes`` and ``fid_text`` are the Fréchet distance times this, so typical values read as 0.1..100."""


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between Gaussians fitted to feature rows ``a`` [N, D] and ``b`` [M, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with eps·I added to both
    covariances (``FRECHET_EPS``). Needs N, M >= 2. Computed with symmetric eigendecompositions
    (tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2)), so no scipy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 rows in each set, got {len(a)} and {len(b)}")
    reg = eps * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + reg, np.cov(b, rowvar=False) + reg
    ra = _psd_sqrt(sa)
    cross = np.trace(_psd_sqrt(ra @ sb @ ra))
    d = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)
    return max(d, 0.0)


def within_group_disagreement(labels: np.ndarray, groups: np.ndarray) -> float | None:
    """``labels`` [N, P] (one label per pixel, flattened), ``groups`` [N]: for each group with at least
    2 rows the mean over pairs of rows of the fraction of positions whose labels differ, averaged over
    groups; None when no group has 2 rows."""
    groups = np.asarray(groups)
    per_group = []
    for g in dict.fromkeys(groups.tolist()):
        c = labels[groups == g]
        if len(c) >= 2:
            i, j = np.triu_indices(len(c), k=1)
            per_group.append((c[i] != c[j]).mean())
    return float(np.mean(per_group)) if per_group else None
