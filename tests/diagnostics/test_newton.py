"""The Newton-CG solver of the probes on problems with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmdiag.diagnostics._newton import conjugate_gradient, newton_cg


def test_conjugate_gradient_solves_a_positive_definite_system() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    h = torch.as_tensor(a @ a.T + 0.5 * np.eye(30))
    rhs = torch.as_tensor(rng.normal(size=30))
    p = conjugate_gradient(lambda v: h @ v, rhs, 1e-12, 200)
    np.testing.assert_allclose(p.numpy(), np.linalg.solve(h.numpy(), rhs.numpy()), rtol=1e-8, atol=1e-10)


def test_conjugate_gradient_stays_out_of_a_null_space() -> None:
    """A singular H (like the logistic Hessian along a common shift of the biases) with a
    right-hand side orthogonal to its null space: the minimum-norm solution, no step into it."""
    h = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    p = conjugate_gradient(lambda v: h @ v, torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64), 1e-12, 10)
    assert p.tolist() == pytest.approx([2.0, 1.0, 0.0])


def test_newton_minimises_a_smooth_convex_function() -> None:
    """f(t) = sum(exp(t) - c t) + 0.5 ||t||^2 / 10 has its minimum where exp(t) + t / 10 = c."""
    c = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def loss_grad(t: torch.Tensor) -> tuple[float, torch.Tensor]:
        state["t"] = t
        return float((torch.exp(t) - c * t).sum() + 0.05 * (t * t).sum()), torch.exp(t) - c + 0.1 * t

    def hessp(v: torch.Tensor) -> torch.Tensor:
        return (torch.exp(state["t"]) + 0.1) * v

    t = newton_cg(loss_grad, hessp, torch.full((4,), 5.0, dtype=torch.float64), 1e-12, 100)
    assert float((torch.exp(t) + 0.1 * t - c).abs().max()) < 1e-12
    # the line search matters here: a full Newton step from t = 5 overshoots far below the minimum
    assert torch.isfinite(t).all()


def test_newton_stops_at_max_iter() -> None:
    """With the identity for a Hessian each Newton step is one conjugate-gradient product, so the
    products count the steps: exactly ``max_iter`` of them on a problem far from converged."""
    products = {"n": 0}

    def hessp(v: torch.Tensor) -> torch.Tensor:
        products["n"] += 1
        return v

    for max_iter in (0, 1, 3):
        products["n"] = 0
        t = newton_cg(lambda t: (float((t ** 4).sum()), 4 * t ** 3), hessp, torch.full((3,), 3.0, dtype=torch.float64),
                      1e-30, max_iter)
        assert products["n"] == max_iter
        assert (max_iter == 0) == bool((t == 3.0).all())
