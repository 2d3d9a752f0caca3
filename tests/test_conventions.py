"""Named evaluation conventions: the published settings, and the library's bound under each of them."""

from __future__ import annotations

import json
import math

import pytest

from scoredensity.conventions import CONVENTIONS, Convention, get_convention


def test_every_convention_is_complete_and_serialisable():
    for name, conv in CONVENTIONS.items():
        assert conv.name == name
        d = json.loads(json.dumps(conv.as_dict()))
        assert d["name"] == name and "clip_denoised" in d and "bits_offset" in d and "lam_range" in d


def test_published_settings():
    sde = get_convention("score-sde")
    assert sde.bits_offset == 7.0 and sde.dequantization_offset == pytest.approx(7.0)
    lo, hi = sde.lam_range
    # VP-SDE beta 0.1..20: B(1) = 10.05, so log-SNR(1) = -10.05 - log(1 - e^-10.05); s = 1e-5 gives t ≈ 1e-6
    assert lo == pytest.approx(-10.05 - math.log1p(-math.exp(-10.05)), abs=1e-9)
    assert hi == pytest.approx(math.log((1 - 1e-6) / 1e-6), abs=1e-3)
    assert sde.prior_at == lo
    assert get_convention("scoredensity").dequantization_offset == pytest.approx(math.log2(127.5))
    for name in ("ddpm", "improved-diffusion"):
        c = get_convention(name)
        assert (c.time, c.variance, c.decoder_variance, c.clip_denoised) == (
            "discrete",
            "fixed_large",
            "posterior",
            True,
        )
    vdm = get_convention("vdm")
    assert vdm.time == "continuous" and vdm.lam_range == (-5.0, 13.3) and vdm.clean_end == "categorical"


def test_replace_and_errors():
    c = get_convention("improved-diffusion").replace(cdf="tanh")
    assert c.cdf == "tanh" and c.name.startswith("improved-diffusion+")
    assert get_convention(c) is c
    with pytest.raises(ValueError, match="unknown convention"):
        get_convention("ho")
    with pytest.raises(ValueError, match="cdf"):
        c.replace(cdf="erf")
    with pytest.raises(ValueError, match="lam_range"):
        c.replace(lam_range=(3.0, 1.0))
    assert isinstance(c, Convention)
