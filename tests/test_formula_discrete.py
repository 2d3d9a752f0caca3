"""The formula's discrete bound (discretised decoder) and the dequantised bound against direct computations."""

import math

import pytest
import torch
from torch.distributions import Normal

from scoredensity import GaussianMixture, bits_per_dim, log_density


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


L = 17  # levels, as scikit-learn's digits


def _grid(k: torch.Tensor) -> torch.Tensor:
    return 2 * k / (L - 1) - 1


def test_discrete_bound_is_tight_for_the_exact_eps_of_discrete_data():
    """Data on 5 grid points in 2-D (a mixture of near-delta components): with its exact eps the discrete
    bound approaches log P(k) = log w_k, and never exceeds it beyond noise."""
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([[2, 3], [8, 8], [12, 5], [4, 14], [15, 15]], dtype=torch.float64)
    w = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    means = _grid(levels)
    covs = 1e-8 * torch.eye(2, dtype=torch.float64).expand(5, 2, 2).clone()
    data = GaussianMixture(means, covs, w)
    idx = torch.multinomial(w, 300, replacement=True, generator=g)
    x = means[idx].float()
    est = log_density(data.eps, x, decoder="discretized", levels=L, lam_min=-20.0, lam_max=12.0, double=True)
    exact = w.log()[idx]
    gap = est.logp - exact
    assert abs(float(gap.mean())) < 4 * est.mean_stderr() + 0.01
    assert float((gap / est.stderr.clamp_min(1e-12)).max()) < 4.5


def test_dequantised_and_discrete_bounds_lie_below_the_exact_bin_probability():
    """A smooth Gaussian model: the exact probability of each bin is a product of normal CDF differences.
    The dequantised bound (Jensen) and the discrete bound are both below it on average."""
    mean = torch.tensor([0.1, -0.2], dtype=torch.float64)
    var = torch.tensor([0.3, 0.05], dtype=torch.float64)
    model = GaussianMixture.gaussian(mean, torch.diag(var))
    gen = torch.Generator().manual_seed(1)
    k = ((model.sample(400, generator=gen).clamp(-1, 1) + 1) * (L - 1) / 2).round()
    xk = _grid(k).float()
    half = 1 / (L - 1)
    lo = torch.where(xk < -1 + half, torch.full_like(xk, -math.inf), xk - half).double()
    hi = torch.where(xk > 1 - half, torch.full_like(xk, math.inf), xk + half).double()
    normal = Normal(mean, var.sqrt())
    log_p_bin = torch.log(normal.cdf(hi) - normal.cdf(lo)).sum(1)

    u = torch.rand(k.shape, generator=gen, dtype=torch.float64)
    x_deq = (2 * (k + u - 0.5) / (L - 1) - 1).float()
    deq = log_density(model.eps, x_deq)
    deq_logp_bin = deq.logp + 2 * math.log(2 / (L - 1))  # density -> probability of the bin
    gap = float((deq_logp_bin - log_p_bin).mean())
    assert gap < 4 * deq.mean_stderr()
    # the same figure in bits per dimension, through the one conversion helper
    bpd = bits_per_dim(-deq.logp, 2, levels=L)
    assert torch.allclose(bpd, -deq_logp_bin / (2 * math.log(2)))

    disc = log_density(model.eps, xk, decoder="discretized", levels=L, lam_max=6.0)
    assert float((disc.logp - log_p_bin).mean()) < 4 * disc.mean_stderr()
    # terms still add up, and the clean end carries no (d/2) log(2 pi e)
    assert torch.allclose(disc.terms["noisy_end"] + disc.terms["integral"] + disc.terms["clean_end"], disc.logp)


def test_discretized_decoder_rejects_data_off_the_grid_or_out_of_range():
    model = GaussianMixture.gaussian(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="not on the grid"):
        log_density(model.eps, torch.full((3, 2), 0.01), decoder="discretized", levels=L)
    with pytest.raises(ValueError, match="out of range"):
        log_density(model.eps, torch.full((3, 2), 1.5), decoder="discretized", levels=L)
    with pytest.raises(ValueError, match="levels"):
        log_density(model.eps, torch.zeros(3, 2), decoder="discretized")
    with pytest.raises(ValueError, match="decoder"):
        log_density(model.eps, torch.zeros(3, 2), decoder="logistic")


def test_bits_per_dim_refuses_the_dequantisation_offset_for_a_discrete_result():
    model = GaussianMixture.gaussian(torch.zeros(2), torch.eye(2))
    x = _grid(torch.tensor([[3.0, 8.0], [8.0, 9.0]]))
    disc = log_density(model.eps, x.float(), decoder="discretized", levels=L, lam_max=6.0)
    assert torch.allclose(disc.bits_per_dim(), -disc.logp / (2 * math.log(2)))
    with pytest.raises(ValueError, match="already log P"):
        disc.bits_per_dim(levels=L)


def test_mc_standard_error_is_honest_with_several_z_per_node():
    """The n_z draws at one node share lam: the mc standard error must not treat them as independent."""
    from scoredensity import mixture_preset

    gm = mixture_preset("ring8")
    x = gm.sample(400, generator=torch.Generator().manual_seed(3)).float()
    est = log_density(gm.eps, x, scheme="mc", n_t=32, n_z=8, control_variate=None)
    z = (est.logp - gm.log_prob(x)) / est.stderr
    assert 0.8 < float(z.std()) < 1.25
