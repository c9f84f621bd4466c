"""models.ema: the float32 shadow, its schedule, and its checkpoint."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from models.ema import EMA, decay_for_steps


class Tiny(nn.Module):
    """Two float layers, a BatchNorm (float stats, int counter) and an int buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        k: v.detach().float().clone()
        for k, v in state.items()
        if v.is_floating_point()
    }


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """A stand-in optimizer step: every float tensor moves."""
    generator = torch.Generator().manual_seed(seed)
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.add_(noise.to(tensor.dtype))


def test_shadow_matches_a_reference_loop() -> None:
    model = make_model()
    decay = 0.9
    ema = EMA(model, decay=decay, warmup=False)
    reference = float_state(model)
    for step in range(7):
        perturb(model, seed=step)
        ema.update(model)
        for name, p in float_state(model).items():
            reference[name] = decay * reference[name] + (1 - decay) * p
    assert set(ema.shadow) == set(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(ema.shadow[name], expected, atol=1e-6, rtol=0)
    assert ema.num_updates == 7


def test_shadow_starts_as_a_copy_of_the_model() -> None:
    model = make_model()
    ema = EMA(model)
    for name, p in float_state(model).items():
        assert torch.equal(ema.shadow[name], p)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    assert not torch.equal(ema.shadow["fc1.weight"], model.fc1.weight), "not aliased"


def test_warmup_decay_sequence() -> None:
    decay = 0.95
    model = make_model()
    ema = EMA(model, decay=decay, warmup=True)
    reference = float_state(model)
    for n in range(40):
        expected_decay = min(decay, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(expected_decay, abs=1e-12)
        perturb(model, seed=n)
        ema.update(model)
        for name, p in float_state(model).items():
            reference[name] = (
                expected_decay * reference[name] + (1 - expected_decay) * p
            )
    torch.testing.assert_close(ema.shadow["fc1.weight"], reference["fc1.weight"])
    # The ramp reaches 0.95 at n = 170: still ramping after 40 updates.
    assert ema.current_decay() == pytest.approx(41 / 50, abs=1e-12)


def test_warmup_first_decays_and_cap() -> None:
    ema = EMA(make_model(), decay=0.5, warmup=True)
    model = make_model(1)
    seen = []
    for _ in range(4):
        seen.append(ema.current_decay())
        ema.update(model)
    assert seen == pytest.approx([0.1, 2 / 11, 3 / 12, 4 / 13], abs=1e-12)
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5, "capped at the configured decay"
    assert ema.decay == 0.5, "the schedule never changes the configured decay"


def test_without_warmup_the_decay_is_fixed() -> None:
    ema = EMA(make_model(), decay=0.99, warmup=False)
    assert ema.current_decay() == 0.99
    ema.update(make_model(1))
    assert ema.current_decay() == 0.99


def test_bf16_model_gets_a_float32_shadow_that_moves() -> None:
    model = make_model().to(torch.bfloat16)
    decay = 0.999
    ema = EMA(model, decay=decay, warmup=False)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update(model)

    target = model.fc1.weight.detach().float()
    change = ema.shadow["fc1.weight"] - before["fc1.weight"]
    expected = (1 - decay) * (target - before["fc1.weight"])
    assert change.abs().min() > 5e-4, "the shadow moved everywhere"
    torch.testing.assert_close(change, expected, atol=1e-6, rtol=1e-4)


def test_source_of_another_dtype_is_cast() -> None:
    model = make_model()
    ema = EMA(model, decay=0.8, warmup=False)
    start = ema.shadow["fc2.weight"].clone()
    twin = copy.deepcopy(model).double()
    with torch.no_grad():
        twin.fc2.weight.mul_(3.0)
    ema.update(twin)
    assert ema.shadow["fc2.weight"].dtype == torch.float32
    expected = 0.8 * start + 0.2 * twin.fc2.weight.float()
    torch.testing.assert_close(ema.shadow["fc2.weight"], expected, atol=1e-6, rtol=0)
    ema.update(twin.to(torch.bfloat16))  # and the other way: no error
    assert ema.shadow["fc2.weight"].dtype == torch.float32


def test_integer_buffers_are_copied_not_averaged() -> None:
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=False)
    assert "steps" in ema.copied and "steps" not in ema.shadow
    assert "norm.num_batches_tracked" in ema.copied
    model.steps.fill_(7)
    ema.update(model)
    assert ema.copied["steps"].item() == 7
    assert ema.copied["steps"].dtype == torch.int64
    model.steps.fill_(9)
    assert ema.copied["steps"].item() == 7, "a copy, not an alias"


def test_batchnorm_running_stats_are_averaged() -> None:
    model = make_model()
    decay = 0.75
    ema = EMA(model, decay=decay, warmup=False)
    mean0 = model.norm.running_mean.clone()
    var0 = model.norm.running_var.clone()
    model.train()
    model(torch.randn(32, 4) * 5 + 3)  # moves the running statistics
    assert not torch.allclose(model.norm.running_mean, mean0)
    ema.update(model)
    torch.testing.assert_close(
        ema.shadow["norm.running_mean"],
        decay * mean0 + (1 - decay) * model.norm.running_mean,
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        ema.shadow["norm.running_var"],
        decay * var0 + (1 - decay) * model.norm.running_var,
        atol=1e-6,
        rtol=0,
    )
    assert ema.copied["norm.num_batches_tracked"].item() == 1


def test_copy_to_writes_the_shadow_into_a_model() -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    perturb(model, seed=1)
    model.steps.fill_(3)
    ema.update(model)
    target = make_model(seed=9)
    ema.copy_to(target)
    for name, value in ema.shadow.items():
        assert torch.equal(float_state(target)[name], value), name
    assert target.steps.item() == 3


class Renamed(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.out = self.fc2
        del self.fc2


class Smaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)


def test_renamed_tensor_raises_key_error_naming_it() -> None:
    ema = EMA(make_model())
    with pytest.raises(KeyError) as caught:
        ema.update(Renamed())
    message = str(caught.value)
    assert "fc2.weight" in message and "out.weight" in message
    assert ema.num_updates == 0


def test_missing_tensor_raises_key_error_naming_it() -> None:
    ema = EMA(make_model())
    with pytest.raises(KeyError, match="fc2.bias"):
        ema.update(Smaller())
    with pytest.raises(KeyError, match="norm.running_mean"):
        ema.copy_to(Smaller())


@pytest.mark.parametrize("every", [1, 3, 4])
def test_update_every_n_calls(every: int) -> None:
    model = make_model()
    decay = 0.6
    ema = EMA(model, decay=decay, warmup=False, update_every=every)
    reference = float_state(model)["fc1.weight"]
    done = []
    for call in range(1, 13):
        perturb(model, seed=call)
        done.append(ema.step(model))
        if call % every == 0:
            reference = decay * reference + (1 - decay) * model.fc1.weight.detach()
    assert done == [call % every == 0 for call in range(1, 13)]
    assert ema.num_calls == 12
    assert ema.num_updates == 12 // every
    torch.testing.assert_close(ema.shadow["fc1.weight"], reference, atol=1e-6, rtol=0)


def checkpoint(ema: EMA) -> dict:
    """Through bytes, as a real checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resumed_ema_continues_identically() -> None:
    model = make_model()
    original = EMA(model, decay=0.97, warmup=True, update_every=2)
    for call in range(5):
        perturb(model, seed=call)
        model.steps.add_(1)
        original.step(model)
    saved = checkpoint(original)

    resumed = EMA(make_model(seed=5), decay=0.5, warmup=False, update_every=1)
    resumed.load_state_dict(saved)
    assert (resumed.decay, resumed.warmup, resumed.update_every) == (0.97, True, 2)
    assert (resumed.num_updates, resumed.num_calls) == (2, 5)
    assert resumed.current_decay() == original.current_decay()
    for name in original.shadow:
        assert torch.equal(resumed.shadow[name], original.shadow[name]), name
    assert resumed.copied["steps"].item() == 4, "copied at the 4th call"

    for call in range(5, 12):
        perturb(model, seed=call)
        assert original.step(model) == resumed.step(model)
    for name in original.shadow:
        assert torch.equal(resumed.shadow[name], original.shadow[name]), name
    assert resumed.num_updates == original.num_updates == 6


def test_state_for_another_model_is_refused() -> None:
    saved = checkpoint(EMA(make_model()))
    other = EMA(Smaller())
    with pytest.raises(KeyError):
        other.load_state_dict(saved)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(make_model(), decay=decay)


def test_update_every_below_1_is_refused() -> None:
    with pytest.raises(ValueError, match="update_every"):
        EMA(make_model(), update_every=0)


def test_horizon() -> None:
    assert EMA(make_model(), decay=0.995).horizon == pytest.approx(200, rel=1e-9)


def test_decay_for_steps_long_and_short_runs() -> None:
    assert decay_for_steps(1_000_000) == pytest.approx(0.9995, abs=1e-12)
    assert decay_for_steps(200_000) == pytest.approx(0.9995, abs=1e-12)
    for steps in (1, 100, 1_000, 9_999, 10_000):
        assert decay_for_steps(steps) == pytest.approx(0.99, abs=1e-12), steps
    assert decay_for_steps(20_000) == pytest.approx(0.995, abs=1e-12)


def test_decay_for_steps_is_monotone() -> None:
    steps = sorted({int(1.2**k) for k in range(1, 90)})
    decays = [decay_for_steps(n) for n in steps]
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert min(decays) >= 0.99 and max(decays) <= 0.9995
    assert decays[0] < decays[-1]


@pytest.mark.parametrize("steps", [0, -5])
def test_decay_for_steps_needs_a_positive_count(steps: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        decay_for_steps(steps)


def test_active_decay_caps_the_schedule_and_the_configured_decay_stays() -> None:
    ema = EMA(make_model(), decay=0.995, warmup=True)
    ema.num_updates = 2000  # past the ramp, which reaches 0.995 at n = 1791
    assert ema.current_decay() == 0.995
    ema.set_active_decay(0.9)
    ema.num_updates = 5
    assert ema.current_decay() == pytest.approx(6 / 15), "the ramp below the cap"
    ema.num_updates = 2000
    assert ema.current_decay() == 0.9
    ema.set_active_decay(0.995)
    ema.set_active_decay(0.99)
    assert ema.current_decay() == 0.99
    assert (ema.configured_decay, ema.decay, ema.active_decay) == (0.995, 0.995, 0.99)
    assert ema.horizon == pytest.approx(100, rel=1e-9)
    with pytest.raises(ValueError, match="configured"):
        ema.set_active_decay(0.999)
    resumed = EMA(make_model(), decay=0.5)
    resumed.load_state_dict(checkpoint(ema))
    assert (resumed.configured_decay, resumed.active_decay) == (0.995, 0.99)


def test_old_state_without_active_decay_loads() -> None:
    saved = checkpoint(EMA(make_model(), decay=0.97))
    for key in ("active_decay", "adaptive", "movement", "adaptive_floor"):
        del saved[key]
    resumed = EMA(make_model(), decay=0.5)
    resumed.load_state_dict(saved)
    assert resumed.active_decay == 0.97 and not resumed.adaptive


def test_swapped_evaluates_with_the_ema_and_restores_the_raw_weights() -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    perturb(model, seed=1)
    ema.update(model)
    perturb(model, seed=2)
    raw = float_state(model)
    with ema.swapped(model) as swapped:
        assert swapped is model and ema.is_swapped
        for name, value in ema.shadow.items():
            assert torch.equal(float_state(model)[name], value), name
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update(model)
        with pytest.raises(RuntimeError, match="swapped"):
            with ema.swapped(model):
                pass
    assert not ema.is_swapped
    for name, value in raw.items():
        assert torch.equal(float_state(model)[name], value), name
    assert ema.num_updates == 1


def test_swapped_restores_the_raw_weights_after_an_error() -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    perturb(model, seed=1)
    raw = float_state(model)
    with pytest.raises(ZeroDivisionError), ema.swapped(model):
        1 / 0
    for name, value in raw.items():
        assert torch.equal(float_state(model)[name], value), name


def train(model: Tiny, optimizer, ema: EMA, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model)


def through_bytes(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_taken_while_swapped_resumes_from_the_raw_weights() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = EMA(model, decay=0.8, warmup=True)
    train(model, optimizer, ema, range(6))
    raw = float_state(model)
    with ema.swapped(model):
        model.eval()
        model(torch.randn(3, 4))  # an evaluation pass on the EMA weights
        naive = {k: v.clone() for k, v in model.state_dict().items()}
        saved = through_bytes(ema.checkpoint(model, optimizer))
    model.train()
    assert not torch.equal(naive["fc1.weight"], raw["fc1.weight"]), "the trap"
    for name, value in raw.items():
        assert torch.equal(saved["model"][name], value), name
    train(model, optimizer, ema, range(6, 12))

    resumed = make_model(seed=7)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_ema = EMA(resumed, decay=0.1)
    resumed_ema.load_state_dict(saved["ema"])
    train(resumed, resumed_opt, resumed_ema, range(6, 12))
    for name, value in float_state(model).items():
        assert torch.equal(float_state(resumed)[name], value), name
    for name, value in ema.shadow.items():
        assert torch.equal(resumed_ema.shadow[name], value), name
    assert resumed.steps.item() == model.steps.item()


def test_raw_state_dict_outside_a_swap_is_the_model_state() -> None:
    model = make_model()
    ema = EMA(model)
    state = ema.raw_state_dict(model)
    assert state.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    assert "optimizer" not in ema.checkpoint(model)


class Many(nn.Module):
    """Hundreds of small tensors and two large ones."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.ParameterList(
            nn.Parameter(torch.randn(1000 + 37 * i)) for i in range(300)
        )
        self.large = nn.ParameterList(
            nn.Parameter(torch.randn(40_000)) for _ in range(2)
        )


