"""The estimators at scale: one vocabulary (precision, max_batch, cond, lam range), keyed noise, bounded memory."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import as_tensor_keeps_tensor_devices

from scoredensity.elbo import elbo
from scoredensity.formula import fit_proposal, log_density, resolve_control_variate
from scoredensity.logdensity import LogDensity
from scoredensity.losses import LamSampler, dsm_loss
from scoredensity.mixtures import GaussianMixture, StandardNormal, mixture_preset
from scoredensity.nets import MLPDenoiser
from scoredensity.ode import ode_log_likelihood
from scoredensity.proposals import LambdaProposal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ring(n: int, seed: int = 0) -> tuple:
    gm = mixture_preset("ring8")
    return gm, gm.sample(n, generator=_gen(seed)).float().to("cpu")


ESTIMATORS = {
    "log_density": lambda f, x, **kw: log_density(f, x, n_t=16, **kw),
    "elbo": lambda f, x, **kw: elbo(f, x, n_t=16, **kw),
    "ode": lambda f, x, **kw: ode_log_likelihood(f, x, steps=8, **kw),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_info_reports_range_precision_and_max_batch(name):
    gm, x = _ring(12)
    r = ESTIMATORS[name](gm.eps, x, max_batch=50, precision="bf16")
    assert (r.info["lam_min"], r.info["lam_max"]) == (-20.0, 20.0)
    assert r.info["precision"] == "bf16" and r.info["max_batch"] == 50


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_model_lam_range_is_the_default_and_reported(name):
    gm, x = _ring(8)

    class Trained:
        lam_range = (-12.0, 12.0)

        def __call__(self, x_t, t):
            return gm.eps(x_t, t)

    r = ESTIMATORS[name](Trained(), x)
    assert (r.info["lam_min"], r.info["lam_max"]) == (-12.0, 12.0)
    r = ESTIMATORS[name](Trained(), x, lam_min=-5.0)
    assert (r.info["lam_min"], r.info["lam_max"]) == (-5.0, 12.0)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_batch": -1}, {"max_batch": 2.5}, {"precision": "fp8"}])
def test_bad_options_raise_naming_the_option(name, kw):
    gm, x = _ring(4)
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        ESTIMATORS[name](gm.eps, x, **kw)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_chunk_size_is_a_deprecated_alias_and_validated(name):
    gm, x = _ring(4)
    with pytest.warns(DeprecationWarning, match="chunk_size"), pytest.raises(ValueError, match="chunk_size"):
        ESTIMATORS[name](gm.eps, x, chunk_size=-1)  # issue 14.6: once returned +2801 instead of raising
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        r = ESTIMATORS[name](gm.eps, x, chunk_size=7)
    assert r.info["max_batch"] == 7


def test_fit_proposal_takes_the_same_options():
    gm, x = _ring(16)
    p = fit_proposal(gm.eps, x, max_batch=10, precision="bf16")
    assert (p.lam_min, p.lam_max) == (-20.0, 20.0)
    with pytest.raises(ValueError, match="pilot_nodes"):
        fit_proposal(gm.eps, x, pilot_nodes=0)


# ---------------------------------------------------------------------------------------- keyed noise
def _std_normal_eps(x_t, t):
    """Exact eps of N(0, I), elementwise: its output for a row does not depend on the other rows of the call."""
    return StandardNormal.eps(x_t.flatten(1), t).reshape(x_t.shape)


SPLIT_ESTIMATORS = {
    "log_density": lambda x, **kw: log_density(
        _std_normal_eps, x, n_t=8, n_z=2, importance=LambdaProposal.uniform(-20.0, 20.0), control_variate=None, **kw
    ),
    "log_density_discretized": lambda x, **kw: log_density(
        _std_normal_eps,
        x,
        n_t=8,
        importance=LambdaProposal.uniform(-20.0, 20.0),
        control_variate=None,
        decoder="discretized",
        levels=17,
        **kw,
    ),
    "elbo": lambda x, **kw: elbo(
        _std_normal_eps, x, n_t=8, n_probes=2, importance=LambdaProposal.uniform(-20, 20), control_variate=None, **kw
    ),
    "ode": lambda x, **kw: ode_log_likelihood(
        _std_normal_eps, x, steps=4, trace="hutchinson", n_probes=2, probe="gaussian", **kw
    ),
}


@pytest.mark.parametrize("name", sorted(SPLIT_ESTIMATORS))
def test_noise_bit_identical_across_batch_chunk_and_shard(name):
    """Every draw is keyed by (seed, stream, example id): splitting the data set into shards with global ids, or
    the calls into chunks of max_batch rows, changes no bit of any example's result."""
    k = torch.randint(0, 17, (11, 1, 2, 2), generator=_gen(3), device="cpu")
    x = (2 * k.float() / 16 - 1).to("cpu")
    est = SPLIT_ESTIMATORS[name]
    whole = est(x, seed=9)
    assert whole.logp.device.type == "cpu" and whole.logp.dtype == torch.float64
    chunked = est(x, seed=9, max_batch=3)
    shards = [est(x[s : s + 4], seed=9, example_ids=torch.arange(s, min(s + 4, 11)), max_batch=5) for s in (0, 4, 8)]
    for other in (chunked, LogDensity.cat(shards)):
        assert torch.equal(other.logp, whole.logp)
        # the variance's reductions may round differently for other row counts: equal to the last few ulps
        assert torch.allclose(other.stderr, whole.stderr, rtol=1e-12, atol=0)
    assert not torch.equal(est(x, seed=10).logp, whole.logp)  # the seed is the key


