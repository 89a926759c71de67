"""Small fitted models and rank statistics shared by the probe-style diagnostics.

Everything here is deterministic for a seed and never touches the global random state
(initialisations draw from their own seeded generator), so it is safe to run in a worker thread
beside other work (``udml`` and ``probe`` are computed so). Fits are full-batch, on CPU, on one
torch thread (so results do not depend on the machine's core count): the inputs are cached pooled
features, a few thousand rows at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import rankdata

from mmdiag.diagnostics._newton import newton_cg
from mmdiag.runtime.threads import one_thread

#: standard deviations below this are treated as zero (constant feature).
_STD_FLOOR = 1e-8


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


def live_columns(x: np.ndarray) -> np.ndarray:
    """Indices of the columns of ``x`` that are not zero in every row (see :class:`Standardiser`:
    a constant feature maps to 0)."""
    return np.flatnonzero(np.any(np.asarray(x) != 0, axis=0))


#: parameter counts (d + 1) * C up to which the logistic probe is fitted by Newton's method
#: (Hessian-vector products, no Hessian built); larger problems use L-BFGS.
NEWTON_MAX_PARAMS = 400
#: the Newton fit stops when the gradient's Euclidean norm is below this (L-BFGS-B: its largest entry)
GTOL = 1e-9


class LogisticObjective:
    """Mean cross-entropy of softmax(x W + b) plus weight_decay * ||W||^2, its gradient and its
    Hessian-vector products, over theta = W [d, C] then b [C], flattened (float64 torch, no
    autograd graph).

    With x~ = [x, 1], p_i = softmax(x~_i Theta) and V = [V_W; v_b] reshaped like Theta, the Hessian
    of the mean cross-entropy is mean_i (diag(p_i) - p_i p_i^T) (x) x~_i x~_i^T, so its product
    with V is x~^T R / n, where row i of R is (diag(p_i) - p_i p_i^T)(x~_i V); the penalty adds
    2 weight_decay V_W. Two [n, d] x [d, C] products a call, at the softmax of the latest
    :meth:`loss_grad` point: building the [(d+1)C]^2 Hessian cost n ((d+1)C)^2, 15 ms a Newton
    step at 1,400 rows, 64 features, 6 classes.
    """

    def __init__(self, x: torch.Tensor, onehot: torch.Tensor, weight_decay: float) -> None:
        self.x, self.x_t, self.onehot = x, x.T.contiguous(), onehot
        self.weight_decay = float(weight_decay)
        self.d, self.c = x.shape[1], onehot.shape[1]
        self.p = torch.empty(0)

    def loss_grad(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The objective and its gradient at ``theta`` (whose softmax the next :meth:`hessp` uses)."""
        dc = self.d * self.c
        w, b = theta[:dc].view(self.d, self.c), theta[dc:]
        z = torch.addmm(b, self.x, w)
        log_norm = torch.logsumexp(z, dim=1, keepdim=True)
        loss = float((log_norm[:, 0] - (z * self.onehot).sum(dim=1)).mean() + self.weight_decay * (w * w).sum())
        self.p = torch.exp(z - log_norm)
        resid = (self.p - self.onehot).div_(self.x.shape[0])
        grad_w = torch.addmm(w, self.x_t, resid, beta=2.0 * self.weight_decay)
        return loss, torch.cat([grad_w.reshape(-1), resid.sum(dim=0)])

    def hessp(self, v: torch.Tensor) -> torch.Tensor:
        """The Hessian at the latest :meth:`loss_grad` point times ``v``."""
        dc, n = self.d * self.c, self.x.shape[0]
        vw = v[:dc].view(self.d, self.c)
        r = self.p * torch.addmm(v[dc:], self.x, vw)  # diag(p_i) (x~_i V)
        r.sub_(self.p * r.sum(dim=1, keepdim=True)).div_(n)  # minus p_i p_i^T (x~_i V), over n
        h_w = torch.addmm(vw, self.x_t, r, beta=2.0 * self.weight_decay)
        return torch.cat([h_w.reshape(-1), r.sum(dim=0)])

    def numpy_loss_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """:meth:`loss_grad` on NumPy vectors (for SciPy's solvers)."""
        loss, grad = self.loss_grad(torch.from_numpy(theta))
        return loss, grad.numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression; returns (W [d, C], b [C]).

    Minimises mean_i CE(x_i W + b, y_i) + weight_decay * ||W||^2 from W = 0, b = 0. With
    weight_decay > 0 the objective is strictly convex in W, so the fit does not depend on a seed.
    The loss, its gradient and its Hessian-vector products are written out
    (:class:`LogisticObjective`: float64, no autograd graph, one torch thread). When (d + 1) * C is
    at most :data:`NEWTON_MAX_PARAMS` the fit is Newton's method with conjugate-gradient steps and
    a backtracking line search (:func:`~mmdiag.diagnostics._newton.newton_cg`, at most ``max_iter``
    Newton steps, until the gradient's norm is below :data:`GTOL`); larger problems use SciPy's
    L-BFGS-B, which stops at whichever comes first of ``max_iter`` iterations, the gradient's
    largest entry below :data:`GTOL`, or a relative loss change below 1e-12 (measured on 410-1290
    parameters: the largest gradient entry was then 3e-7 to 4e-7, the loss 3e-11 above the
    optimum, the held-out predictions those of the optimum). A column that is zero in every row (a constant feature after standardisation)
    has a zero gradient from W = 0 on, so its weights stay 0: it is left out of the fit and gets
    zero weights.
    """
    live = live_columns(x)
    xt = torch.as_tensor(np.ascontiguousarray(np.asarray(x, dtype=np.float64)[:, live]))
    onehot = torch.zeros(xt.shape[0], n_classes, dtype=torch.float64)
    onehot[torch.arange(xt.shape[0]), torch.as_tensor(np.asarray(y), dtype=torch.long)] = 1.0
    d = xt.shape[1]
    objective = LogisticObjective(xt, onehot, weight_decay)
    with one_thread():
        if (d + 1) * n_classes <= NEWTON_MAX_PARAMS:
            # the softmax does not depend on a common shift of the class biases, so the Hessian is
            # singular along it; the gradient has no component there, and conjugate gradients never
            # step into it
            start = torch.zeros(d * n_classes + n_classes, dtype=torch.float64)
            theta = newton_cg(objective.loss_grad, objective.hessp, start, GTOL, max_iter).numpy()
        else:
            fit = minimize(objective.numpy_loss_grad, np.zeros(d * n_classes + n_classes), jac=True,
                           method="L-BFGS-B",
                           options={"maxiter": max_iter, "gtol": GTOL, "ftol": 1e-12, "maxcor": 20})
            theta = fit.x
    w = np.zeros((x.shape[1], n_classes))
    w[live] = theta[:d * n_classes].reshape(d, n_classes)
    return w, theta[d * n_classes:].copy()


def predict_logistic(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class predictions of a fitted :func:`fit_logistic` model (ties go to the lowest class)."""
    return np.argmax(x @ w + b, axis=1)


class NoiseRegressor(torch.nn.Module):
    """d -> hidden -> ReLU -> 1, read as a positive noise level sigma = exp(0.5 * o) (UDML's form)."""

    def __init__(self, d: int, hidden: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d, hidden, device=device), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, 1, device=device))

    @classmethod
    def seeded(cls, d: int, hidden: int, seed: int) -> "NoiseRegressor":
        """A regressor with PyTorch's default ``nn.Linear`` initialisation drawn from a generator
        seeded by ``seed``: the weights of ``torch.manual_seed(seed); NoiseRegressor(d, hidden)``
        (tested), without touching the global random state (a worker thread must not)."""
        model = torch.nn.utils.skip_init(cls, d, hidden)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for layer in (model.body[0], model.body[2]):
                # nn.Linear.reset_parameters, in its order: the weight, then the bias
                torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=g)
                bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=g)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self.body(x)[:, 0])