@pytest.mark.parametrize(
    ("adaptive", "contiguous"), [(False, False), (True, False), (False, True)]
)
def test_many_small_tensors_match_a_reference_loop(
    adaptive: bool, contiguous: bool
) -> None:
    torch.manual_seed(0)
    model = Many()
    ema = EMA(
        model, decay=0.99, warmup=False, adaptive=adaptive, contiguous=contiguous
    )
    reference = float_state(model)
    for step in range(3):
        perturb(model, seed=step)
        decays = ema.tensor_decays() if not adaptive else None
        ema.update(model)
        if adaptive:  # the decays this update used, from the movement it saw
            decays = ema.tensor_decays()
        for name, p in float_state(model).items():
            d = decays[name]
            reference[name] = d * reference[name] + (1 - d) * p
    for name, expected in reference.items():
        torch.testing.assert_close(ema.shadow[name], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_model_cast_in_place_is_paired_again(contiguous: bool) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False, contiguous=contiguous)
    ema.update(model)
    model.to(torch.float64)  # same parameter objects, another dtype
    with torch.no_grad():
        model.fc1.weight.fill_(2.0)
    ema.update(model)
    assert ema.shadow["fc1.weight"].dtype == torch.float32
    start = float_state(make_model())["fc1.weight"]
    torch.testing.assert_close(ema.shadow["fc1.weight"], 0.5 * start + 1.0)


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_tensor_replaced_after_updates_is_followed(contiguous: bool) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False, contiguous=contiguous)
    ema.update(model)
    model.fc1.weight = nn.Parameter(torch.full_like(model.fc1.weight, 7.0))
    before = ema.shadow["fc1.weight"].clone()

    ema.update(model)

    expected = 0.5 * before + 0.5 * 7.0
    assert torch.allclose(ema.shadow["fc1.weight"], expected)


