"""Certifying ELBO training: the continuous elbo loss is -E log p_theta for an exact denoiser family, so its fit
lands on the maximum-likelihood (EM) fit; the discrete DDPM ELBO weights are Riemann sums of the formula's."""

import math

import pytest
import torch

from scoredensity.apps.certify import (
    certify_mixture,
    continuous_elbo_objective,
    ddpm_elbo_objective,
    ddpm_step_weights,
    fit_em,
    fit_objective,
    kmeans_init,
    match_components,
    parameter_distance,
    pilot_proposal,
)
from scoredensity.apps.parametric import ParametricMixture
from scoredensity.mixtures import GaussianMixture
from scoredensity.schedules import DDPMSchedule, VPLinearClock


def _separated() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.25]]], dtype=torch.float64
    )
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


@pytest.fixture(scope="module")
def data():
    gm = _separated()
    x = gm.sample(600, generator=torch.Generator().manual_seed(1))
    em = fit_em(x, 3, n_init=4)
    return gm, x, em


def test_fixed_large_weights_are_a_riemann_sum_of_the_formula():
    """w_k = b_k / (2 a_k t_k) is the formula's 1/2 dlam over step k, to first order (Li & Yan 2024, §4.1)."""
    sched = DDPMSchedule.from_clock(VPLinearClock(), 1000)
    w, _, t = ddpm_step_weights(sched, "fixed_large", 2)
    lam = torch.log1p(-t) - torch.log(t)
    half_dlam = 0.5 * (lam[:-1] - lam[1:])  # steps k = 2..T
    rel_step = (t[1:] - t[:-1]) / (t[1:] * (1 - t[:-1]))  # the step in units of its own scale
    ratio = w[1:] / half_dlam
    assert ((ratio - 1).abs() < rel_step).all()  # first-order agreement at every step
    assert (rel_step[100:] < 0.025).all()  # and the steps are fine except the first few
    ws, _, _ = ddpm_step_weights(sched, "fixed_small", 2)
    assert (ws[1:] > w[1:]).all()  # fixed_small weights b_k / (2 a_k t_{k-1}) are larger


def test_continuous_loss_equals_minus_log_likelihood_at_any_theta(data):
    """E L(theta) = -(1/N) sum log p_theta(x_i) for every member: z-scores over independent draws."""
    gm, x, em = data
    xs = x[:200]
    perturbed = GaussianMixture(em.means + 0.3, em.covs * 1.5, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    for member in (em, perturbed):
        pm = ParametricMixture.from_mixture(member)
        exact = float(-member.log_prob(xs).mean())
        with torch.no_grad():
            vals = torch.tensor([float(continuous_elbo_objective(xs, n_t=16, seed=s)(pm)) for s in range(8)])
        se = float(vals.std() / math.sqrt(len(vals)))
        assert abs(float(vals.mean()) - exact) < 4 * se + 1e-6, (float(vals.mean()), exact, se)


def test_ddpm_objective_gap_shrinks_with_steps_for_fixed_large(data):
    gm, x, _ = data
    pm = ParametricMixture.from_mixture(gm)
    exact = float(-gm.log_prob(x).mean())
    gaps = {}
    with torch.no_grad():
        for big_t in (10, 1000):
            vals = torch.tensor(
                [float(ddpm_elbo_objective(x, num_steps=big_t, n_z=2, antithetic=True, seed=s)(pm)) for s in range(4)]
            )
            gaps[big_t] = (float(vals.mean()) - exact, float(vals.std() / 2))
    # the T = 10 chain's bound is clearly looser than the T = 1000 one
    assert gaps[10][0] - abs(gaps[1000][0]) > 4 * math.hypot(gaps[10][1], gaps[1000][1])


def test_continuous_fit_lands_on_the_em_fit(data):
    """Sharp test: the continuous elbo fit equals the MLE up to the Monte Carlo error of its fixed draws.

    Stated tolerance: excess training NLL below a quarter of the statistical resolution p/(2N) of the data (the
    expected excess test NLL of the MLE itself), means within 0.06 (the MLE's own standard error for these
    components is about 0.03), weights within 0.02.
    """
    gm, x, em = data
    init = kmeans_init(x, 3, seed=0)
    prop = pilot_proposal(init, x[:256], seed=5)
    obj = continuous_elbo_objective(x, n_t=32, n_z=2, antithetic=True, proposal=prop, seed=0)
    res = fit_objective(init, obj, max_iter=200)
    assert res["grad_norm"] < 1e-4
    fit = init.to_mixture()
    excess = float((em.log_prob(x) - fit.log_prob(x)).mean())
    p = 3 * 2 + 3 * 3 + 2
    assert -1e-6 < excess < p / (2 * len(x)) / 4
    dist = parameter_distance(em, fit)
    assert dist["mean"] < 0.06 and dist["weight"] < 0.02 and dist["cov"] < 0.06, dist


def test_certify_report_runs_and_ddpm_fits_are_judged(data):
    gm, x, _ = data
    x_test = gm.sample(300, generator=torch.Generator().manual_seed(9))
    rep = certify_mixture(x[:300], x_test, 3, steps=(10,), variances=("fixed_large",), n_init=2, eval_seeds=2)
    names = [(r.method, r.steps, r.variance) for r in rep.rows]
    assert names == [("em", None, None), ("continuous", None, None), ("ddpm", 10, "fixed_large")]
    for r in rep.rows:
        assert r.excess_train > -1e-6  # nothing beats the MLE on its own training data
    assert "claim" in rep.verdict and "T=10" in rep.verdict
    assert "| ddpm | 10 | fixed_large |" in rep.table()


def test_label_switching_is_undone():
    gm = _separated()
    perm = torch.tensor([2, 0, 1])
    other = GaussianMixture(gm.means[perm], gm.covs[perm], gm.weights[perm])
    assert parameter_distance(gm, other) == {"mean": 0.0, "cov": 0.0, "weight": 0.0}
    assert list(match_components(gm, other)) == [1, 2, 0]


def test_bad_input():
    x = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="even n_t"):
        continuous_elbo_objective(x, n_t=5)
    with pytest.raises(ValueError, match="variance must be"):
        ddpm_elbo_objective(x, num_steps=10, variance="learned")
    with pytest.raises(ValueError, match="num_steps"):
        ddpm_elbo_objective(x, num_steps=1)
    with pytest.raises(ValueError, match="antithetic"):
        ddpm_elbo_objective(x, num_steps=10, n_z=3, antithetic=True)
    bad = x.clone()
    bad[7, 1] = math.nan
    with pytest.raises(ValueError, match=r"rows \[7\]"):
        continuous_elbo_objective(bad)
    with pytest.raises(ValueError, match="N >= 2"):
        fit_em(torch.zeros(5), 2)


