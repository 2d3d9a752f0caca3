"""Score-regularised GANs: the regulariser's gradient against the exact mixture, metrics, training, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from scoredensity.apps.gan import gan_metrics, mmd2, regulariser_gradient, score_regulariser, train_gan
from scoredensity.mixtures import GaussianMixture, mixture_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _points(name: str, n: int = 5) -> torch.Tensor:
    """Points near and between the modes (as a generator in training would produce)."""
    gm = mixture_preset(name)
    g = torch.Generator().manual_seed(7)
    return gm.sample(n, generator=g) + 0.15 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_full_gradient_matches_autograd_of_exact_log_prob(name):
    gm = mixture_preset(name)
    x = _points(name)
    xr = x.clone().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(-gm.log_prob(xr).sum(), xr)
    value, value_se, grad, grad_se = regulariser_gradient(gm.eps, x, n_draws=4096, gradient="full", weighting="formula")
    # unbiased Monte Carlo estimates of -log p and -grad log p: within 5 standard errors (20 coordinates, 10 values)
    assert ((grad - exact_grad).abs() <= 5 * grad_se + 1e-8).all(), (grad - exact_grad) / grad_se
    assert ((value + gm.log_prob(x)).abs() <= 5 * value_se + 1e-8).all()
    assert (grad_se < 0.25 * exact_grad.norm(dim=1, keepdim=True)).all()  # the test has power


def test_shortcuts_are_biased_where_the_density_is_not_gaussian():
    """The score-distillation shortcut (Jacobian dropped) follows a smoothed density: measurably off on grid25."""
    gm = mixture_preset("grid25")
    x = _points("grid25")
    xr = x.clone().requires_grad_(True)
    (exact_grad,) = torch.autograd.grad(-gm.log_prob(xr).sum(), xr)
    _, _, grad, grad_se = regulariser_gradient(gm.eps, x, n_draws=4096, gradient="sds", weighting="formula")
    z = (grad - exact_grad) / grad_se
    assert z.abs().max() > 6
    # but it still points downhill on -log p (positive inner product with the exact gradient)
    assert ((grad * exact_grad).sum(1) > 0).all()


def _expected_regulariser(g, x: torch.Tensor, weighting: str, lam_min: float = -20.0, lam_max: float = 20.0):
    """For a Gaussian data law ``g``: the expectation of the regulariser's value, of its full gradient and of its
    sds gradient, by Gauss-Legendre quadrature in log-SNR of closed forms (independent of the estimator's draws).

    value = -(noisy_end + clean_end + ∫ w(lam) 1/2 [d sigmoid(lam) - E||z - eps||^2] dlam); the full gradient is
    its gradient; the sds gradient is sigmoid(lam_min) x + ∫ w(lam) a E[eps - z] dlam with
    E[eps - z] = a sqrt(t) S_t^{-1} (x - m), S_t = a^2 S + t I. w = 1 (formula) or c t (1 - t) (t_uniform, with
    ∫ w dlam = lam_max - lam_min).
    """
    import numpy as np

    from scoredensity.decoders import end_terms

    nodes, weights = np.polynomial.legendre.leggauss(400)
    half = (lam_max - lam_min) / 2
    lam = torch.from_numpy(lam_min + half * (nodes + 1))
    wq = torch.from_numpy(half * weights)
    t = torch.sigmoid(-lam)
    if weighting == "formula":
        w = torch.ones_like(lam)
    else:  # ∫ t (1 - t) dlam = t(lam_min) - t(lam_max)
        w = (lam_max - lam_min) * t * (1 - t) / (1 / (1 + math.exp(lam_min)) - 1 / (1 + math.exp(lam_max)))
    xr = x.detach().double().clone().requires_grad_(True)
    d = x.shape[1]
    err = torch.stack([g.expected_denoising_error(xr, tk.expand(len(x))) for tk in t])  # [nodes, B]
    integral = (wq * w)[:, None] * 0.5 * (d * torch.sigmoid(lam)[:, None] - err)
    noisy, clean = end_terms(xr, lam_min, lam_max)
    value = -(noisy + clean + integral.sum(0))
    (full,) = torch.autograd.grad(value.sum(), xr)
    m, cov = g.means[0], g.covs[0]
    a2 = torch.sigmoid(lam)
    q = sum(
        float(wq[i] * w[i] * a2[i] * t[i].sqrt()) * torch.linalg.inv(a2[i] * cov + t[i] * torch.eye(d, dtype=cov.dtype))
        for i in range(len(lam))
    )
    sds = torch.sigmoid(torch.tensor(lam_min, dtype=torch.float64)) * x.double() + (x.double() - m) @ q.T
    return value.detach(), full, sds


def test_surrogate_values_and_gradients_have_the_right_form():
    gm = mixture_preset("ring8")
    x = _points("ring8", 16).float().requires_grad_(True)
    for gradient in ("full", "sds"):
        for weighting in ("formula", "t_uniform"):
            v = score_regulariser(gm.eps, x, gradient=gradient, weighting=weighting, generator=torch.Generator())
            assert v.shape == (16,) and v.dtype == torch.float64 and torch.isfinite(v).all()
            (grad,) = torch.autograd.grad(v.mean(), x)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the values and gradients are the named estimators: on a correlated Gaussian, whose expectations are known in
    # closed form (a sign error, a wrong weight or a Jacobian kept/dropped by mistake fails); 5 standard errors
    g = GaussianMixture.gaussian(
        torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    )
    x = g.sample(6, generator=torch.Generator().manual_seed(3)) * 1.5
    for weighting in ("formula", "t_uniform"):
        value, full, sds = _expected_regulariser(g, x, weighting)
        if weighting == "formula":
            torch.testing.assert_close(value, -g.log_prob(x), rtol=0, atol=1e-6)  # the quadrature itself
        for gradient, want in (("full", full), ("sds", sds)):
            v, v_se, grad, grad_se = regulariser_gradient(
                g.eps, x, n_draws=16384, gradient=gradient, weighting=weighting
            )
            for z in ((v - value) / v_se, ((grad - want) / grad_se).flatten()):
                # each within 5 se, and jointly: sum of squared z-scores below chi2's 0.999 quantile (a small
                # systematic bias shared by all points fails here)
                assert (z.abs() <= 5).all() and float(z.pow(2).sum()) < chi2.ppf(0.999, z.numel()), (gradient, z)
        assert (full - sds).abs().max() > 0.1  # the two gradients differ here, so the test tells them apart


def test_metrics_on_real_and_collapsed_samples():
    gm = mixture_preset("grid25")
    real = gm.sample(2500, generator=torch.Generator().manual_seed(0))
    m = gan_metrics(real, gm)
    assert m["modes_covered"] == 25 and m["high_quality"] > 0.98 and m["mode_kl"] < 0.05
    collapsed = gm.means[:1].expand(2500, 2) + 0.01 * torch.randn(2500, 2, dtype=torch.float64)
    mc = gan_metrics(collapsed, gm)
    assert mc["modes_covered"] == 1 and mc["high_quality"] == 1.0
    # collapsing onto a mode lowers the cross-entropy but not the kernel distance: why both are reported
    assert mc["cross_entropy"] < m["cross_entropy"] and mc["mmd2"] > 10 * abs(m["mmd2"]) + 0.01
    assert abs(mmd2(real[:1000], real[1000:2000])) < 0.01


def test_train_gan_short_run_records_the_regulariser():
    kw = dict(preset="ring8", steps=30, batch=64, hidden=32, depth=2, log_every=10)
    res = train_gan(reg_coef=0.1, **kw)
    assert len(res.history) == 4 and all(h["reg"] != 0 for h in res.history)
    x = res.sample(100)
    assert x.shape == (100, 2) and torch.isfinite(x).all()
    # the regulariser is in the generator's loss: the same seed without it trains a different generator
    plain = train_gan(reg_coef=0.0, **kw)
    assert all(h["reg"] == 0 for h in plain.history)
    assert plain.history[0]["d_loss"] == res.history[0]["d_loss"]  # same start
    diffs = [
        (p - q).abs().max().detach()
        for p, q in zip(res.generator.parameters(), plain.generator.parameters(), strict=True)
    ]
    assert max(float(v) for v in diffs) > 1e-4


def test_bad_input():
    gm = mixture_preset("ring8")
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="gradient"):
        score_regulariser(gm.eps, x, gradient="jacobian")
    with pytest.raises(ValueError, match="weighting"):
        score_regulariser(gm.eps, x, weighting="snr")
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"generated samples x contains NaN or Inf in rows \[1\]"):
        score_regulariser(gm.eps, x)
    with pytest.raises(ValueError, match="loss"):
        train_gan(steps=1, loss="wgan")
    with pytest.raises(ValueError, match="dimension"):
        gan_metrics(torch.zeros(10, 3), gm)


def test_cli_gan(tmp_path, capsys):
    import json

    from scoredensity.cli import main

    rc = main(["gan", "--steps", "5", "--batch", "32", "--reg-coef", "0.1", "--out", str(tmp_path), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["metrics"]) == {"modes_covered", "high_quality", "mode_kl", "cross_entropy", "mmd2"}
    assert (tmp_path / "samples.png").exists() and (tmp_path / "gan.json").exists()
    assert main(["gan", "--steps", "5", "--preset", "nope", "--out", str(tmp_path)]) == 2


def test_cli_gan_with_a_trained_denoiser(tmp_path, capsys):
    import json

    from scoredensity.cli import main

    run_dir = tmp_path / "run"
    args = ["train", "--data", "ring8", "--steps", "20", "--out", str(run_dir), "--hidden", "16", "--blocks", "1"]
    assert main(args + ["--eval-n", "8", "--no-progress", "--threads", "1"]) == 0
    out = tmp_path / "gan"
    assert (
        main(
            ["gan", "--steps", "5", "--batch", "32", "--reg-coef", "0.1", "--denoiser", str(run_dir), "--out", str(out)]
        )
        == 0
    )
    assert "'ring8'" not in capsys.readouterr().err  # no data mismatch warning
    assert (out / "gan.json").exists()
    # the trained network is the regulariser's denoiser: the same seed with the exact eps computes another value
    # of the regulariser on the same first batch (the generators start equal)
    exact = tmp_path / "gan_exact"
    assert main(["gan", "--steps", "5", "--batch", "32", "--reg-coef", "0.1", "--out", str(exact)]) == 0
    doc, ref = (json.loads((p / "gan.json").read_text()) for p in (out, exact))
    assert doc["denoiser"] == str(run_dir) and ref["denoiser"] == "exact"
    assert doc["history"][0]["d_loss"] == ref["history"][0]["d_loss"]
    assert abs(doc["history"][0]["reg"] - ref["history"][0]["reg"]) > 1e-3