@pytest.mark.parametrize("contiguous", [False, True])
def test_a_dtype_changed_in_place_after_updates_is_cast(contiguous: bool) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False, contiguous=contiguous)
    ema.update(model)
    model.half()  # same Parameter objects, new dtype
    source = model.fc2.bias.detach().float()
    before = ema.shadow["fc2.bias"].clone()

    ema.update(model)

    assert ema.shadow["fc2.bias"].dtype == torch.float32
    assert torch.allclose(ema.shadow["fc2.bias"], 0.5 * before + 0.5 * source)


def test_a_module_added_after_updates_is_refused_by_name() -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False)
    ema.update(model)
    model.extra = nn.Linear(2, 2)

    with pytest.raises(KeyError, match="extra.weight"):
        ema.update(model)


def test_contiguous_packs_small_tensors_keeping_objects_and_values() -> None:
    torch.manual_seed(0)
    model = Many()
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}

    EMA(model, decay=0.99, contiguous=True)

    for name, p in model.named_parameters():
        assert p is before[name][0], f"{name} is a new object"
        assert torch.equal(p, before[name][1]), f"{name} changed value"
    storages = {p.untyped_storage().data_ptr() for p in model.small}
    assert len(storages) == 1, "the small tensors share one buffer"
    assert all(p.untyped_storage().data_ptr() not in storages for p in model.large)