def test_certify_cli(tmp_path, capsys):
    import json

    from scoredensity.cli import main

    args = ["certify", "--data", "blobs2d", "--n", "200", "--steps", "10", "--variances", "fixed_large"]
    assert main([*args, "--n-init", "1", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in out["rows"]] == ["em", "continuous", "ddpm"]
    assert (tmp_path / "certify_gap.png").stat().st_size > 0 and "claim" in out["verdict"]
    assert main(["certify", "--data", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown data" in capsys.readouterr().err
    assert main(["certify", "--steps", "1", "--out", str(tmp_path)]) == 2


def test_ddpm_objective_matches_the_ddpm_elbo_estimator(data):
    """Two independent implementations of the DDPM ELBO (this training loss and scoredensity.ddpm.ddpm_elbo) agree
    at the exact eps, for both reverse variances, within their Monte Carlo errors."""
    from scoredensity.ddpm import ddpm_elbo

    gm, x, _ = data
    xs = x[:200]
    pm = ParametricMixture.from_mixture(gm)
    for big_t in (10, 100):
        sched = DDPMSchedule.from_clock(VPLinearClock(), big_t)
        for var in ("fixed_large", "fixed_small"):
            ref = ddpm_elbo(gm.eps, xs, schedule=sched, variance=var, decoder_draws=4, seed=1)
            with torch.no_grad():
                vals = torch.tensor(
                    [float(ddpm_elbo_objective(xs, num_steps=big_t, variance=var, seed=s)(pm)) for s in range(4)]
                )
            mine, mine_se = float(vals.mean()), float(vals.std() / 2)
            assert abs(mine + ref.mean()) < 4 * math.hypot(mine_se, ref.mean_stderr()) + 1e-6, (big_t, var)


def test_neural_training_losses_run_and_decrease():
    from scoredensity.apps.certify import denoising_loss, train_denoiser
    from scoredensity.nets import MLPDenoiser

    gm = _separated()
    x = gm.sample(512, generator=torch.Generator().manual_seed(3))
    # each loss is the objective it names: with the exact eps, the elbo and ddpm losses are unbiased for the exact
    # NLL of the batch (T = 1000 fixed_large: gap ~1e-3 nats), L_simple for a per-dimension error below 1
    nll = float(-gm.log_prob(x).mean())
    for loss in ("elbo", "ddpm", "simple"):
        v = torch.tensor([float(denoising_loss(gm.eps, x, loss, seed=s)) for s in range(20)])
        m, se = float(v.mean()), float(v.std()) / math.sqrt(len(v))
        if loss == "simple":
            assert m + 4 * se < 1.0, (m, se)
        else:
            assert abs(m - nll) < 4 * se, (loss, m, se, nll)
    for loss in ("elbo", "ddpm", "simple"):
        torch.manual_seed(0)
        net = MLPDenoiser((2,), hidden=32, blocks=1, emb_dim=16, data_std=float(x.std()))
        hist = torch.tensor(train_denoiser(net, x, loss, steps=60, batch_size=128, lr=3e-3))
        assert torch.isfinite(hist).all()
        assert hist[-15:].mean() < hist[:15].mean(), loss
    with pytest.raises(ValueError, match="loss must be"):
        train_denoiser(net, x, "vlb", steps=1)
