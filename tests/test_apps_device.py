"""Applications on an explicit device: classify, the GAN regulariser and the diffusion-loss head compute where their
inputs live (``device="cpu"`` here, plus CUDA when one is present), draw through :mod:`scoredensity.rng` so that
results do not depend on ``max_batch`` or on the batch, and return results without autograd history."""

from __future__ import annotations

import math

import pytest
import torch

from scoredensity.apps.classifier import MixtureClassConditional, classify, confusion_matrix
from scoredensity.apps.diffusion_loss import DiffusionLoss
from scoredensity.apps.gan import GANConfig, regulariser_gradient, score_regulariser, train_gan
from scoredensity.mixtures import GaussianMixture, mixture_preset
from scoredensity.nets import MLPDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _three_classes() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, 0.0], [0.0, 0.4]]], dtype=torch.float64
    )
    return GaussianMixture(means, covs, torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64))


def _plain(t: torch.Tensor, device: str = "cpu") -> bool:
    """A result tensor a user can keep: on ``device``, no autograd history, not an inference-mode tensor."""
    return t.device == torch.device(device) and not t.requires_grad and not torch.is_inference(t)


class _DeviceSpy:
    """Wraps a class-conditional model and records the devices and dtypes of what it is called with."""

    def __init__(self, model):
        self.model, self.num_classes, self.seen = model, model.num_classes, set()

    def __call__(self, x_t, t, y=None):
        self.seen.add((x_t.device.type, t.device.type, t.dtype, None if y is None else y.device.type))
        return self.model(x_t, t, y=y)


# ------------------------------------------------------------------------------------------------ classify
@pytest.mark.parametrize("device", DEVICES)
def test_classify_runs_on_the_device_and_does_not_depend_on_max_batch(device):
    gm = _three_classes()
    x = gm.sample(40, generator=torch.Generator().manual_seed(0)).to(device)
    spy = _DeviceSpy(MixtureClassConditional(gm))
    kw = dict(log_prior=gm.weights.log(), budget=3 * 64, seed=4)
    a = classify(spy, x, max_batch=7, **kw)
    b = classify(MixtureClassConditional(gm), x, max_batch=100_000, **kw)
    # every network call saw the data's device, with float64 t
    assert spy.seen == {(torch.device(device).type,) * 2 + (torch.float64, torch.device(device).type)}
    # keyed draws: the same figures whatever the rows per call (exact mixture eps: row-wise arithmetic)
    for name in ("log_likelihood", "log_posterior", "covariance", "stderr"):
        va, vb = getattr(a, name), getattr(b, name)
        assert torch.allclose(va, vb, rtol=1e-12, atol=1e-12), name
    assert torch.equal(a.rounds, b.rounds) and torch.equal(a.prediction, b.prediction)
    for name in ("log_likelihood", "log_posterior", "covariance", "stderr", "prediction", "rounds", "nfe"):
        assert _plain(getattr(a, name)), name
    assert a.info["device"] == str(torch.device(device)) and a.info["max_batch"] == 7
    # results in place are allowed (not inference tensors)
    a.log_posterior.add_(0.0)


def test_classify_draws_are_keyed_by_example():
    """The classifier's nodes are keyed by the example: the same example classified alone or inside a batch gets
    the same figures (uniform proposal: no shared pilot)."""
    gm = _three_classes()
    x = gm.sample(12, generator=torch.Generator().manual_seed(1))
    kw = dict(budget=3 * 32, eliminate=False, importance="uniform", seed=9, check_conditional=False)
    full = classify(MixtureClassConditional(gm), x, **kw)
    first = classify(MixtureClassConditional(gm), x[:1], **kw)
    assert torch.allclose(full.log_likelihood[:1], first.log_likelihood, rtol=1e-12, atol=1e-12)
    # ... and a different seed moves them (the key reaches the draws)
    other = classify(MixtureClassConditional(gm), x[:1], **{**kw, "seed": 10})
    assert not torch.allclose(other.log_likelihood, first.log_likelihood)