def test_noise_is_drawn_in_blocks_not_for_the_whole_data_set(monkeypatch):
    """No [B, n_t, d] draw for the whole data set: every normal draw covers at most max_batch rows (or one
    example's n_t * n_z rows when that is more), and every network call at most max_batch rows."""
    from scoredensity import rng

    sizes, rows = [], []
    real = rng.normals

    def spy(seed, stream, index, shape, **kw):
        sizes.append(len(torch.as_tensor(index)) * math.prod(shape[:-1]))  # rows of d = 2 elements
        return real(seed, stream, index, shape, **kw)

    def eps(x_t, t):
        rows.append(x_t.shape[0])
        return _std_normal_eps(x_t, t)

    monkeypatch.setattr(rng, "normals", spy)
    gm, x = _ring(300)
    k = torch.randint(0, 17, (300, 2), generator=_gen(4), device="cpu")
    xk = 2 * k.float() / 16 - 1
    log_density(eps, xk, n_t=8, max_batch=64, importance="uniform", decoder="discretized", levels=17)
    assert max(rows) <= 64 and max(sizes) <= 64
    sizes.clear(), rows.clear()
    elbo(eps, x, n_t=8, max_batch=64, importance="uniform")
    assert max(rows) <= 64 and max(sizes) <= 64
    sizes.clear(), rows.clear()
    log_density(eps, x, n_t=8, max_batch=64, pilot_examples=8, pilot_nodes=16)  # the pilot: a fixed size
    assert max(rows) <= 64 and max(sizes) <= 8 * 16


# ---------------------------------------------------------------------------------------- no graph kept
def _trainable_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    net = MLPDenoiser([2], hidden=16, blocks=1, emb_dim=8).to("cpu")
    assert all(p.requires_grad for p in net.parameters())
    return net


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_results_carry_no_graph_on_a_trainable_module(name):
    _, x = _ring(6)
    r = ESTIMATORS[name](_trainable_mlp(), x)
    for v in (r.logp, r.stderr, *r.terms.values()):
        assert v.requires_grad is False and v.grad_fn is None and v.device.type == "cpu"
    v = r.logp.clone()
    v += 1  # a plain tensor, not an inference-mode one
    p = fit_proposal(_trainable_mlp(), x)
    assert p.masses.requires_grad is False