class _Weights:
    """The weights of M regressors, fitted side by side: w1 [M, D, hidden], b1 [M, 1, hidden],
    w2 [M, hidden, 1], b2 [M, 1, 1] as views of one flat float32 buffer [M, P], and their
    gradients as views of another (one Adam update of the buffer updates every weight). D is the
    largest number of live inputs; regressor j's rows beyond its own live count are zero, and so
    are its padded inputs, so they get no gradient and stay zero."""

    def __init__(self, models: Sequence[NoiseRegressor], lives: Sequence[np.ndarray], bias: float) -> None:
        hidden = models[0].body[0].out_features
        self.lives = [torch.as_tensor(live, dtype=torch.long) for live in lives]
        d = max([len(live) for live in lives] + [1])
        shapes = [(d, hidden), (1, hidden), (hidden, 1), (1, 1)]
        ends = np.cumsum([0] + [math.prod(shape) for shape in shapes])
        self.flat = torch.zeros(len(models), int(ends[-1]))
        self.grad = torch.zeros_like(self.flat)
        self.params = [self.flat[:, a:b].view(-1, *shape) for a, b, shape in zip(ends[:-1], ends[1:], shapes)]
        self.grads = [self.grad[:, a:b].view(-1, *shape) for a, b, shape in zip(ends[:-1], ends[1:], shapes)]
        w1, b1, w2, b2 = self.params
        for j, (model, live) in enumerate(zip(models, self.lives)):
            w1[j, :len(live)] = model.body[0].weight.detach().T[live]
            b1[j, 0] = model.body[0].bias.detach()
            w2[j] = model.body[2].weight.detach().T
        b2.fill_(bias)

    def write_to(self, models: Sequence[NoiseRegressor]) -> None:
        """Copy the trained weights into ``models`` (the inputs left out keep their initial weights)."""
        w1, b1, w2, b2 = self.params
        with torch.no_grad():
            for j, (model, live) in enumerate(zip(models, self.lives)):
                model.body[0].weight[:, live] = w1[j, :len(live)].T
                model.body[0].bias.copy_(b1[j, 0])
                model.body[2].weight.copy_(w2[j].T)
                model.body[2].bias.copy_(b2[j, 0])


