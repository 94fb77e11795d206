"""LogME (You et al. 2021): how well frozen features suit a labelled task, without training.

For each class, a Bayesian linear model y = F m + noise with prior m ~ N(0, I / alpha) and
noise precision beta; its log marginal evidence p(y | F, alpha, beta), maximised over
alpha and beta by the fixed-point updates of docs/METHODS.md section 4, per example, averaged
over the classes (one-hot targets). Higher is better.

One decomposition serves every class and every iteration: with F = U diag(sigma) W^T and
s = sigma^2, each update is a few sums over the r = rank(F) singular directions, and only
U^T y is needed. When N >= D it comes from the eigendecomposition F^T F = W diag(s) W^T
(D x D, as in docs/METHODS.md) as U^T y = diag(1/sigma) W^T F^T y, never forming the N x D U:
10,000 x 384 features cost one product F^T F and one small eigh (tens of milliseconds).
When N < D, the thin SVD of F is the cheaper one.
"""

import math

import numpy as np

BOUNDS = (1e-10, 1e10)  # of alpha and beta
TINY = 1e-300


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 0.01) -> float:
    """The mean over classes of the per-example log evidence; `labels` are class ids 0..K-1."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or y.shape != (f.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,); got {f.shape} and {y.shape}")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError("LogME needs labels of at least two classes")
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    s, proj = _spectrum(f, onehot)
    return float(np.mean([_evidence(proj[:, k], float(onehot[:, k] @ onehot[:, k]), s, *f.shape, max_iter, tol)[0]
                          for k in range(classes.size)]))


def _spectrum(f: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, U^T targets) over the non-null singular directions of f."""
    eps = np.finfo(np.float64).eps
    if f.shape[0] >= f.shape[1]:
        s, w = np.linalg.eigh(f.T @ f)
        # eigh is accurate to about eps * max(s) in s: smaller ones are numerical zeros
        keep = s > s.max() * f.shape[1] * eps
        s, w = s[keep], w[:, keep]
        return s, (w.T @ (f.T @ targets)) / np.sqrt(s)[:, None]
    u, sigma, _ = np.linalg.svd(f, full_matrices=False)
    keep = sigma > sigma.max() * max(f.shape) * eps
    return sigma[keep] ** 2, u[:, keep].T @ targets


def _evidence(proj: np.ndarray, y_sq: float, s: np.ndarray, n: int, d: int, max_iter: int,
              tol: float) -> tuple[float, float, float]:
    """(per-example log evidence, alpha, beta) for one target whose projections on the left
    singular vectors are `proj` (u_i = U^T y) and whose squared norm is `y_sq`."""
    outside = max(y_sq - float(proj @ proj), 0.0)  # the part of y no feature direction can fit

    def fit(alpha: float, beta: float) -> tuple[float, float, float]:
        """gamma, |m|^2 and |y - F m|^2 of the posterior mean m at (alpha, beta)."""
        shrink = alpha / (beta * s + alpha)  # per direction: 1 - beta s / (beta s + alpha)
        m_sq = float(np.sum((beta * np.sqrt(s) * proj / (beta * s + alpha)) ** 2))
        return float(np.sum(1.0 - shrink)), m_sq, outside + float(np.sum((shrink * proj) ** 2))

    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        gamma, m_sq, residual = fit(alpha, beta)
        ratio = alpha / beta
        # Bounded: when the features fit the target exactly (N <= rank), beta grows without
        # limit and the evidence tends to a finite value; the bound stops there.
        alpha = min(max(gamma / max(m_sq, TINY), BOUNDS[0]), BOUNDS[1])
        beta = min(max((n - gamma) / max(residual, TINY), BOUNDS[0]), BOUNDS[1])
        if abs(alpha / beta - ratio) / ratio < tol:
            break
    _, m_sq, residual = fit(alpha, beta)
    log_det = float(np.sum(np.log(alpha + beta * s))) + (d - s.size) * math.log(alpha)  # zero directions: alpha
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - log_det / 2 - beta / 2 * residual
                - alpha / 2 * m_sq - n / 2 * math.log(2 * math.pi))
    return evidence / n, alpha, beta
