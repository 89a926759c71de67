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


def _logistic_loss(theta: np.ndarray, x: torch.Tensor, onehot: torch.Tensor,
                   weight_decay: float) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(x W + b) plus weight_decay * ||W||^2, and its gradient.

    ``theta`` is W [d, C] and b [C] flattened (W first); the gradient has the same layout. The
    products over the rows run in torch (float64, no autograd graph).
    """
    d, c = x.shape[1], onehot.shape[1]
    t = torch.from_numpy(theta)
    w, b = t[:d * c].view(d, c), t[d * c:]
    z = torch.addmm(b, x, w)
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    loss = float((log_norm[:, 0] - (z * onehot).sum(dim=1)).mean() + weight_decay * (w * w).sum())
    resid = (torch.exp(z - log_norm) - onehot) / x.shape[0]
    grad_w = torch.addmm(w, x.T, resid, beta=2.0 * weight_decay)
    return loss, torch.cat([grad_w.reshape(-1), resid.sum(dim=0)]).numpy()


def _lbfgs_direction(g: np.ndarray, pairs: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """-H g for the L-BFGS inverse-Hessian estimate H of the stored (s, y, 1 / s.y) pairs (two loops)."""
    q = g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    if pairs:
        s, y, _ = pairs[-1]
        q *= float(s @ y) / float(y @ y)
    else:  # first step: a move of length at most 1 along -g
        q /= max(float(np.linalg.norm(q)), 1.0)
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        q += (a - rho * float(y @ q)) * s
    return -q


def minimize_lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], start: np.ndarray,
                   max_iter: int, gtol: float = 1e-9, ftol: float = 1e-12, memory: int = 20) -> np.ndarray:
    """Minimise a smooth convex function by L-BFGS with a backtracking (Armijo) line search.

    ``fun(theta)`` returns (loss, gradient) for a float64 vector. Stops when the largest gradient
    entry is at most ``gtol``, when an iteration lowers the loss by at most ``ftol`` * max(|loss|,
    1), or after ``max_iter`` iterations. On a strictly convex function every step has s.y > 0, so
    every pair is kept (the oldest beyond ``memory`` dropped); a direction that is not a descent
    direction restarts from the gradient.
    """
    theta = np.array(start, dtype=np.float64)
    f, g = fun(theta)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_iter):
        if float(np.abs(g).max()) <= gtol:
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
        theta = theta + s
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
                               np.zeros(d * n_classes + n_classes), max_iter)
    return theta[:d * n_classes].reshape(d, n_classes).copy(), theta[d * n_classes:].copy()


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


class _Stacked:
    """M regressors' weights [w1 (M, D, hidden), b1 (M, 1, hidden), w2 (M, hidden, 1), b2 (M, 1, 1)]
    as views of one flat float32 buffer, and their gradients as views of another (one Adam update
    of the flat buffer updates every weight)."""

    def __init__(self, m_count: int, d: int, hidden: int) -> None:
        shapes = [(m_count, d, hidden), (m_count, 1, hidden), (m_count, hidden, 1), (m_count, 1, 1)]
        ends = np.cumsum([0] + [math.prod(shape) for shape in shapes])
        self.flat = torch.zeros(int(ends[-1]))
        self.grad = torch.zeros(int(ends[-1]))
        self.params = [self.flat[a:b].view(shape) for a, b, shape in zip(ends[:-1], ends[1:], shapes)]
        self.grads = [self.grad[a:b].view(shape) for a, b, shape in zip(ends[:-1], ends[1:], shapes)]


def _stacked_init(dims: Sequence[int], hidden: int, seeds: Sequence[int],
                  bias: float) -> tuple[list[NoiseRegressor], _Stacked]:
    """Each modality's seeded :class:`NoiseRegressor` and their weights stacked along a first axis.

    The inputs of modality j are zero-padded to max(dims) columns; its padded first-layer rows are
    zero and stay zero (their gradient is zero), so the stacked fit is M separate fits.
    """
    models: list[NoiseRegressor] = []
    for d, seed in zip(dims, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            models.append(NoiseRegressor(d, hidden))
    stacked = _Stacked(len(dims), max(dims), hidden)
    w1, b1, w2, b2 = stacked.params
    for j, (model, d) in enumerate(zip(models, dims)):
        w1[j, :d] = model.body[0].weight.detach().T
        b1[j, 0] = model.body[0].bias.detach()
        w2[j] = model.body[2].weight.detach().T
    b2.fill_(bias)
    return models, stacked


def _noise_gradients(stacked: _Stacked, x: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor,
                     scale: float) -> None:
    """Gradients of sum_j mean_i (sigma_ji - t_i)^2 / scale for the stacked regressors, written into
    ``stacked.grads`` (by hand: the chain rule through exp(0.5 o), the second linear layer, the
    ReLU and the first layer). ``x_t`` is ``x`` transposed (contiguous)."""
    w1, b1, w2, b2 = stacked.params
    g_w1, g_b1, g_w2, g_b2 = stacked.grads
    h = torch.baddbmm(b1, x, w1).clamp_min_(0.0)  # [M, n, hidden]
    sigma = torch.baddbmm(b2, h, w2).mul_(0.5).exp_()  # [M, n, 1]
    g_o = (sigma - target).mul_(sigma).mul_(1.0 / (x.shape[1] * scale))  # 2 (s - t) * 0.5 s / (n scale)
    g_h = (g_o * w2.transpose(1, 2)).mul_(torch.sign(h))  # sign(h) = 1 where the ReLU passes, else 0
    torch.bmm(x_t, g_h, out=g_w1)
    torch.sum(g_h, dim=1, keepdim=True, out=g_b1)
    torch.bmm(h.transpose(1, 2), g_o, out=g_w2)
    torch.sum(g_o, dim=1, keepdim=True, out=g_b2)


def fit_noise_regressors(xs: Sequence[np.ndarray], target: np.ndarray, hidden: int, steps: int, lr: float,
                         seeds: Sequence[int]) -> list[NoiseRegressor]:
    """Fit one :class:`NoiseRegressor` (float32) per input by full-batch Adam on the relative squared error.

    Every ``xs[j]`` has one row per entry of ``target``. Loss of regressor j: mean_i (sigma_ji -
    t_i)^2 / var(t) (the target's variance only rescales the loss). Regressor j's initialisation is
    seeded by ``seeds[j]`` (the global random state is restored afterwards) and its output bias
    starts at 2 log mean(t), so sigma starts at the mean target. The regressors are independent:
    they are stacked and trained together (batched matrix products, gradients written out, Adam
    with PyTorch's defaults on one flat buffer), which gives each the same steps as a fit of its own.
    """
    tt = torch.as_tensor(target, dtype=torch.float32).reshape(1, -1, 1)
    scale = float(tt.var()) if tt.numel() > 1 and float(tt.var()) > 0 else 1.0
    dims = [int(x.shape[1]) for x in xs]
    models, stacked = _stacked_init(dims, hidden, seeds, 2.0 * float(np.log(max(float(tt.mean()), 1e-6))))
    x = torch.zeros(len(xs), tt.shape[1], max(dims))
    for j, xj in enumerate(xs):
        x[j, :, :dims[j]] = torch.as_tensor(xj, dtype=torch.float32)
    x_t = x.transpose(1, 2).contiguous()
    m1, m2 = torch.zeros_like(stacked.flat), torch.zeros_like(stacked.flat)
    with one_thread():
        for step in range(1, steps + 1):
            _noise_gradients(stacked, x, x_t, tt, scale)
            m1.lerp_(stacked.grad, 1.0 - _BETAS[0])
            m2.mul_(_BETAS[1]).addcmul_(stacked.grad, stacked.grad, value=1.0 - _BETAS[1])
            denom = m2.sqrt().div_(math.sqrt(1.0 - _BETAS[1] ** step)).add_(_EPS)
            stacked.flat.addcdiv_(m1, denom, value=-lr / (1.0 - _BETAS[0] ** step))
    w1, b1, w2, b2 = stacked.params
    with torch.no_grad():
        for j, (model, d) in enumerate(zip(models, dims)):
            model.body[0].weight.copy_(w1[j, :d].T)
            model.body[0].bias.copy_(b1[j, 0])
            model.body[2].weight.copy_(w2[j].T)
            model.body[2].bias.copy_(b2[j, 0])
    return [m.eval() for m in models]


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
