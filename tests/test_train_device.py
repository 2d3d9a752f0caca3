"""The trainer's batch, keyed draws and loss live on the training device: the draws do not depend on how a batch is
split (shard invariance), the adaptive sampler's device-side draw is the proposal's own, and a training step makes no
tensor off the data's device (the 'meta' default-device trick, see tests/test_scale_estimators.py)."""

import importlib
import sys

import pytest
import torch
from helpers import as_tensor_keeps_tensor_devices

from scoredensity.checkpoint import read_config
from scoredensity.data import load_dataset
from scoredensity.losses import LamSampler, dsm_loss

T = importlib.import_module("scoredensity.train")  # the package's `train` attribute is the function

NET = {"type": "mlp", "hidden": 16, "blocks": 1}


@pytest.fixture
def trainer(tmp_path):
    """A conditional digits trainer (discrete data: keyed dequantisation; labels: keyed dropout) on the CPU, with
    the optimiser's state made by one step."""
    torch.set_num_threads(1)
    cfg = T.TrainConfig(steps=1, batch_size=16, eval_n=0, device="cpu", conditional=True, label_dropout=0.3)
    T.train(tmp_path / "run", {"name": "digits", "n": 200}, net=NET, config=cfg, progress=False)
    full = read_config(tmp_path / "run")
    tr = T._Trainer(tmp_path / "run", cfg, load_dataset(**full["data"]), full, torch.device("cpu"))
    x, y, gidx = tr.draw_batch(1)
    tr.optimiser_step(1, x, y, gidx)
    return tr


def _set_shard(tr, pos: torch.Tensor) -> None:
    tr.pos, tr.pos_dev = pos, pos.to(tr.data_device)


def test_batch_draws_do_not_depend_on_the_split(trainer):
    """Dequantisation and label dropout of a batch drawn in one piece equal those of its shards, bit for bit."""
    tr, b = trainer, trainer.cfg.batch_size
    whole = [tr.draw_batch(step) for step in (3, 4)]
    for cut in (1, 5, 11):
        parts = []
        for pos in (torch.arange(cut), torch.arange(cut, b)):
            _set_shard(tr, pos)
            parts.append([tr.draw_batch(step) for step in (3, 4)])
        for s in range(2):
            for k in range(3):  # x, y, global index
                assert torch.equal(torch.cat([parts[0][s][k], parts[1][s][k]]), whole[s][k]), (cut, s, k)
    x, y, _ = whole[0]
    assert x.device.type == "cpu" and x.dtype == torch.float32
    centres = tr.dataset.to_model(tr.dataset.x_train[:1], dequantize=False)
    assert not torch.equal(x[:1], centres)  # dequantised (a centre has probability 0)
    assert (y == tr.num_classes).any() and (y < tr.num_classes).any()  # some labels dropped, some kept
    assert not torch.equal(whole[0][0], whole[1][0])  # another step, other draws


def _recorded_loss(sampler, x, index, position, b, low_d):
    seen = []

    def eps_fn(x_t, t):
        seen.append(x_t)
        return torch.zeros_like(x_t)

    sampler.low_discrepancy = low_d
    out = dsm_loss(
        eps_fn, x, weighting="elbo", sampler=sampler, seed=7, step=3, index=index, position=position, global_batch=b
    )
    return out.lam, seen[0], out.loss


@pytest.mark.parametrize("low_d", [True, False])
def test_loss_draws_do_not_depend_on_the_split(low_d):
    """The log-SNR of each example (adaptive proposal, low-discrepancy or not) is the same bits whole or split, on an
    explicit CPU device; its noise too, so x_t and the loss agree to rounding. (Not bit for bit: torch's float64
    sigmoid gives the last elements of a CPU tensor whose length is not a multiple of the vector width to a scalar
    path that may differ by one ulp.)"""
    b, cpu = 24, torch.device("cpu")
    x = torch.linspace(-1, 1, b * 3, device=cpu).reshape(b, 3)
    s = LamSampler("adaptive", -8.0, 8.0).to(cpu)
    lam = torch.linspace(-8, 8, 200, dtype=torch.float64)
    s.update(s.bin_stats(lam, torch.exp(-0.2 * lam.abs())))  # a non-uniform proposal
    pos = torch.arange(b, device=cpu)
    index = 1000 + pos
    whole = _recorded_loss(s, x, index, pos, b, low_d)
    for cut in (1, 10):
        a = _recorded_loss(s, x[:cut], index[:cut], pos[:cut], b, low_d)
        c = _recorded_loss(s, x[cut:], index[cut:], pos[cut:], b, low_d)
        assert torch.equal(torch.cat([a[0], c[0]]), whole[0]), cut
        for k in (1, 2):  # x_t (float32) and the loss (float64): a few ulps at most
            eps = torch.finfo(whole[k].dtype).eps
            torch.testing.assert_close(torch.cat([a[k], c[k]]), whole[k], rtol=8 * eps, atol=8 * eps)
    other = _recorded_loss(s, x, index + b, pos, b, low_d)  # other examples: other draws
    assert not torch.equal(other[1], whole[1])