class _Workspace:
    """The inputs [M, n, D] (live columns, zero-padded) and the buffers of one training step
    (allocated once: a fresh block of this size each step would cost more than the arithmetic)."""

    def __init__(self, xs: Sequence[np.ndarray], weights: _Weights) -> None:
        m, n = len(xs), int(xs[0].shape[0])
        _, d, hidden = weights.params[0].shape
        self.x = torch.zeros(m, n, d)
        for j, (x, live) in enumerate(zip(xs, weights.lives)):
            self.x[j, :, :len(live)] = torch.as_tensor(np.asarray(x)[:, live.numpy()], dtype=torch.float32)
        self.x_t = self.x.transpose(1, 2).contiguous()
        self.h = torch.empty(m, n, hidden)
        self.mask = torch.empty(m, n, hidden)
        self.g_h = torch.empty(m, n, hidden)
        self.sigma = torch.empty(m, n, 1)
        self.g_o = torch.empty(m, n, 1)


def _noise_gradients(weights: _Weights, ws: _Workspace, target: torch.Tensor, scale: float) -> None:
    """Gradients of mean_i (sigma_i - t_i)^2 / scale for every regressor, written into
    ``weights.grads`` (by hand: the chain rule through exp(0.5 o), the second linear layer, the
    ReLU and the first layer; batched matrix products over the regressors)."""
    w1, b1, w2, b2 = weights.params
    g_w1, g_b1, g_w2, g_b2 = weights.grads
    n = ws.h.shape[1]
    h = torch.baddbmm(b1, ws.x, w1, out=ws.h).clamp_min_(0.0)  # [M, n, hidden]
    sigma = torch.baddbmm(b2, h, w2, beta=0.5, alpha=0.5, out=ws.sigma).exp_()  # exp(0.5 o), [M, n, 1]
    g_o = torch.sub(sigma, target, out=ws.g_o).mul_(sigma).mul_(1.0 / (n * scale))  # 2 (s - t) * 0.5 s / (n scale)
    g_h = torch.mul(g_o, w2.transpose(1, 2), out=ws.g_h)
    g_h.mul_(torch.sign(h, out=ws.mask))  # sign(h) = 1 where the ReLU passes, else 0
    torch.bmm(ws.x_t, g_h, out=g_w1)
    torch.sum(g_h, dim=1, keepdim=True, out=g_b1)
    torch.bmm(h.transpose(1, 2), g_o, out=g_w2)
    torch.sum(g_o, dim=1, keepdim=True, out=g_b2)


