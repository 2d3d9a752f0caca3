"""Score-regularised GANs: the regulariser's gradient against the exact mixture, metrics, training, bad input."""

from __future__ import annotations

import pytest
import torch

from scoredensity.apps.gan import gan_metrics, mmd2, regulariser_gradient, score_regulariser, train_gan
from scoredensity.mixtures import mixture_preset

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


def test_surrogate_values_and_gradients_have_the_right_form():
    gm = mixture_preset("ring8")
    x = _points("ring8", 16).float().requires_grad_(True)
    for gradient in ("full", "sds"):
        for weighting in ("formula", "t_uniform"):
            v = score_regulariser(gm.eps, x, gradient=gradient, weighting=weighting, generator=torch.Generator())
            assert v.shape == (16,) and v.dtype == torch.float64 and torch.isfinite(v).all()
            (g,) = torch.autograd.grad(v.mean(), x)
            assert torch.isfinite(g).all() and g.abs().sum() > 0


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
    res = train_gan(preset="ring8", steps=30, batch=64, hidden=32, depth=2, reg_coef=0.1, log_every=10)
    assert len(res.history) == 4 and all(h["reg"] != 0 for h in res.history)
    x = res.sample(100)
    assert x.shape == (100, 2) and torch.isfinite(x).all()


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