# ---------------------------------------------------------------------------------------- hostile eps_fn
def _writes_into_input(gm):
    def eps(x_t, t):
        out = gm.eps(x_t, t)
        x_t.zero_()  # after use: corrupts the estimate if the estimator reuses x_t
        t.fill_(0.5)
        return out

    return eps


@pytest.mark.parametrize("double", [False, True])
def test_eps_fn_writing_into_its_input_cannot_corrupt_the_formula(double):
    gm, x = _ring(10)
    x = x.double() if double else x
    kw = dict(n_t=16, seed=2, double=double, control_variate="batch")
    assert torch.equal(log_density(_writes_into_input(gm), x, **kw).logp, log_density(gm.eps, x, **kw).logp)
    k = torch.randint(0, 17, (10, 2), generator=_gen(4), device="cpu")
    xk = 2 * k.float() / 16 - 1
    kw = dict(n_t=16, seed=2, decoder="discretized", levels=17, lam_max=8.0)
    assert torch.equal(log_density(_writes_into_input(gm), xk, **kw).logp, log_density(gm.eps, xk, **kw).logp)


@pytest.mark.parametrize("name", ["elbo", "ode"])
def test_eps_fn_writing_into_its_input_cannot_corrupt_elbo_or_ode(name):
    """The network gets a copy of x_t: writing into it leaves the estimate intact; when the write breaks the
    autograd graph the divergence needs, the error is one line saying so."""
    gm, x = _ring(5)
    for xx in (x, x.double()):
        assert torch.equal(ESTIMATORS[name](_writes_into_input(gm), xx).logp, ESTIMATORS[name](gm.eps, xx).logp)

    def square_then_write(x_t, t):
        out = 0.1 * x_t * x_t  # autograd saves x_t for the divergence
        x_t.zero_()
        return out

    with pytest.raises(ValueError, match="in place"):
        ESTIMATORS[name](square_then_write, x)


# ---------------------------------------------------------------------------------------- one vocabulary
def test_control_variate_auto_means_the_same_for_formula_and_elbo():
    gm, x = _ring(3)  # B > d: the batch Gaussian in both
    small = torch.zeros(2, 4, device="cpu").normal_(generator=_gen(1))  # B <= d: none in both
    for data, expect in ((x, True), (small, False)):
        eps = gm.eps if data.shape[1] == 2 else _std_normal_eps
        assert log_density(eps, data, n_t=4, control_variate="auto").info["control_variate"] is expect
        assert elbo(eps, data, n_t=4, control_variate="auto").info["control_variate"] is expect
        assert isinstance(resolve_control_variate("auto", data), GaussianMixture) is expect
    assert isinstance(resolve_control_variate("batch_or_prior", small), StandardNormal)
    assert elbo(_std_normal_eps, small, n_t=4).info["control_variate"] is True  # elbo's default: batch_or_prior
    with pytest.raises(ValueError, match="control_variate"):
        resolve_control_variate("magic", x)


# ---------------------------------------------------------------------------------------- precision
def _trained_ring8_mlp(steps: int = 200) -> torch.nn.Module:
    """A small MLPDenoiser trained for ``steps`` steps of the likelihood-weighted loss on ring8 (a few seconds)."""
    gm = mixture_preset("ring8")
    torch.manual_seed(0)
    net = MLPDenoiser([2], hidden=32, blocks=2, emb_dim=16).to("cpu")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sampler = LamSampler("uniform", -12.0, 12.0)
    data = gm.sample(4096, generator=_gen(0)).float().to("cpu")
    for step in range(steps):
        index = torch.arange(step * 256, (step + 1) * 256, device="cpu")
        out = dsm_loss(net, data[index % 4096], weighting="elbo", sampler=sampler, seed=0, step=step, index=index)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    net.lam_range = (-12.0, 12.0)  # as load_run marks a trained network
    return net.eval()


def _autocast_dtypes(module: torch.nn.Module) -> set:
    """Records the dtypes of every Linear / Conv2d output while the estimator runs."""
    seen = set()
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


