"""scoredensity.rng: keyed draws that depend on (seed, stream, step, example id) only, generated in batched ops."""

from __future__ import annotations

import math

import pytest
import torch

from scoredensity import rng
from scoredensity.rng import Stream

CPU = torch.device("cpu")


def test_rows_depend_on_their_key_only_not_on_batch_or_order():
    ids = torch.arange(100, 164, device=CPU)
    for draw in (
        lambda i: rng.uniforms(3, Stream.FORMULA_LAM, i, 7, device=CPU),
        lambda i: rng.normals(3, Stream.FORMULA_NOISE, i, (3, 5), device=CPU),
        lambda i: rng.rademacher(3, Stream.ELBO_PROBE, i, (2, 4), device=CPU),
    ):
        whole = draw(ids)
        assert whole.device == CPU and whole.dtype == torch.float64
        parts = torch.cat([draw(ids[s : s + 9]) for s in range(0, 64, 9)])
        assert torch.equal(parts, whole)
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        assert torch.equal(draw(ids[perm]), whole[perm])


def test_a_longer_draw_extends_a_shorter_one():
    ids = torch.tensor([0, 5, 2**40], device=CPU)
    short = rng.uniforms(1, Stream.FORMULA_LAM, ids, 5, device=CPU)
    long = rng.uniforms(1, Stream.FORMULA_LAM, ids, 50, device=CPU)
    assert torch.equal(long[:, :5], short)


@pytest.mark.parametrize(
    "change",
    [dict(seed=2), dict(stream=Stream.FORMULA_NOISE), dict(step=1), dict(index=torch.arange(1, 9, device=CPU))],
)
def test_every_part_of_the_key_changes_the_draw(change):
    base = dict(seed=1, stream=Stream.FORMULA_LAM, step=0, index=torch.arange(8, device=CPU))
    a = rng.uniforms(base["seed"], base["stream"], base["index"], 16, step=base["step"], device=CPU)
    kw = {**base, **change}
    b = rng.uniforms(kw["seed"], kw["stream"], kw["index"], 16, step=kw["step"], device=CPU)
    assert not torch.equal(a, b)


def test_distributions_within_their_standard_errors():
    n = 1 << 16
    u = rng.uniforms(0, Stream.DEQUANT, torch.arange(n // 16, device=CPU), 16, device=CPU).flatten()
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    z = rng.normals(0, Stream.FORMULA_NOISE, torch.arange(n // 16, device=CPU), (16,), device=CPU).flatten()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 4 * math.sqrt(96 / n)  # Var(z^4) = 105 - 9
    v = rng.rademacher(0, Stream.ODE_PROBE, torch.arange(n // 16, device=CPU), (16,), device=CPU).flatten()
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(v.mean())) < 4 / math.sqrt(n)


def test_streams_are_distinct_and_in_range():
    values = [s.value for s in Stream]
    assert len(values) == len(set(values)) and all(0 <= v < 1 << 16 for v in values)
    with pytest.raises(ValueError, match="stream"):
        rng.uniforms(0, 1 << 16, torch.arange(2, device=CPU), 1, device=CPU)


def test_example_keys_checked():
    assert torch.equal(rng.example_keys(None, 3, CPU), torch.arange(3))
    assert torch.equal(rng.example_keys(torch.tensor([7, 1]), 2, CPU), torch.tensor([7, 1]))
    with pytest.raises(ValueError, match="one entry per example"):
        rng.example_keys(torch.arange(3), 2, CPU)
    with pytest.raises(ValueError, match="integers"):
        rng.example_keys(torch.tensor([0.5, 1.0]), 2, CPU)
