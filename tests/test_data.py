"""Dataset transforms (dequantisation, logit, Jacobian, bits/dim), seeded splits, synthetic sets and digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scoredensity.data import (
    LOGIT_ALPHA,
    DataError,
    Dataset,
    batch_indices,
    dataset_names,
    iterate_batches,
    load_dataset,
    make_dataset,
    split_indices,
)
from scoredensity.mixtures import MIXTURE_PRESETS


def _discrete(levels: int, shape=(3,), n: int = 400, logit: bool = False, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n, *shape), generator=g)
    return make_dataset("synthetic", x, levels=levels, logit=logit, seed=seed)


# ---------------------------------------------------------------------- splits and batches
@pytest.mark.parametrize("n,frac", [(10, 0.2), (1797, 0.2), (5, 0.5)])
def test_split_indices_disjoint_complete_reproducible(n, frac):
    tr, te = split_indices(n, frac, seed=3)
    assert len(te) == round(n * frac) and len(tr) + len(te) == n
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(n))
    tr2, te2 = split_indices(n, frac, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)


def test_split_depends_on_seed_and_rejects_bad_fractions():
    a = split_indices(1000, 0.2, 0)[1]
    b = split_indices(1000, 0.2, 1)[1]
    assert not torch.equal(a, b)
    for frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(DataError, match="test_fraction"):
            split_indices(100, frac, 0)
    with pytest.raises(DataError, match="non-empty"):
        split_indices(2, 0.1, 0)


def test_batches_cover_each_index_once_and_are_reproducible():
    x = torch.arange(23, dtype=torch.float32)[:, None]
    y = torch.arange(23)
    batches = list(iterate_batches(x, 5, torch.Generator().manual_seed(1), drop_last=True, y=y))
    assert len(batches) == 4 and all(b[0].shape == (5, 1) for b in batches)
    seen = torch.cat([b[1] for b in batches]).tolist()
    assert len(set(seen)) == 20
    assert all(torch.equal(b[0][:, 0].long(), b[1]) for b in batches)
    again = list(iterate_batches(x, 5, torch.Generator().manual_seed(1), drop_last=True))
    assert all(torch.equal(a[0], b) for a, b in zip(batches, again, strict=True))
    full = list(batch_indices(23, 5, torch.Generator().manual_seed(2), drop_last=False))
    assert [len(b) for b in full] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(full).tolist()) == list(range(23))
    with pytest.raises(ValueError, match="batch_size"):
        list(batch_indices(3, 5, drop_last=True))


# ---------------------------------------------------------------------- synthetic sets
@pytest.mark.parametrize("name", sorted(MIXTURE_PRESETS))
def test_mixture_presets_sample_the_exact_mixture(name):
    ds = load_dataset(name, seed=1, n=4000)
    gm = ds.mixture
    assert gm is not None and ds.levels is None and ds.logit_alpha is None
    assert ds.x_train.dtype == torch.float32 and ds.shape == (gm.dim,)
    assert len(ds.x_train) == 3200 and len(ds.x_test) == 800
    x = torch.cat([ds.x_train, ds.x_test]).double()
    # sample mean against the exact mean: within 5 standard errors per coordinate
    se = (gm.covariance().diagonal() / len(x)).sqrt()
    assert ((x.mean(0) - gm.mean()).abs() < 5 * se + 1e-6).all()
    # the stored points are float32: the exact density is still finite at each of them
    assert torch.isfinite(gm.log_prob(x)).all()
    again = load_dataset(name, seed=1, n=4000)
    assert torch.equal(again.x_train, ds.x_train) and again.meta["sha256"] == ds.meta["sha256"]
    rebuilt = load_dataset(**json.loads(json.dumps(ds.meta))["load_args"])
    assert rebuilt.meta["sha256"] == ds.meta["sha256"]
    other = load_dataset(name, seed=2, n=4000)
    assert other.meta["sha256"]["x_train"] != ds.meta["sha256"]["x_train"]
    json.dumps(ds.meta)


def test_default_size_and_to_model_identity_for_continuous():
    ds = load_dataset("ring8")
    assert len(ds.x_train) + len(ds.x_test) == 20000 and ds.meta["n"] == 20000
    xb = ds.x_train[:7]
    assert torch.equal(ds.to_model(xb), xb)
    assert torch.equal(ds.log_jacobian(xb), torch.zeros(7, dtype=torch.float64))
    assert ds.bits_per_dim(torch.ones(7), xb) is None
    assert ds.num_classes == 8 and ds.dim == 2  # mixture components are the labels
    # labels are the components that generated the points: each point is most likely under its own component
    resp = ds.mixture.responsibilities_t(ds.x_test[:500].double(), 1e-9)
    assert float((resp.argmax(1) == ds.y_test[:500]).float().mean()) > 0.95
    assert load_dataset("moons").num_classes is None


def test_checkerboard_is_uniform_on_black_squares():
    ds = load_dataset("checkerboard", n=20000, seed=4)
    x = torch.cat([ds.x_train, ds.x_test]).double()
    s = math.sqrt(3) / 2
    cells = torch.floor(x / s + 2)
    assert ((cells >= 0) & (cells <= 3)).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # each coordinate is uniform on [-2s, 2s] with variance 1; Var(X^2) = 9/5 - 1 = 0.8
    se = math.sqrt(0.8 / len(x))
    assert ((x.pow(2).mean(0) - 1).abs() < 5 * se).all()


@pytest.mark.parametrize("name", ["moons", "swissroll"])
def test_sklearn_toys_are_centred_with_unit_ish_variance(name):
    ds = load_dataset(name, n=5000, seed=0)
    x = torch.cat([ds.x_train, ds.x_test]).double()
    assert ds.shape == (2,) and ds.mixture is None and torch.isfinite(x).all()
    assert (x.mean(0).abs() < 5 * (x.var(0) / len(x)).sqrt() + 0.02).all()
    total = float(x.var(0).sum())
    assert 1.5 < total < 2.5, total  # the documented scalings give a total variance of about 2
    assert torch.equal(load_dataset(name, n=5000, seed=0).x_test, ds.x_test)


def test_digits_round_trip_with_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = load_dataset("digits", seed=5)
    assert ds.levels == 17 and ds.shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.int64 and int(ds.x_train.max()) == 16 and int(ds.x_train.min()) == 0
    tr, te = split_indices(len(d.images), 0.2, 5)
    assert torch.equal(ds.x_train[:, 0], torch.as_tensor(d.images[tr.numpy()]).long())
    assert torch.equal(ds.y_test, torch.as_tensor(d.target[te.numpy()]).long())
    assert len(ds.x_train) == 1438 and len(ds.x_test) == 359
    sub = load_dataset("digits", n=100, seed=5)
    assert len(sub.x_train) == 80 and len(sub.x_test) == 20
    json.dumps(ds.meta)


# ---------------------------------------------------------------------- dequantisation grid
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantised_values_fall_in_their_own_bin(levels):
    ds = _discrete(levels, shape=(4, 5), n=500)
    k = ds.x_train
    x32 = ds.to_model(k, generator=torch.Generator().manual_seed(0))
    assert x32.dtype == torch.float32 and x32.shape == k.shape
    x = x32.double()
    width = 2 / (levels - 1)
    centre = 2 * k.double() / (levels - 1) - 1
    lo, hi = centre - width / 2, centre + width / 2
    assert ((x >= lo) & (x <= hi)).all()  # closed bins: float32 rounding may land on an edge
    # u = (x - lo)/width is U[0,1): its mean is 1/2 within 5 standard errors
    u = (x - lo) / width
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    # bin centres at u = 1/2, with dequantize=False or an explicit u
    c = ds.to_model(k, dequantize=False)
    assert torch.equal(c, centre.float())
    assert torch.equal(ds.to_model(k, u=torch.full(k.shape, 0.5)), c)
    assert torch.equal(ds.to_levels(c), k) and torch.equal(ds.to_levels(x.float()), k)


def test_dequantisation_is_reproducible_and_checks_input():
    ds = _discrete(17)
    a = ds.to_model(ds.x_train[:9], torch.Generator().manual_seed(3))
    b = ds.to_model(ds.x_train[:9], torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="integer levels"):
        ds.to_model(ds.x_train[:2].float())
    with pytest.raises(DataError, match="out of range"):
        ds.to_model(torch.full((2, 3), 17))
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        ds.to_model(ds.x_train[:2], u=torch.ones(2, 3))


# ---------------------------------------------------------------------- logit transform and bits/dim
def test_logit_transform_matches_its_definition_and_inverts():
    ds = _discrete(256, logit=True)
    plain = _discrete(256)
    assert ds.logit_alpha == LOGIT_ALPHA == 0.05
    k = ds.x_train[:50]
    u = torch.rand(k.shape, generator=torch.Generator().manual_seed(1))
    m = ds.to_model(k, u=u).double()
    y = (k.double() + u.double()) / 256  # sdeflow-light's [0, 1] scale: x*255/256 + U/256
    s = 0.05 + 0.9 * y
    assert torch.allclose(m, torch.log(s / (1 - s)), rtol=0, atol=1e-5)
    x_data = plain.to_model(k, u=u).double()
    assert torch.allclose(ds.from_data(x_data), m, atol=1e-5)
    assert torch.allclose(ds.to_data(m), x_data, atol=1e-5)
    assert torch.equal(ds.to_levels(m.float()), k)


@pytest.mark.parametrize("levels", [17, 256])
def test_log_jacobian_matches_autograd(levels):
    ds = _discrete(levels, shape=(2, 3), logit=True)
    x_data = ds.to_data(ds.to_model(ds.x_train[:4], torch.Generator().manual_seed(2)).double())
    for row in x_data:
        jac = torch.autograd.functional.jacobian(lambda v: ds.from_data(v).flatten(), row)  # [6, 2, 3]
        sign, logdet = torch.linalg.slogdet(jac.reshape(6, 6))
        assert sign > 0
        ours = ds.log_jacobian(ds.from_data(row)[None])[0]
        assert abs(float(ours - logdet)) < 1e-9 * max(1.0, abs(float(logdet)))


def _uniform_over_bins_nll(ds: Dataset, m: torch.Tensor) -> torch.Tensor:
    """-log density in model space of the data-scale density that is uniform over all bins."""
    L, d = ds.levels, ds.dim
    const = d * math.log((L - 1) / (2 * L))  # log density on the data scale: 1 / (L * 2/(L-1)) per dimension
    if ds.logit_alpha is None:
        return torch.full((m.shape[0],), -const, dtype=torch.float64)
    # change of variables by hand: p_model(m) = p_data(x) |dx/dm|, dx/dm = 2L/(L-1) * s(1-s)/(1-2 alpha)
    s = torch.sigmoid(m.double()).flatten(1)
    per = math.log(2 * L / (L - 1)) + torch.log(s) + torch.log1p(-s) - math.log(1 - 2 * ds.logit_alpha)
    return -(const + per.sum(1))


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("logit", [False, True])
def test_uniform_density_over_bins_gives_log2_levels(levels, logit):
    ds = _discrete(levels, shape=(1, 4, 4), logit=logit)
    m = ds.to_model(ds.x_train[:64], torch.Generator().manual_seed(0))
    bpd = ds.bits_per_dim(_uniform_over_bins_nll(ds, m), m)
    assert bpd.shape == (64,) and bpd.dtype == torch.float64
    assert torch.allclose(bpd, torch.full_like(bpd, math.log2(levels)), rtol=0, atol=1e-9)


def test_bits_per_dim_by_hand_and_sdeflow_convention():
    plain = _discrete(17, shape=(8,))
    m = plain.to_model(plain.x_train[:5])
    nll = torch.linspace(10, 20, 5, dtype=torch.float64)
    assert torch.allclose(plain.bits_per_dim(nll, m), nll / (8 * math.log(2)) + math.log2(8), atol=1e-12)
    # with the logit transform on 256 levels: sdeflow-light's  -(log p_model + ldj_[0,1]) / (d ln 2) + 8,
    # where ldj_[0,1] is the log-Jacobian from its [0, 1] scale y = (k + u)/256
    ds = _discrete(256, shape=(6,), logit=True)
    m = ds.to_model(ds.x_train[:5], torch.Generator().manual_seed(7)).double()
    s = torch.sigmoid(m)
    ldj01 = (math.log(0.9) - torch.log(s) - torch.log1p(-s)).sum(1)
    expected = (nll - ldj01) / (6 * math.log(2)) + 8
    assert torch.allclose(ds.bits_per_dim(nll, m), expected, atol=1e-6)
    assert torch.allclose(ds.log_jacobian(m), ldj01 + 6 * math.log(255 / 512), atol=1e-9)
    with pytest.raises(DataError, match="nll_model"):
        ds.bits_per_dim(nll[:3], m)


# ---------------------------------------------------------------------- bad input
def test_nan_rows_are_named():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(DataError, match=r"NaN or Inf in rows \[3, 7\]"):
        make_dataset("arr", x)


def test_invalid_combinations_raise_clear_errors():
    with pytest.raises(DataError, match="logit transform needs discrete"):
        load_dataset("ring8", logit=True)
    with pytest.raises(DataError, match="unknown data set 'nope'.*ring8"):
        load_dataset("nope")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("no/such/file.npz")
    with pytest.raises(DataError, match="outside 0..16"):
        make_dataset("x", np.array([[0, 17], [1, 2]]), levels=17)
    with pytest.raises(DataError, match="levels"):
        load_dataset("digits", levels=256)
    with pytest.raises(DataError, match="continuous"):
        load_dataset("moons", levels=17)
    with pytest.raises(DataError, match="n=5000"):
        load_dataset("digits", n=5000)
    with pytest.raises(DataError, match="int64"):
        Dataset("x", torch.zeros(3, 2), torch.zeros(2, 2), None, None, levels=17)


def test_names_listed():
    names = dataset_names()
    for n in ("ring8", "grid25", "blobs2d", "anisotropic", "moons", "swissroll", "checkerboard", "digits", "mnist"):
        assert n in names
