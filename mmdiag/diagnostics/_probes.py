"""Small fitted models and rank statistics shared by the probe-style diagnostics.

Everything here is deterministic for a seed and leaves the global random state untouched
(initialisations run inside :func:`torch.random.fork_rng`). Fits are full-batch, on CPU, on one
torch thread (so results do not depend on the machine's core count): the inputs are cached pooled
features, a few thousand rows at most.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

#: standard deviations below this are treated as zero (constant feature).
_STD_FLOOR = 1e-8


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the duration (restored afterwards).

    The fits here are thousands of rows by tens of columns: thread start-up costs more than it
    saves, and on a busy machine several threads per tiny operation slow the fit ten-fold.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 numpy copy of a tensor or array (the evidence itself is never modified)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row positions into (train, test), class by class.

    Each class with n_k rows puts round(n_k * test_fraction) of them in the test part, but at least
    one and at most n_k - 1 (so a class with two or more rows appears on both sides); a class with a
    single row goes to the training part. Both parts are returned sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    test: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        rows = rows[rng.permutation(rows.shape[0])]
        n_k = rows.shape[0]
        n_test = 0 if n_k < 2 else int(min(max(round(n_k * test_fraction), 1), n_k - 1))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def row_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` rows into sorted (train, test) parts, at least one row in each (n >= 2)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = int(min(max(round(n * test_fraction), 1), n - 1)) if n >= 2 else 0
    return np.sort(order[n_test:]), np.sort(order[:n_test])


@dataclass(frozen=True)
class Standardiser:
    """(x - mean) / std with statistics of the training rows; constant columns map to 0."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > _STD_FLOOR, std, np.inf))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by L-BFGS; returns (W [d, C], b [C]).

    Minimises mean_i CE(x_i W + b, y_i) + weight_decay * ||W||^2 from W = 0, b = 0. With
    weight_decay > 0 the objective is strictly convex in W, so the fit does not depend on a seed.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with one_thread():
        opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def predict_logistic(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class predictions of a fitted :func:`fit_logistic` model (ties go to the lowest class)."""
    return np.argmax(x @ w + b, axis=1)


class NoiseRegressor(torch.nn.Module):
    """d -> hidden -> ReLU -> 1, read as a positive noise level sigma = exp(0.5 * o) (UDML's form)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self.body(x)[:, 0])


def fit_noise_regressor(x: np.ndarray, target: np.ndarray, hidden: int, steps: int, lr: float,
                        seed: int) -> NoiseRegressor:
    """Fit :class:`NoiseRegressor` (float32) by full-batch Adam on the relative squared error.

    Loss: mean_i (sigma_i - t_i)^2 / var(t) (the target's variance only rescales the loss). The
    output bias starts at 2 log mean(t), so sigma starts at the mean target. Seeded; the global
    random state is restored afterwards.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    tt = torch.as_tensor(target, dtype=torch.float32)
    scale = float(tt.var()) if tt.numel() > 1 and float(tt.var()) > 0 else 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoiseRegressor(x.shape[1], hidden)
    with torch.no_grad():
        model.body[-1].bias.fill_(2.0 * float(np.log(max(float(tt.mean()), 1e-6))))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with one_thread():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((model(xt) - tt) ** 2).mean() / scale
            loss.backward()
            opt.step()
    return model.eval()


def predict_noise(model: NoiseRegressor, x: np.ndarray) -> np.ndarray:
    """Predicted noise levels of rows ``x`` (already standardised)."""
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling positive rows from negative ones.

    Mann-Whitney form with ranks (ties get their average rank, i.e. count one half):
    AUROC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg). It is the probability
    that a random positive scores above a random negative. NaN when either group is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant (no ranking exists)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[0] < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)