class FlatAdam:
    """Adam with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8; no weight decay, no amsgrad) on
    one flat tensor, the same element-wise operations in the same order as
    ``torch.optim.Adam``'s single-tensor step, so the weights agree with it bit for bit (tested).

    Why not ``torch.optim.Adam`` itself: its ``step()`` wrapper (profiling hooks, state lookups,
    a step counter kept as a tensor) cost as much as the arithmetic of a regressor's step here,
    a third of ``udml``'s fitting time.
    """

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        self.param, self.lr, self.steps = param, float(lr), 0
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.denom = torch.empty_like(param)

    def step(self, grad: torch.Tensor) -> None:
        """One update of ``param`` from ``grad``."""
        self.steps += 1
        step = float(self.steps)  # torch.optim.Adam reads its float32 step counter as a float
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1 ** step)
        bias_correction2_sqrt = (1 - self.beta2 ** step) ** 0.5
        torch.sqrt(self.exp_avg_sq, out=self.denom).div_(bias_correction2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, self.denom, value=-step_size)


def _train(weights: _Weights, ws: _Workspace, target: torch.Tensor, scale: float, steps: int, lr: float) -> None:
    """Full-batch Adam (PyTorch's defaults, :class:`FlatAdam`) on the flat weights of every
    regressor at once, whose gradient is written by :func:`_noise_gradients`."""
    opt = FlatAdam(weights.flat, lr)
    for _ in range(steps):
        _noise_gradients(weights, ws, target, scale)
        opt.step(weights.grad)


def fit_noise_regressors(xs: Sequence[np.ndarray], target: np.ndarray, hidden: int, steps: int, lr: float,
                         seeds: Sequence[int]) -> list[NoiseRegressor]:
    """Fit one :class:`NoiseRegressor` (float32) per input by full-batch Adam on the relative squared error.

    Every ``xs[j]`` has one row per entry of ``target``. Loss of regressor j: mean_i (sigma_ji -
    t_i)^2 / var(t) (the target's variance only rescales the loss). Regressor j's initialisation is
    seeded by ``seeds[j]`` (its own generator: the global random state is not touched) and its output bias
    starts at 2 log mean(t), so sigma starts at the mean target. The gradients are written out and
    Adam (PyTorch's defaults) updates one flat buffer, on one torch thread. An input column that is
    zero in every row (a constant feature after standardisation) leaves its first-layer weights at
    their initial values (zero gradient, no Adam step): it is left out of the products.

    The regressors are independent (each its own loss, weights and Adam state), and they are
    trained side by side: every step is one batched product over all of them rather than one
    product per regressor. A step of these small regressors costs mostly the fixed cost of each
    torch operation, so M regressors cost little more than one (measured at 804 rows x 32 inputs,
    300 steps: 4 regressors 0.17 s side by side against 0.24 s one after another, and 0.42 s as
    pieces shared between two threads, which the interpreter lock serialises). Each regressor's
    weights agree with its fit alone to float32 rounding over the first tens of steps (tested);
    over hundreds, Adam amplifies rounding differences (see docs/diagnostics/udml.md, Rounding).
    """
    tt = torch.as_tensor(target, dtype=torch.float32).reshape(1, -1, 1)
    scale = float(tt.var()) if tt.numel() > 1 and float(tt.var()) > 0 else 1.0
    bias = 2.0 * float(np.log(max(float(tt.mean()), 1e-6)))
    models = [NoiseRegressor.seeded(int(x.shape[1]), hidden, seed) for x, seed in zip(xs, seeds)]
    if not models:
        return []
    weights = _Weights(models, [live_columns(x) for x in xs], bias)
    with one_thread():
        ws = _Workspace(xs, weights)
        _train(weights, ws, tt, scale, steps, lr)
    weights.write_to(models)
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
    # Pearson's correlation of the average ranks, written out rather than through scipy's
    # spearmanr, whose warnings would need ``warnings.catch_warnings`` (it swaps the process's
    # warning filters, which is not safe beside another thread)
    ra, rb = rankdata(a) - (a.shape[0] + 1) / 2.0, rankdata(b) - (b.shape[0] + 1) / 2.0
    return float(np.clip((ra @ rb) / math.sqrt(float(ra @ ra) * float(rb @ rb)), -1.0, 1.0))
