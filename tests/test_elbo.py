"""Divergence-form continuous ELBO: exact for the exact eps, the same number as the density formula."""

from __future__ import annotations

import pytest
import torch
from helpers import mixture_points

from scoredensity.elbo import elbo
from scoredensity.formula import log_density
from scoredensity.mixtures import GaussianMixture, mixture_preset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def _within(est, exact, k: float = 4.0) -> None:
    """Per example within k standard errors, and the batch mean within k standard errors of the mean."""
    err = est.logp - exact
    assert (err.abs() <= k * est.stderr + 1e-6).all(), (err, est.stderr)
    assert abs(float(err.mean())) <= k * est.mean_stderr() + 1e-6


@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "exact"])
def test_exact_for_exact_eps_d2(probe):
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 16)
    est = elbo(gm.eps, x, n_t=128, probe=probe, seed=0)
    _within(est, gm.log_prob(x))
    assert est.method == f"elbo-div-{probe}"
    assert torch.allclose(est.terms["noisy_end"] + est.terms["integral"] + est.terms["clean_end"], est.logp)


def test_exact_for_exact_eps_d20():
    gm = mixture_preset("anisotropic", d=20)
    x = mixture_points(gm, 8)
    est = elbo(gm.eps, x, n_t=256, probe="rademacher", seed=0)
    _within(est, gm.log_prob(x))


@pytest.mark.parametrize("name,kw", [("ring8", {}), ("anisotropic", {"d": 20})])
def test_agrees_with_the_density_formula_within_joint_stderr(name, kw):
    gm = mixture_preset(name, **kw)
    x = mixture_points(gm, 12, seed=5)
    a = elbo(gm.eps, x, n_t=256, seed=1)
    b = log_density(gm.eps, x, n_t=256, seed=2)
    joint = (a.stderr**2 + b.stderr**2).sqrt()
    assert ((a.logp - b.logp).abs() <= 4 * joint).all(), (a.logp - b.logp, joint)


def test_without_variance_reduction_still_unbiased_but_noisier():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 16)
    plain = elbo(gm.eps, x, n_t=128, importance="uniform", control_variate=None, seed=3)
    _within(plain, gm.log_prob(x))
    reduced = elbo(gm.eps, x, n_t=128, seed=3)
    # the control variate and the importance proposal exist to cut the noise of the noisy end
    assert reduced.stderr.mean() < 0.5 * plain.stderr.mean()


def test_measures_the_model_not_the_data():
    data = mixture_preset("ring8")
    model = mixture_preset("blobs2d")
    x = mixture_points(data, 12)
    est = elbo(model.eps, x, n_t=128, seed=0)
    _within(est, model.log_prob(x))
    assert (model.log_prob(x) - data.log_prob(x)).abs().min() > 1.0  # the two densities really differ there


def test_independent_of_chunking_and_seeded():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 5)
    a = elbo(gm.eps, x, n_t=32, seed=4)
    b = elbo(gm.eps, x, n_t=32, seed=4, max_batch=7)
    assert torch.allclose(a.logp, b.logp, atol=1e-10)
    c = elbo(gm.eps, x, n_t=32, seed=5)
    assert not torch.allclose(a.logp, c.logp)
    assert a.nfe == 32 + 16 * 5 / 5  # n_t draws plus the shared pilot (16 nodes on each of the 5 examples)
    assert a.info["vjp"] == a.nfe  # one Rademacher probe: one vjp per call


def test_float32_inputs_work():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 6).float()
    est = elbo(gm.eps, x, n_t=64, seed=0)
    assert est.logp.dtype == torch.float64
    _within(est, gm.log_prob(x.double()), k=5.0)


def test_bad_input():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 4)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        elbo(gm.eps, bad)
    with pytest.raises(ValueError, match="n_t"):
        elbo(gm.eps, x, n_t=33)
    with pytest.raises(ValueError, match="probe"):
        elbo(gm.eps, x, probe="sobol")
    with pytest.raises(ValueError, match="lam_min"):
        elbo(gm.eps, x, lam_min=5.0, lam_max=-5.0)
    with pytest.raises(ValueError, match="importance"):
        elbo(gm.eps, x, importance="magic")
    with pytest.raises(ValueError, match="shape"):
        elbo(lambda x_t, t: x_t[:, :1], x)


def test_compare_runs_every_estimator_and_writes_json_and_png(tmp_path, capsys):
    import json

    from scoredensity.cli import main
    from scoredensity.commands.compare import compare_estimators, default_suite

    families = {s.family for s in default_suite(2)}
    assert {
        "formula",
        "elbo-div-rademacher",
        "elbo-div-exact",
        "ode-exact",
        "ode-hutchinson",
        "ddpm-fixed_large",
    } <= families
    rc = main(["compare", "--preset", "ring8", "--n", "6", "--level", "quick", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "|gap|/dim" in printed and "ode-exact" in printed
    result = json.loads((tmp_path / "compare.json").read_text())
    assert {r["family"] for r in result["rows"]} == families
    assert (tmp_path / "compare.png").stat().st_size > 1000
    ode = next(r for r in result["rows"] if r["family"] == "ode-exact")
    assert ode["abs_err_per_dim"] < 0.05 and ode["vjp"] == 2 * ode["nfe"]
    # without an exact value (a trained model): no gap columns, no plot needed
    gm = mixture_preset("ring8")
    res = compare_estimators(gm.eps, mixture_points(gm, 3), None, suite=default_suite(2, "quick")[:1])
    assert "abs_err" not in res["rows"][0]
    with pytest.raises(ValueError, match="exact_logp"):
        compare_estimators(gm.eps, mixture_points(gm, 3), torch.zeros(2), suite=default_suite(2, "quick")[:1])


def test_example_ids_make_batches_reproduce_the_whole():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 6)
    kw = {"n_t": 16, "importance": "uniform", "control_variate": "prior", "seed": 2}
    whole = elbo(gm.eps, x, **kw)
    part = elbo(gm.eps, x[3:5], example_ids=torch.tensor([3, 4]), **kw)
    assert torch.allclose(part.logp, whole.logp[3:5], atol=1e-10)
    with pytest.raises(ValueError, match="example_ids"):
        elbo(gm.eps, x, example_ids=torch.arange(5), **kw)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_stderr_is_honest(probe):
    # z-scores (estimate - exact) / stderr over many points have unit spread when the standard errors are honest
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 200, seed=3)
    est = elbo(gm.eps, x, n_t=64, probe=probe, seed=1)
    z = (est.logp - gm.log_prob(x)) / est.stderr
    assert 0.8 < float(z.std()) < 1.25
    assert abs(float(z.mean())) < 4 / 200**0.5


def test_closed_form_prior_control_variate_matches_the_gaussian():
    from scoredensity.mixtures import StandardNormal as _StdNormal

    g = GaussianMixture.gaussian(torch.zeros(3), torch.eye(3))
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(_StdNormal.eps(x, t), g.eps(x, t))
    assert torch.allclose(_StdNormal.expected_denoising_error(x, t), g.expected_denoising_error(x, t))
