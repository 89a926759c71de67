"""Small fitted models and rank statistics shared by the probe-style diagnostics.

Everything here is deterministic for a seed and leaves the global random state untouched
(initialisations run inside :func:`torch.random.fork_rng`). Fits are full-batch, on CPU, on one
torch thread (so results do not depend on the machine's core count): the inputs are cached pooled
features, a few thousand rows at most.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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


def _logistic_loss(theta: torch.Tensor, x: torch.Tensor, onehot: torch.Tensor,
                   weight_decay: float) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of softmax(x W + b) plus weight_decay * ||W||^2, and its gradient.

    ``theta`` is W [d, C] and b [C] flattened (W first); the gradient has the same layout.
    """
    d, c = x.shape[1], onehot.shape[1]
    w, b = theta[:d * c].view(d, c), theta[d * c:]
    z = torch.addmm(b, x, w)
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    loss = float((log_norm[:, 0] - (z * onehot).sum(dim=1)).mean() + weight_decay * (w * w).sum())
    resid = (torch.exp(z - log_norm) - onehot) / x.shape[0]
    grad_w = torch.addmm(w, x.T, resid, beta=2.0 * weight_decay)
    return loss, torch.cat([grad_w.reshape(-1), resid.sum(dim=0)])


def _lbfgs_direction(g: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """-H g for the L-BFGS inverse-Hessian estimate H of the stored (s, y, 1 / s.y) pairs (two loops)."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q.add_(y, alpha=-a)
        alphas.append(a)
    if pairs:
        s, y, _ = pairs[-1]
        q.mul_(float(s @ y) / float(y @ y))
    else:  # first step: a unit-length move along -g
        q.div_(max(float(q.norm()), 1.0))
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        q.add_(s, alpha=a - rho * float(y @ q))
    return q.neg_()


def minimize_lbfgs(fun: Callable[[torch.Tensor], tuple[float, torch.Tensor]], start: torch.Tensor,
                   max_iter: int, gtol: float = 1e-9, ftol: float = 1e-12, memory: int = 20) -> torch.Tensor:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    ``fun(theta)`` returns (loss, gradient). Stops when the largest gradient entry is at most
    ``gtol``, when an iteration lowers the loss by at most ``ftol`` * max(|loss|, 1), or after
    ``max_iter`` iterations. On a strictly convex function every step has s.y > 0, so every pair
    is kept (the oldest beyond ``memory`` dropped); a direction that is not a descent direction
    restarts from the gradient.
    """
    theta = start.clone()
    f, g = fun(theta)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(max_iter):
        if float(g.abs().max()) <= gtol:
            break
        direction = _lbfgs_direction(g, pairs)
        slope = float(g @ direction)
        if slope >= 0:
            pairs.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0
        while True:
            f_new, g_new = fun(theta + step * direction)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = step * direction, g_new - g
        sy = float(s @ y)
        if sy > 0:
            pairs = [*pairs[-(memory - 1):], (s, y, 1.0 / sy)]
        theta.add_(s)
        done = f - f_new <= ftol * max(abs(f), abs(f_new), 1.0)
        f, g = f_new, g_new
        if done:
            break
    return theta


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by L-BFGS; returns (W [d, C], b [C]).

    Minimises mean_i CE(x_i W + b, y_i) + weight_decay * ||W||^2 from W = 0, b = 0. With
    weight_decay > 0 the objective is strictly convex in W, so the fit does not depend on a seed.
    The loss and its gradient are written out (float64, no autograd graph per evaluation) and
    minimised by :func:`minimize_lbfgs` (at most ``max_iter`` iterations) on one torch thread.
    """
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64)
    onehot = torch.zeros(xt.shape[0], n_classes, dtype=torch.float64)
    onehot[torch.arange(xt.shape[0]), torch.as_tensor(np.asarray(y), dtype=torch.long)] = 1.0
    d = xt.shape[1]
    with one_thread():
        theta = minimize_lbfgs(lambda t: _logistic_loss(t, xt, onehot, weight_decay),
                               torch.zeros(d * n_classes + n_classes, dtype=torch.float64), max_iter)
    return theta[:d * n_classes].reshape(d, n_classes).numpy().copy(), theta[d * n_classes:].numpy().copy()


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


#: Adam's constants (PyTorch's defaults).
_BETAS = (0.9, 0.999)
_EPS = 1e-8


def _stacked_init(dims: Sequence[int], hidden: int, seeds: Sequence[int],
                  bias: float) -> tuple[list[NoiseRegressor], list[torch.Tensor]]:
    """Each modality's seeded :class:`NoiseRegressor` and their weights stacked along a first axis.

    The inputs of modality j are zero-padded to max(dims) columns; its padded first-layer rows are
    zero and stay zero (their gradient is zero), so the stacked fit is M separate fits.
    """
    models: list[NoiseRegressor] = []
    for d, seed in zip(dims, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models.append(NoiseRegressor(d, hidden))
    w1 = torch.zeros(len(dims), max(dims), hidden)
    for j, (model, d) in enumerate(zip(models, dims)):
        w1[j, :d] = model.body[0].weight.detach().T
    b1 = torch.stack([m.body[0].bias.detach() for m in models])[:, None, :].clone()
    w2 = torch.stack([m.body[2].weight.detach().T for m in models]).clone()  # [M, hidden, 1]
    b2 = torch.full((len(dims), 1, 1), bias)
    return models, [w1, b1, w2, b2]


def _noise_gradients(params: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                     scale: float) -> list[torch.Tensor]:
    """Gradients of sum_j mean_i (sigma_ji - t_i)^2 / scale for the stacked regressors (by hand:
    the chain rule through exp(0.5 o), the second linear layer, the ReLU and the first layer)."""
    w1, b1, w2, b2 = params
    pre = torch.baddbmm(b1, x, w1)  # [M, n, hidden]
    h = pre.clamp_min(0.0)
    sigma = torch.exp(0.5 * torch.baddbmm(b2, h, w2))  # [M, n, 1]
    g_o = (sigma - target) * sigma * (1.0 / (x.shape[1] * scale))  # d/do of the loss: 2 (s - t) * 0.5 s / (n scale)
    g_h = (g_o * w2.transpose(1, 2)).mul_(torch.sign(h))  # sign(h) = 1 where pre > 0, else 0
    return [torch.bmm(x.transpose(1, 2), g_h), g_h.sum(1, keepdim=True),
            torch.bmm(h.transpose(1, 2), g_o), g_o.sum(1, keepdim=True)]


def fit_noise_regressors(xs: Sequence[np.ndarray], target: np.ndarray, hidden: int, steps: int, lr: float,
                         seeds: Sequence[int]) -> list[NoiseRegressor]:
    """Fit one :class:`NoiseRegressor` (float32) per input by full-batch Adam on the relative squared error.

    Every ``xs[j]`` has one row per entry of ``target``. Loss of regressor j: mean_i (sigma_ji -
    t_i)^2 / var(t) (the target's variance only rescales the loss). Regressor j's initialisation is
    seeded by ``seeds[j]`` (the global random state is restored afterwards) and its output bias
    starts at 2 log mean(t), so sigma starts at the mean target. The regressors are independent:
    they are stacked and trained together (batched matrix products, gradients written out, Adam
    with PyTorch's defaults), which gives each the same steps as a fit of its own.
    """
    tt = torch.as_tensor(target, dtype=torch.float32).reshape(1, -1, 1)
    scale = float(tt.var()) if tt.numel() > 1 and float(tt.var()) > 0 else 1.0
    dims = [int(x.shape[1]) for x in xs]
    models, params = _stacked_init(dims, hidden, seeds, 2.0 * float(np.log(max(float(tt.mean()), 1e-6))))
    x = torch.zeros(len(xs), tt.shape[1], max(dims))
    for j, xj in enumerate(xs):
        x[j, :, :dims[j]] = torch.as_tensor(xj, dtype=torch.float32)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    with one_thread():
        for step in range(1, steps + 1):
            grads = _noise_gradients(params, x, tt, scale)
            c1, c2 = 1.0 - _BETAS[0] ** step, math.sqrt(1.0 - _BETAS[1] ** step)
            for p, g, (m1, m2) in zip(params, grads, moments):
                m1.mul_(_BETAS[0]).add_(g, alpha=1.0 - _BETAS[0])
                m2.mul_(_BETAS[1]).addcmul_(g, g, value=1.0 - _BETAS[1])
                p.addcdiv_(m1, (m2.sqrt() / c2).add_(_EPS), value=-lr / c1)
    w1, b1, w2, b2 = params
    with torch.no_grad():
        for j, (model, d) in enumerate(zip(models, dims)):
            model.body[0].weight.copy_(w1[j, :d].T)
            model.body[0].bias.copy_(b1[j, 0])
            model.body[2].weight.copy_(w2[j].T)
            model.body[2].bias.copy_(b2[j, 0])
    return [m.eval() for m in models]


def fit_noise_regressor(x: np.ndarray, target: np.ndarray, hidden: int, steps: int, lr: float,
                        seed: int) -> NoiseRegressor:
    """One :class:`NoiseRegressor` fitted as in :func:`fit_noise_regressors`."""
    return fit_noise_regressors([x], target, hidden, steps, lr, [seed])[0]


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