@pytest.mark.parametrize("device", DEVICES)
def test_classify_on_a_trainable_network_keeps_no_graph(device):
    torch.manual_seed(0)
    net = MLPDenoiser((2,), hidden=16, blocks=1, emb_dim=8, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():  # an untrained net's zero-initialised layers would ignore the label
            p.normal_(0, 0.3)
    net = net.to(device)
    assert all(p.requires_grad for p in net.parameters())
    x = torch.randn(6, 2).to(device)
    res = classify(net, x, budget=3 * 32, importance="uniform", max_batch=16)
    for name in ("log_likelihood", "log_posterior", "covariance", "stderr", "nfe"):
        assert _plain(getattr(res, name)), name
    assert all(p.grad is None for p in net.parameters())
    assert torch.isfinite(res.log_posterior).all()


@pytest.mark.parametrize("device", DEVICES)
def test_confusion_matrix_counts_pairs_without_a_loop(device):
    """Vectorised counts equal a direct count; labels outside ``classes`` (either side) are not counted."""
    g = torch.Generator().manual_seed(0)
    y, p = torch.randint(0, 8, (400,), generator=g), torch.randint(0, 8, (400,), generator=g)
    classes = [3, 1, 7]
    cm = confusion_matrix(y.to(device), p.to(device), classes)
    assert cm.device.type == "cpu"
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            assert int(cm[i, j]) == int(((y == a) & (p == b)).sum())
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix(y, p[:-1], classes)


# ------------------------------------------------------------------------------------------------ GAN
def _points(n: int = 6) -> torch.Tensor:
    gm = mixture_preset("ring8")
    g = torch.Generator().manual_seed(7)
    return gm.sample(n, generator=g) + 0.15 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gradient", ["full", "sds"])
def test_regulariser_gradient_does_not_depend_on_max_batch(device, gradient):
    gm = mixture_preset("ring8").to(device)
    x = _points().to(device)
    kw = dict(n_z=48, seed=3, gradient=gradient)
    a = regulariser_gradient(gm.eps, x, max_batch=5, **kw)
    b = regulariser_gradient(gm.eps, x, max_batch=4096, **kw)
    for va, vb in zip(a, b, strict=True):
        assert _plain(va) and torch.allclose(va, vb, rtol=1e-12, atol=1e-12)
    c = regulariser_gradient(gm.eps, x, max_batch=4096, **{**kw, "seed": 4})
    assert not torch.allclose(a[0], c[0])  # the seed reaches the draws


def test_regulariser_gradient_on_a_float32_network_in_bf16():
    """A trainable float32 denoiser gets float32 inputs; bf16 autocast of it moves the estimates of -log p and its
    gradient by less than their standard errors (same keyed draws); the network's parameters get no gradient."""
    torch.manual_seed(0)
    net = MLPDenoiser((2,), hidden=32, blocks=1, emb_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = _points().float()
    v32, se32, g32, gse32 = regulariser_gradient(net, x, n_z=64, max_batch=100, lam_min=-12.0, lam_max=12.0)
    v16, _, g16, _ = regulariser_gradient(net, x, n_z=64, max_batch=100, lam_min=-12.0, lam_max=12.0, precision="bf16")
    assert v32.dtype == g32.dtype == torch.float64 and torch.isfinite(g16).all()
    assert ((v16 - v32).abs() < se32).all(), (v16 - v32) / se32
    assert ((g16 - g32).abs() < gse32).all(), (g16 - g32) / gse32
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_score_regulariser_draws_are_keyed_by_example(device):
    """One sample's draw does not depend on the others in the batch; it is draw 0 of regulariser_gradient."""
    gm = mixture_preset("ring8").to(device)
    x = _points(8).to(device).float().requires_grad_(True)
    full = score_regulariser(gm.eps, x, seed=11, step=2)
    assert full.device == torch.device(device) and full.dtype == torch.float64
    part = score_regulariser(gm.eps, x[3:5], seed=11, step=2, example_ids=torch.tensor([3, 4]))
    assert torch.allclose(full[3:5], part, rtol=1e-12, atol=1e-12)
    other_step = score_regulariser(gm.eps, x, seed=11, step=3)
    assert not torch.allclose(full, other_step)
    (g,) = torch.autograd.grad(full.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # without a seed, each call takes a fresh key from the generator: reproducible from its seed
    g1 = score_regulariser(gm.eps, x, generator=torch.Generator().manual_seed(5))
    g2 = score_regulariser(gm.eps, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2)


def test_train_gan_on_an_explicit_device_is_reproducible():
    kw = dict(preset="ring8", steps=6, batch=32, hidden=16, depth=1, reg_coef=0.1, log_every=2, device="cpu")
    a, b = train_gan(**kw), train_gan(**kw)
    assert a.history == b.history and all(h["reg"] != 0 for h in a.history)
    s = a.sample(50, seed=1)
    assert _plain(s) and s.shape == (50, 2) and torch.equal(s, b.sample(50, seed=1))
    assert not torch.equal(s, a.sample(50, seed=2))
    with pytest.raises(ValueError, match="device"):
        GANConfig(device="warp-drive").validate()


# ------------------------------------------------------------------------------------------------ DiffusionLoss
def _head(seed: int = 0) -> DiffusionLoss:
    torch.manual_seed(seed)
    head = DiffusionLoss(3, 4, width=32, depth=2, t_per_token=8, lam_min=-10.0, lam_max=10.0)
    with torch.no_grad():  # a non-trivial, untrained head (zero-initialised output layers otherwise)
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", ["elbo", "simple"])
def test_diffusion_loss_draws_are_keyed_by_token_on_the_device(device, weighting):
    head = _head().to(device)
    head.weighting = weighting
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(10, 3, generator=g).to(device), torch.randn(10, 4, generator=g).to(device)
    full = head(x, c, reduction="none", seed=5, step=1)
    assert full.shape == (10,) and full.device == torch.device(device)
    part = head(x[6:], c[6:], reduction="none", seed=5, step=1, example_ids=torch.arange(6, 10))
    # same draws for the same tokens (the network's float32 rows may round differently in another batch)
    assert torch.allclose(full[6:], part, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, head(x, c, reduction="none", seed=5, step=2))
    # without a seed, a fresh key per call: torch's global seed makes training reproducible
    torch.manual_seed(1)
    l1 = head(x, c)
    torch.manual_seed(1)
    assert torch.equal(l1, head(x, c)) and not torch.equal(l1, head(x, c))
    l1.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_diffusion_loss_bf16_on_the_cpu_agrees_with_fp32_within_the_standard_error():
    """bf16 autocasts the head's network only: the training loss and log p(x | c) move by far less than their
    Monte Carlo standard errors (same keyed draws, so the difference is the rounding alone)."""
    head = _head(3)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(64, 3, generator=g), torch.randn(64, 4, generator=g)
    dtypes = []
    hook = head.inp.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.no_grad():
        per32 = head(x, c, reduction="none", seed=1).double()
        per16 = head(x, c, reduction="none", seed=1, precision="bf16").double()
    assert dtypes == [torch.float32, torch.bfloat16]  # bf16 reached the network
    # standard error of the mean loss over tokens and draws: per-token losses are means of t_per_token draws
    se_loss = float(per32.std() / math.sqrt(len(per32)))
    assert abs(float((per16 - per32).mean())) < 0.25 * se_loss
    loss = head(x, c, seed=1, precision="bf16")
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)

    ld32 = head.log_prob(x, c, n_t=32, seed=2)
    ld16 = head.log_prob(x, c, n_t=32, seed=2, precision="bf16")
    hook.remove()
    assert ld16.info["precision"] == "bf16" and dtypes[-1] == torch.bfloat16
    assert _plain(ld32.logp) and _plain(ld16.logp)
    diff = ld16.logp - ld32.logp  # paired: the same nodes and noise
    assert (diff.abs() < ld32.stderr).all(), (diff / ld32.stderr).abs().max()  # per token: within its error bar
    se_mean = float(ld32.stderr.pow(2).sum().sqrt() / len(diff))  # of the mean over tokens
    assert abs(float(diff.mean())) < 0.25 * se_mean, (float(diff.mean()), se_mean)


@pytest.mark.parametrize("device", DEVICES)
def test_diffusion_loss_log_prob_on_the_device_returns_plain_cpu_results(device):
    head = _head().to(device)
    x, c = torch.randn(5, 3).to(device), torch.randn(5, 4).to(device)
    ld = head.log_prob(x, c, n_t=16, seed=0, max_batch=7)
    ld_big = head.log_prob(x, c, n_t=16, seed=0, max_batch=10_000)
    assert _plain(ld.logp) and _plain(ld.stderr) and ld.logp.shape == (5,)
    assert torch.allclose(ld.logp, ld_big.logp, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in head.parameters())


# ------------------------------------------------------------------------------------------------ certify
@pytest.mark.parametrize("antithetic", [False, True])
def test_certify_objective_noise_is_keyed_by_example_not_by_chunking(antithetic):
    """The sample-average objectives draw through rng: an example's z at each of its nodes is the same however the
    examples are chunked (the chunks' nodes differ, its noise does not); another seed moves it."""
    from scoredensity.apps.certify import continuous_elbo_objective

    x = _points(10)
    kw = dict(n_t=4, n_z=2, antithetic=antithetic, seed=3)
    one = continuous_elbo_objective(x, n_chunks=1, **kw)
    four = continuous_elbo_objective(x, n_chunks=4, **kw)
    other = continuous_elbo_objective(x, n_chunks=4, **{**kw, "seed": 4})
    for i in range(10):
        zi = [o.z[(o.rows == i) & (o.coef > 0)] for o in (one, four, other)]  # [n_t * n_z, d], node-major
        assert zi[0].shape == (8, 2) and torch.equal(zi[0], zi[1]) and not torch.equal(zi[0], zi[2])
        if antithetic:
            pairs = zi[0].reshape(4, 2, 2)
            assert torch.equal(pairs[:, 0], -pairs[:, 1])
    assert not torch.equal(four.t[:4], four.t[4:8])  # each chunk has its own nodes


def test_cli_gan_trains_on_the_device_given(tmp_path, capsys):
    """`scoredensity gan --device cpu`: the networks train where the command says, and the run records it."""
    import json

    from scoredensity.cli import main

    args = ["gan", "--steps", "4", "--batch", "32", "--reg-coef", "0.1", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "gan.json").read_text())
    assert doc["config"]["device"] == "cpu" and all(h["reg"] != 0 for h in doc["history"])