@pytest.mark.parametrize("kind", ["uniform", "adaptive"])
def test_device_side_sampling_is_the_proposals_own(kind):
    """LamSampler.sample (no host round trip) equals the LambdaProposal of LamSampler.proposal(): icdf and 1/pdf,
    bit for bit, before any statistics (uniform fallback) and after."""
    s = LamSampler(kind, -10.0, 6.0)
    u = torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).clamp_min(1e-12)
    for update in (False, True):
        if update:
            lam = torch.linspace(-10, 6, 300, dtype=torch.float64)
            s.update(s.bin_stats(lam, 1 + lam.clamp_min(0)))
        prop = s.proposal()
        if kind == "adaptive" and update:
            assert prop.masses.std() > 0  # the adaptive branch is what is compared
        lam, inv_q = s.sample(u)
        assert torch.equal(lam, prop.icdf(u))
        assert torch.equal(inv_q, 1.0 / prop.pdf(lam))


def test_non_finite_statistics_fall_back_to_uniform():
    s = LamSampler("adaptive", -4.0, 4.0)
    s.update(torch.stack([torch.full((32,), float("nan"), dtype=torch.float64), torch.ones(32, dtype=torch.float64)]))
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    lam, inv_q = s.sample(u)
    assert torch.equal(lam, -4.0 + u * 8.0) and torch.equal(inv_q, torch.full_like(u, 8.0))


def test_a_training_step_makes_no_tensor_off_the_data_device(trainer, monkeypatch):
    """Under torch.device('meta') any tensor the step made without naming its device would land on 'meta' and fail;
    the step (batch, draws, loss, backward, all-reduce, clipping, AdamW, EMA, sampler, finiteness check) runs."""
    tr = trainer
    as_tensor_keeps_tensor_devices(monkeypatch)
    losses = sys.modules["scoredensity.losses"]
    end_terms = losses.end_terms

    def end_terms_on_data(x, lam_min, lam_max):  # decoders.end_terms makes CPU scalars (not in these files)
        with torch.device(x.device):
            return end_terms(x, lam_min, lam_max)

    monkeypatch.setattr(losses, "end_terms", end_terms_on_data)
    before = [p.detach().clone() for p in tr.params]
    with torch.device("meta"):
        for step in (2, 3):
            x, y, gidx = tr.draw_batch(step)
            rec = tr.optimiser_step(step, x, y, gidx)
        tr.check_finite(3)
    for v in (x, y, gidx, rec["loss"], rec["nll"], rec["grad_norm"], tr.first_bad, tr.sampler.mean_sq):
        assert v.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in tr.params + list(tr.ema.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(tr.params, before, strict=True))  # it did train
    assert int(tr.first_bad) == 0 and bool(torch.isfinite(rec["loss"]))


def test_a_non_finite_step_between_checks_stops_at_the_next_check(tmp_path, monkeypatch):
    """Steps are not checked one by one (that would wait for the device every step): a NaN loss at step 7 is
    remembered on the device and raised at the checkpoint of step 10, naming step 7; the checkpoint of step 5 is
    kept, with finite weights, and nothing was saved after it."""
    from scoredensity.checkpoint import load_checkpoint

    dsm_loss_ = T.dsm_loss

    def nan_at_7(*args, **kwargs):
        out = dsm_loss_(*args, **kwargs)
        if kwargs["step"] == 7:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "dsm_loss", nan_at_7)
    cfg = T.TrainConfig(steps=20, batch_size=32, eval_n=0, device="cpu", checkpoint_every=5, log_every=100)
    with pytest.raises(T.TrainingDiverged, match=r"diverged at step 7: .*found at step 10.*checkpoint \(step 5\)") as e:
        T.train(tmp_path / "run", {"name": "ring8", "n": 400}, net=NET, config=cfg, progress=False)
    assert e.value.step == 7 and e.value.checkpoint_step == 5
    tensors, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 5
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