def _agree_within_stderr(a: LogDensity, b: LogDensity) -> None:
    """bf16 and fp32 (common random numbers) agree within the stated standard error of the mean."""
    joint = math.hypot(a.mean_stderr(), b.mean_stderr())
    assert abs(a.mean() - b.mean()) < joint
    assert float((a.logp - b.logp).abs().max()) < float(torch.hypot(a.stderr, b.stderr).max())
    assert a.info["precision"] == "bf16" and b.info["precision"] == "fp32"


def test_bf16_agrees_with_fp32_within_stderr_on_a_trained_mlp():
    net = _trained_ring8_mlp()
    gm = mixture_preset("ring8")
    x = gm.sample(128, generator=_gen(5)).float().to("cpu")
    seen = _autocast_dtypes(net)
    for est in (
        lambda p: log_density(net, x, n_t=32, seed=1, precision=p),
        lambda p: elbo(net, x[:32], n_t=32, seed=1, precision=p),
    ):
        seen.clear()
        fp32 = est("fp32")
        assert seen == {torch.float32}
        seen.clear()
        bf16 = est("bf16")
        assert torch.bfloat16 in seen  # the network really ran in bf16
        _agree_within_stderr(bf16, fp32)
        assert fp32.info["lam_min"] == -12.0  # the trained range is picked up


def test_bf16_agrees_with_fp32_within_stderr_on_a_small_unet():
    import diffusers
    from helpers import tiny_unet

    from scoredensity.adapters import DiffusersEps

    unet = tiny_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.1)
    eps = DiffusersEps(unet, sched.config)
    k = torch.randint(0, 17, (16, 1, 8, 8), generator=_gen(0), device="cpu")
    x = 2 * k.float() / 16 - 1
    seen = _autocast_dtypes(unet)
    kw = dict(n_t=16, seed=1, lam_min=-5.1, lam_max=9.2)  # inside the 100-step model's trained range
    fp32 = log_density(eps, x, precision="fp32", **kw)
    assert torch.bfloat16 not in seen
    bf16 = log_density(eps, x, precision="bf16", **kw)
    assert torch.bfloat16 in seen
    _agree_within_stderr(bf16, fp32)


def test_control_variate_integral_on_a_grid_matches_the_node_by_node_rule():
    from scoredensity.formula import control_variate_integral, integrate_expected_error

    gm, x = _ring(50)
    for ref in (GaussianMixture.fit_gaussian(x), StandardNormal()):
        err = ref.expected_denoising_error_fn(x.double())
        slow = integrate_expected_error(lambda _x, t, err=err: err(t), x.double(), lam_min=-12.0, lam_max=9.5)
        fast = control_variate_integral(ref, x.double(), -12.0, 9.5)
        assert torch.allclose(fast, slow.terms["integral"], rtol=1e-12, atol=1e-10)


def test_elbo_takes_n_z_draws_per_node_and_stays_exact_for_the_exact_eps():
    gm, x = _ring(40, seed=8)
    x = x.double()
    prop = LambdaProposal.uniform(-20.0, 20.0)
    one = elbo(gm.eps, x, n_t=32, n_z=1, seed=3, importance=prop)
    four = elbo(gm.eps, x, n_t=32, n_z=4, seed=3, importance=prop)
    assert (one.nfe, four.nfe, four.info["n_z"]) == (32, 128, 4)
    gap = float((four.logp - gm.log_prob(x)).mean())
    assert abs(gap) < 4 * four.mean_stderr()
    assert four.mean_stderr() < one.mean_stderr()  # more draws per node: less noise


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_takes_the_shared_vocabulary(name):
    import inspect

    fn = {"log_density": log_density, "elbo": elbo, "ode": ode_log_likelihood}[name]
    shared = {"seed", "example_ids", "cond", "precision", "max_batch", "progress", "lam_min", "lam_max"}
    params = inspect.signature(fn).parameters
    assert shared <= set(params)
    assert params["lam_min"].default is None and params["lam_max"].default is None
    if name != "ode":  # the ODE has no nodes: its solver picks the times
        assert params["n_t"].default == 128 and params["n_z"].default == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"n_t": 0},
        {"n_t": 16.0},
        {"n_z": 0},
        {"n_z": True},
        {"pilot_nodes": 0},
        {"pilot_examples": -3},
        {"decoder_draws": 2.5},
        {"seed": 1.5},
        {"max_batch": "64"},
    ],
)
def test_every_integer_option_of_log_density_is_checked(kw):
    gm, x = _ring(4)
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        log_density(gm.eps, x, **kw)


