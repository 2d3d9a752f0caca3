"""The estimators at scale: one vocabulary (precision, max_batch, cond, lam range), keyed noise, bounded memory."""

from __future__ import annotations

import pytest
import torch

from scoredensity.elbo import elbo
from scoredensity.formula import fit_proposal, log_density
from scoredensity.mixtures import mixture_preset
from scoredensity.ode import ode_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")


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
    with pytest.warns(DeprecationWarning, match="chunk_size"), pytest.raises(ValueError, match="max_batch"):
        ESTIMATORS[name](gm.eps, x, chunk_size=-1)
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        r = ESTIMATORS[name](gm.eps, x, chunk_size=7)
    assert r.info["max_batch"] == 7


def test_fit_proposal_takes_the_same_options():
    gm, x = _ring(16)
    p = fit_proposal(gm.eps, x, max_batch=10, precision="bf16")
    assert (p.lam_min, p.lam_max) == (-20.0, 20.0)
    with pytest.raises(ValueError, match="pilot_nodes"):
        fit_proposal(gm.eps, x, pilot_nodes=0)
