"""The diffusion classifier against the exact Bayes classifier of a mixture whose classes are its components."""

import math

import pytest
import torch

from scoredensity.apps.classifier import (
    MixtureClassConditional,
    bayes_log_posterior,
    classify,
    confusion_matrix,
    expected_calibration_error,
)
from scoredensity.mixtures import GaussianMixture
from scoredensity.nets import MLPDenoiser
from scoredensity.schedules import DDPMSchedule, linear_betas


def _overlapping() -> GaussianMixture:
    """Three overlapping 2-D components: the Bayes classifier is right on about 88% of points."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, 0.0], [0.0, 0.4]]], dtype=torch.float64
    )
    return GaussianMixture(means, covs, torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64))


@pytest.fixture(scope="module")
def setup():
    gm = _overlapping()
    x, y = gm.sample(2000, generator=torch.Generator().manual_seed(0), return_labels=True)
    return gm, x, y, MixtureClassConditional(gm), bayes_log_posterior(gm, x)


def test_log_odds_have_honest_z_scores(setup):
    gm, x, _, model, bayes = setup
    res = classify(model, x, log_prior=gm.weights.log(), budget=3 * 256, eliminate=False)
    z = []
    for a, b in ((1, 0), (2, 0), (2, 1)):
        lo, se = res.log_odds(a, b)
        z.append((lo - (bayes[:, a] - bayes[:, b])) / se)
    z = torch.cat(z)
    assert abs(float(z.mean())) < 4 / math.sqrt(len(z))  # unbiased (the z's of one point are correlated: loose)
    assert 0.85 < float(z.std()) < 1.2  # the standard errors are honest
    assert float((z.abs() > 4).double().mean()) < 0.005
    # the posterior's own standard errors are consistent too
    zp = (res.log_posterior - bayes) / res.stderr.clamp_min(1e-12)
    assert 0.8 < float(zp[res.stderr > 1e-6].std()) < 1.25


def test_agrees_with_bayes_decisions_with_adaptive_elimination(setup):
    gm, x, y, model, bayes = setup
    budget = 3 * 256
    res = classify(model, x, log_prior=gm.weights.log(), budget=budget)
    agree = float((res.prediction == bayes.argmax(1)).double().mean())
    assert agree >= 0.99, agree
    # elimination spends far less than the budget on clear-cut points
    assert float(res.nfe.mean()) < 0.5 * budget
    assert (res.nfe <= budget + res.info["pilot_calls"] / len(x) + 1e-9).all()
    assert (res.rounds.min(1).values < res.rounds.max(1).values).any()
    probs = res.probabilities()
    assert torch.allclose(probs.sum(1), torch.ones(len(x), dtype=torch.float64), atol=1e-9)
    assert expected_calibration_error(probs, y, res.classes) < 0.05


def test_common_random_numbers_and_antithetic_draws_reduce_log_odds_variance(setup):
    gm, x, _, model, _ = setup
    xs = x[:300]
    kw = dict(log_prior=gm.weights.log(), budget=3 * 64, eliminate=False, importance="uniform")
    var = {}
    for crn in (True, False):
        for anti in (True, False):
            res = classify(model, xs, common_random_numbers=crn, antithetic=anti, **kw)
            var[crn, anti] = float(res.log_odds(1, 0)[1].pow(2).mean())
    assert var[True, True] < var[True, False] and var[True, True] < var[False, True]


def test_results_do_not_depend_on_chunking(setup):
    gm, x, _, model, _ = setup
    kw = dict(budget=3 * 64, seed=3)
    a = classify(model, x[:20], chunk_size=37, **kw)
    b = classify(model, x[:20], chunk_size=100000, **kw)
    assert torch.allclose(a.log_likelihood, b.log_likelihood, atol=1e-10)


def test_uniform_weighting_runs(setup):
    gm, x, y, model, _ = setup
    res = classify(model, x[:200], weighting="uniform", budget=3 * 64)
    assert res.log_posterior.shape == (200, 3) and res.weighting == "uniform"
    cm = confusion_matrix(y[:200], res.prediction, res.classes)
    assert int(cm.sum()) == 200 and cm.trace() > 100
    # the score is what it says: minus the unweighted denoising error averaged over DDPM's 1000 linear-schedule
    # steps, known in closed form for each class's Gaussian (formula weights would be off by ~4 nats)
    times = DDPMSchedule(linear_betas(1000)).times
    for c in range(3):
        g = GaussianMixture.gaussian(gm.means[c], gm.covs[c])
        exact = torch.stack([g.expected_denoising_error(x[:200], t.expand(200)) for t in times]).mean(0)
        diff = res.log_likelihood[:, c] + exact
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(200), (c, float(diff.mean()))


def test_bad_input(setup):
    gm, x, _, model, _ = setup
    with pytest.raises(ValueError, match=r"outside the trained classes 0\.\.2"):
        classify(model, x[:5], classes=[0, 3])
    with pytest.raises(ValueError, match="one entry per class"):
        classify(model, x[:5], log_prior=torch.log(torch.tensor([0.5, 0.5])))
    with pytest.raises(ValueError, match="normalised"):
        classify(model, x[:5], log_prior=torch.zeros(3))
    with pytest.raises(ValueError, match="does not accept class labels"):
        classify(gm.eps, x[:5], classes=[0, 1, 2])
    with pytest.raises(ValueError, match="unconditional model"):
        classify(lambda x_t, t, y=None: gm.eps(x_t, t), x[:5], classes=[0, 1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        classify(MLPDenoiser((2,), hidden=16, blocks=1, emb_dim=8, num_classes=0), x[:5].float())
    with pytest.raises(ValueError, match="below one round"):
        classify(model, x[:5], budget=10)
    with pytest.raises(ValueError, match="weighting"):
        classify(model, x[:5], weighting="snr")
    bad = x[:5].clone()
    bad[2, 0] = math.nan
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        classify(model, bad)
    with pytest.raises(ValueError, match="labels must be"):
        model(x[:2], torch.full((2,), 0.5, dtype=torch.float64), y=torch.tensor([0, 7]))


def test_conditional_network_is_accepted():
    torch.manual_seed(0)
    net = MLPDenoiser((2,), hidden=16, blocks=1, emb_dim=8, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():  # an untrained net's zero-initialised layers would ignore the label
            p.normal_(0, 0.3)
    x = torch.randn(6, 2)
    res = classify(net, x, budget=3 * 32, importance="uniform")
    assert res.classes == [0, 1, 2] and res.prediction.shape == (6,)
    with pytest.raises(ValueError, match="outside the trained classes"):
        classify(net, x, classes=[1, 3])


def test_classify_cli(tmp_path, capsys):
    """`scoredensity classify DIR` on a (briefly trained) conditional digits run; an unconditional run is refused."""
    import json

    from scoredensity.cli import main

    cond = tmp_path / "cond"
    args = ["train", "--data", "digits", "--net", "mlp", "--hidden", "32", "--blocks", "1", "--steps", "3"]
    args += ["--eval-n", "0", "--no-progress", "--batch-size", "16"]
    assert main([*args, "--conditional", "--out", str(cond)]) == 0
    capsys.readouterr()
    png = tmp_path / "cm.png"
    assert main(["classify", str(cond), "--n", "12", "--budget", "640", "--out", str(png), "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out.strip().splitlines()[-1])
    # stderr is a log here (not a terminal): like train, gan and certify it says what it does and when it is done
    assert "classify: 12 test examples x 10 classes, budget 640" in cap.err and "classify: done in" in cap.err
    assert out["n"] == 12 and 0 <= out["accuracy"] <= 1 and 0 <= out["ece"] <= 1
    assert sum(map(sum, out["confusion"])) == 12 and png.stat().st_size > 0
    uncond = tmp_path / "uncond"
    assert main([*args, "--out", str(uncond)]) == 0
    capsys.readouterr()
    assert main(["classify", str(uncond), "--n", "4"]) == 2
    assert "unconditional" in capsys.readouterr().err
