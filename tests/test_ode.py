"""Probability-flow ODE log-likelihood against exact mixture densities."""

from __future__ import annotations

import pytest
import torch
from helpers import mixture_points

from scoredensity.mixtures import mixture_preset
from scoredensity.ode import ODESolverError, ode_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def test_exact_trace_d2_within_solver_tolerance():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 16)
    exact = gm.log_prob(x)
    loose = ode_log_likelihood(gm.eps, x, rtol=1e-4, atol=1e-4)
    tight = ode_log_likelihood(gm.eps, x, rtol=1e-7, atol=1e-7)
    err_loose = (loose.logp - exact).abs().max()
    err_tight = (tight.logp - exact).abs().max()
    # the error follows the tolerance: global error of a few hundred local steps at that tolerance (x |logp| ~ 5),
    # plus the prior's O(e^{lam_min/2}) misplacement (~1e-4 nats, see the ode module docstring)
    assert err_tight < 1e-4 + 300 * 1e-7 * 5
    assert err_loose < 300 * 1e-4 * 5
    assert err_tight < err_loose
    assert tight.nfe > loose.nfe
    assert (tight.stderr == 0).all() and tight.info["vjp"] == 2 * tight.nfe
    assert torch.allclose(tight.terms["prior"] + tight.terms["flow"], tight.logp)


def test_exact_trace_d20():
    gm = mixture_preset("anisotropic", d=20)
    x = mixture_points(gm, 6)
    est = ode_log_likelihood(gm.eps, x, rtol=1e-6, atol=1e-6)
    assert (est.logp - gm.log_prob(x)).abs().max() < 300 * 1e-6 * 30 + 1e-3


def test_hutchinson_unbiased_with_honest_stderr():
    gm = mixture_preset("anisotropic", d=20)
    x = mixture_points(gm, 6, seed=2)
    est = ode_log_likelihood(gm.eps, x, trace="hutchinson", n_probes=6, rtol=1e-5, atol=1e-5, seed=3)
    err = est.logp - gm.log_prob(x)
    assert (err.abs() <= 4 * est.stderr + 1e-2).all(), (err, est.stderr)
    assert (est.stderr > 0).all()
    one = ode_log_likelihood(gm.eps, x[:2], trace="hutchinson", probe="gaussian", n_probes=1, rtol=1e-4, atol=1e-4)
    assert torch.isnan(one.stderr).all()  # one probe: no estimate of the trace noise


def test_fixed_grid_same_call_count_for_any_input():
    gm = mixture_preset("ring8")
    a = ode_log_likelihood(gm.eps, mixture_points(gm, 8), steps=100)
    b = ode_log_likelihood(gm.eps, 3 * mixture_points(gm, 3, seed=9), steps=100)
    assert a.nfe == b.nfe == 4 * 100  # rk4: four stages per step, independent of the data
    assert (a.logp - gm.log_prob(mixture_points(gm, 8))).abs().max() < 1e-3
    euler = ode_log_likelihood(gm.eps, mixture_points(gm, 2), steps=10, method="euler")
    assert euler.nfe == 10 and euler.info["method"] == "euler"


def test_measures_the_model_not_the_data():
    data = mixture_preset("ring8")
    model = mixture_preset("blobs2d")
    x = mixture_points(data, 8)
    est = ode_log_likelihood(model.eps, x, rtol=1e-6, atol=1e-6)
    assert (est.logp - model.log_prob(x)).abs().max() < 1e-2
    assert (model.log_prob(x) - data.log_prob(x)).abs().min() > 1.0


def test_solver_failure_names_the_tolerance_and_does_not_hang():
    gm = mixture_preset("ring8")
    with pytest.raises(ODESolverError, match="rtol=1e-09"):
        ode_log_likelihood(gm.eps, mixture_points(gm, 4), rtol=1e-9, atol=1e-9, max_num_steps=5)

    def stiff(x_t, t):  # a wildly oscillating eps: the step size underflows or the step cap is hit
        return torch.sin(1e9 * x_t * t[:, None])

    with pytest.raises(ODESolverError, match="relax the tolerance"):
        ode_log_likelihood(stiff, mixture_points(gm, 2), max_num_steps=200)


def test_bad_input():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 3)
    bad = x.clone()
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        ode_log_likelihood(gm.eps, bad)
    with pytest.raises(ValueError, match="trace"):
        ode_log_likelihood(gm.eps, x, trace="approx")
    with pytest.raises(ValueError, match="rtol"):
        ode_log_likelihood(gm.eps, x, rtol=0.0)
    with pytest.raises(ValueError, match="method"):
        ode_log_likelihood(gm.eps, x, method="rk45")
    with pytest.raises(ValueError, match="steps"):
        ode_log_likelihood(gm.eps, x, steps=0)

    def nan_eps(x_t, t):
        return torch.full_like(x_t, float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        ode_log_likelihood(nan_eps, x)


def test_example_ids_key_the_probes():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 5)
    kw = {"trace": "hutchinson", "n_probes": 2, "steps": 20, "seed": 1}
    whole = ode_log_likelihood(gm.eps, x, **kw)
    part = ode_log_likelihood(gm.eps, x[1:3], example_ids=torch.tensor([1, 2]), **kw)
    assert torch.allclose(part.logp, whole.logp[1:3], atol=1e-10)