def test_contiguous_trains_and_averages_exactly_like_unpacked() -> None:
    packed_model, plain_model = make_model(), make_model()
    packed = EMA(packed_model, decay=0.9, warmup=True, contiguous=True)
    plain = EMA(plain_model, decay=0.9, warmup=True)
    optimizers = [
        torch.optim.Adam(m.parameters(), lr=0.01) for m in (packed_model, plain_model)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(8, 4, generator=generator)  # [B, 4]
        for model, optimizer, ema in zip(
            (packed_model, plain_model), optimizers, (packed, plain), strict=True
        ):
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model)
    for name, expected in plain.shadow.items():
        assert torch.equal(packed.shadow[name], expected), name
    assert torch.equal(packed.copied["norm.num_batches_tracked"], torch.tensor(6))


def test_packed_tensor_given_new_storage_is_averaged_alone(caplog) -> None:
    model = make_model()
    ema = EMA(model, decay=0.5, warmup=False, contiguous=True)
    ema.update(model)
    model.fc1.weight.data = torch.full_like(model.fc1.weight, 7.0)  # new storage
    before = ema.shadow["fc1.weight"].clone()
    bias = model.fc2.bias.detach().clone()
    bias_before = ema.shadow["fc2.bias"].clone()

    ema.update(model)

    assert "new storage" in caplog.text
    torch.testing.assert_close(ema.shadow["fc1.weight"], 0.5 * before + 3.5)
    torch.testing.assert_close(ema.shadow["fc2.bias"], 0.5 * bias_before + 0.5 * bias)


def test_contiguous_state_round_trips_through_torch_save() -> None:
    model = make_model()
    ema = EMA(model, decay=0.9, warmup=False, contiguous=True)
    perturb(model, seed=0)
    ema.update(model)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMA(make_model(1), decay=0.9, warmup=False, contiguous=True)

    restored.load_state_dict(torch.load(buffer, weights_only=True))

    for name, expected in ema.shadow.items():
        assert torch.equal(restored.shadow[name], expected), name


def test_contiguous_with_adaptive_is_refused() -> None:
    with pytest.raises(ValueError, match="set only one of them"):
        EMA(make_model(), contiguous=True, adaptive=True)