@pytest.mark.parametrize("kw", [{"n_t": 0}, {"n_z": 0}, {"n_probes": 0}, {"pilot_nodes": 0}, {"seed": "1"}])
def test_every_integer_option_of_elbo_is_checked(kw):
    gm, x = _ring(4)
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        elbo(gm.eps, x, **kw)


@pytest.mark.parametrize("kw", [{"n_probes": 0, "trace": "hutchinson"}, {"steps": 0}, {"max_num_steps": -1}])
def test_every_integer_option_of_ode_is_checked(kw):
    gm, x = _ring(4)
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        ode_log_likelihood(gm.eps, x, **kw)


@pytest.mark.parametrize(
    "run",
    [
        lambda gm, x, xk: log_density(gm.eps, x, n_t=8, control_variate="batch"),
        lambda gm, x, xk: log_density(gm.eps, x, n_t=8, n_z=2, scheme="quadrature"),
        lambda gm, x, xk: log_density(gm.eps, xk, n_t=8, decoder="discretized", levels=17, lam_max=8.0),
        lambda gm, x, xk: fit_proposal(gm.eps, x),
        lambda gm, x, xk: elbo(gm.eps, x, n_t=8, n_z=2),
        lambda gm, x, xk: elbo(gm.eps, x, n_t=8, probe="exact", control_variate="prior"),
        lambda gm, x, xk: ode_log_likelihood(gm.eps, x, steps=4, trace="hutchinson", n_probes=2),
        lambda gm, x, xk: ode_log_likelihood(gm.eps, x, rtol=1e-3, atol=1e-3),
    ],
)
def test_estimators_create_every_tensor_where_the_data_live(run, monkeypatch):
    """With the default device set to 'meta' and the data on the CPU, any tensor an estimator made without naming
    its device would land on 'meta' and fail: this is how a CPU-only test catches CPU/accelerator mix-ups."""
    import sys

    gm, x = _ring(20)
    xk = 2 * torch.randint(0, 17, (20, 2), generator=_gen(0)).float() / 16 - 1
    as_tensor_keeps_tensor_devices(monkeypatch)
    end_terms = sys.modules["scoredensity.decoders"].end_terms

    def end_terms_on_data(x, lam_min, lam_max):  # decoders.end_terms makes CPU scalars (not in these files)
        with torch.device(x.device):
            return end_terms(x, lam_min, lam_max)

    for module in ("scoredensity.formula", "scoredensity.elbo"):
        monkeypatch.setattr(sys.modules[module], "end_terms", end_terms_on_data)
    with torch.device("meta"):
        out = run(gm, x, xk)
    assert (out.masses if isinstance(out, LambdaProposal) else out.logp).device.type == "cpu"


def test_default_rows_per_call_are_bounded_in_bytes_and_in_rows():
    from scoredensity.epsfn import DEFAULT_MAX_ROWS, DEFAULT_MEMORY_BUDGET, default_max_batch

    assert default_max_batch(2) == DEFAULT_MAX_ROWS  # low d: the row cap, not millions of rows
    big = default_max_batch(3 * 32 * 32)
    assert big * 8 * 8 * 3 * 32 * 32 <= DEFAULT_MEMORY_BUDGET < (big + 1) * 8 * 8 * 3 * 32 * 32
    assert default_max_batch(10**12) == 1
    gm, x = _ring(4)
    assert log_density(gm.eps, x, n_t=4).info["max_batch"] == DEFAULT_MAX_ROWS
