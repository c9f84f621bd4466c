"""models.ema_guard and the adaptive EMA: rollback, snapshots, per-tensor decay."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

from models.ema import EMA
from models.ema_guard import DivergenceGuard, SnapshotWindow
from models.snapshot import DoubleBuffer


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@torch.no_grad()
def shift(model: nn.Module, amount: float) -> None:
    for p in model.parameters():
        p.add_(amount)


def copy_of(shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in shadow.items()}


def assert_shadow(ema: EMA, expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        assert torch.equal(ema.shadow[name], value), name


# -- DivergenceGuard ---------------------------------------------------------------


def guarded(store=None, threshold: float = 1.5):
    model = make_model()
    ema = EMA(model, decay=0.995, warmup=False)
    return model, ema, DivergenceGuard(ema, store, threshold=threshold)


def test_improving_losses_pass_and_keep_the_decay() -> None:
    model, ema, guard = guarded()
    for loss in (0.7, 0.6, 0.65, 0.5):
        shift(model, 0.1)
        ema.update(model)
        assert guard.check(loss)
    assert guard.best == 0.5 and guard.trips == 0
    assert ema.active_decay == ema.configured_decay == 0.995


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.76])
def test_divergence_restores_the_last_good_shadow_and_lowers_the_decay(
    bad: float, caplog
) -> None:
    model, ema, guard = guarded(threshold=1.5)
    ema.update(model)
    assert guard.check(0.5)
    good = copy_of(ema.shadow)
    shift(model, 50.0)  # the online model blows up and the average follows
    ema.update(model)
    with caplog.at_level(logging.WARNING, logger="models.ema_guard"):
        assert not guard.check(bad)
    assert_shadow(ema, good)
    assert ema.active_decay == pytest.approx(0.99)
    assert ema.configured_decay == 0.995
    assert "diverged" in caplog.text and "restored" in caplog.text
    assert guard.trips == 1 and guard.best == 0.5


def test_a_loss_within_the_threshold_passes() -> None:
    _, ema, guard = guarded(threshold=1.5)
    assert guard.check(0.5)
    assert guard.check(0.74)
    assert ema.active_decay == 0.995


def test_each_trip_halves_the_horizon_down_to_the_floor() -> None:
    model = make_model()
    ema = EMA(model, decay=0.995, warmup=False)
    guard = DivergenceGuard(ema, threshold=2.0, min_decay=0.95)
    assert guard.check(1.0)
    seen = []
    for _ in range(4):
        guard.check(math.nan)
        seen.append(ema.active_decay)
    assert seen == pytest.approx([0.99, 0.98, 0.96, 0.95])
    assert ema.current_decay() == pytest.approx(0.95)


def test_a_first_check_that_diverges_has_nothing_to_restore(caplog) -> None:
    model, ema, guard = guarded()
    before = copy_of(ema.shadow)
    with caplog.at_level(logging.WARNING, logger="models.ema_guard"):
        assert not guard.check(math.nan)
    assert "no good shadow" in caplog.text
    assert_shadow(ema, before)
    assert ema.active_decay == pytest.approx(0.99)


def test_the_restored_shadow_is_republished() -> None:
    model = make_model()
    ema = EMA(model, decay=0.995, warmup=False)
    buffer = DoubleBuffer(model, background=True)
    guard = DivergenceGuard(ema, buffer)
    ema.update(model)
    assert guard.check(0.5)
    good = copy_of(ema.shadow)
    shift(model, 50.0)
    ema.update(model)
    buffer.publish(ema.synced_shadow(), ema.num_updates)
    assert not guard.check(math.nan)
    buffer.wait()
    assert buffer.version == 2
    with buffer.read() as snapshot:
        state = snapshot.module.state_dict()
        for name, value in good.items():
            assert torch.equal(state[name], value), name
    buffer.close()


def test_guard_with_a_window_restores_from_disk(tmp_path) -> None:
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=False)
    window = SnapshotWindow(tmp_path, keep=2)
    guard = DivergenceGuard(ema, window)
    for loss in (0.8, 0.6):
        shift(model, 0.1)
        ema.update(model)
        assert guard.check(loss)
    good = copy_of(ema.shadow)
    assert window.steps == [1, 2]
    shift(model, 50.0)
    ema.update(model)
    assert not guard.check(5.0)
    assert_shadow(ema, good)


def test_guard_threshold_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="threshold"):
        DivergenceGuard(EMA(make_model()), threshold=1.0)


def test_guard_restores_lazy_tables_exactly() -> None:
    torch.manual_seed(0)
    bags = nn.ModuleDict({"t": nn.EmbeddingBag(9, 3)})
    model = nn.ModuleDict({"embedding_bags": bags})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9, warmup=False, lazy_tables=True, optimizer=optimizer)
    guard = DivergenceGuard(ema)
    table = model["embedding_bags"]["t"]
    for step, loss in enumerate((0.5, math.nan)):
        ids = torch.tensor([[step, step + 1]])
        table(ids).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model)
        good = copy_of(ema.shadow) if step == 0 else good
        guard.check(loss)
    assert_shadow(ema, good)
    ema.update(model)  # and the average carries on from the restored rows
    expected = 0.9 * good["embedding_bags.t.weight"] + 0.1 * table.weight.detach()
    torch.testing.assert_close(ema.shadow["embedding_bags.t.weight"], expected)


# -- SnapshotWindow -----------------------------------------------------------------


def test_window_keeps_the_last_n_snapshots(tmp_path) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    window = SnapshotWindow(tmp_path, keep=3)
    for step, metric in zip(range(10, 60, 10), (0.9, 0.4, 0.7, 0.5, 0.6)):
        shift(model, 1.0)
        ema.update(model)
        window.save(ema, metric, step)
    assert window.steps == [30, 40, 50]
    files = sorted(p.name for p in tmp_path.glob("snapshot-*.pt"))
    assert files == ["snapshot-30.pt", "snapshot-40.pt", "snapshot-50.pt"]
    index = json.loads((tmp_path / "window.json").read_text())
    assert index["keep"] == 3
    assert {e["step"]: e["metric"] for e in index["snapshots"]} == {
        30: 0.7,
        40: 0.5,
        50: 0.6,
    }
    assert window.best() == 40, "step 20 had the best metric but was dropped"
    assert window.latest() == 50


def test_window_snapshots_load_with_weights_only_and_roll_back(tmp_path) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    window = SnapshotWindow(tmp_path, keep=2)
    ema.update(model)
    window.save(ema, 0.3, 1)
    saved = copy_of(ema.shadow)
    raw = torch.load(tmp_path / "snapshot-1.pt", weights_only=True)
    assert set(raw) == set(saved)
    shift(model, 3.0)
    ema.update(model)
    window.restore(ema, window.best())
    assert_shadow(ema, saved)
    with pytest.raises(KeyError, match="kept"):
        window.load(99)


def test_window_resumes_from_its_folder_and_skips_nan(tmp_path) -> None:
    ema = EMA(make_model(), decay=0.5)
    first = SnapshotWindow(tmp_path, keep=3)
    first.save(ema, math.nan, 1)
    assert first.best() is None
    first.save(ema, 0.2, 2)
    first.save(ema, 0.1, 2)  # the same step again replaces it
    again = SnapshotWindow(tmp_path, keep=3)
    assert again.steps == [1, 2]
    assert again.best() == 2
    assert json.loads((tmp_path / "window.json").read_text())["snapshots"][0][
        "metric"
    ] is None


def test_window_keep_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError, match="keep"):
        SnapshotWindow(tmp_path, keep=0)


# -- adaptive EMA -------------------------------------------------------------------


def test_a_fast_moving_tensor_gets_a_lower_decay() -> None:
    model = make_model()
    ema = EMA(model, decay=0.999, warmup=False, adaptive=True)
    fixed = EMA(model, decay=0.999, warmup=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():  # only the first layer moves
            model[0].weight.add_(torch.randn(8, 4, generator=generator))
        ema.update(model)
        fixed.update(model)
    decays = ema.tensor_decays()
    assert decays["0.weight"] < decays["2.weight"]
    assert decays["2.weight"] == decays["2.bias"] == decays["0.bias"] == 0.999
    assert 0.99 <= decays["0.weight"] < 0.995, "a big mover is near the floor"
    fast_gap = (ema.shadow["0.weight"] - model[0].weight).norm()
    assert fast_gap < (fixed.shadow["0.weight"] - model[0].weight).norm()


def test_adaptive_with_still_tensors_is_the_fixed_ema() -> None:
    model = make_model()
    adaptive = EMA(model, decay=0.995, warmup=True, adaptive=True)
    fixed = EMA(model, decay=0.995, warmup=True)
    for _ in range(15):
        adaptive.update(model)
        fixed.update(model)
        assert adaptive.tensor_decays() == fixed.tensor_decays()
    assert all(d == fixed.current_decay() for d in adaptive.tensor_decays().values())
    assert_shadow(adaptive, fixed.shadow)


def test_adaptive_moving_by_the_scale_is_halfway_to_the_floor() -> None:
    ema = EMA(make_model(), decay=0.999, adaptive=True, adaptive_scale=0.02)
    assert ema._decay_for(0.02, 0.999) == pytest.approx(0.9945)
    assert ema._decay_for(0.0, 0.999) == 0.999
    assert ema._decay_for(1e9, 0.999) == pytest.approx(0.99)
    assert ema._decay_for(1.0, 0.9) == 0.9, "no room below a decay under the floor"


def test_adaptive_state_round_trips() -> None:
    model = make_model()
    ema = EMA(model, decay=0.999, warmup=False, adaptive=True, adaptive_scale=0.05)
    shift(model, 0.5)
    ema.update(model)
    resumed = EMA(make_model(), decay=0.5)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.adaptive and resumed.adaptive_scale == 0.05
    assert resumed.tensor_decays() == ema.tensor_decays()
