"""models.snapshot.DoubleBuffer: whole teachers for readers, never torn ones."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from models.ema import EMA
from models.snapshot import DoubleBuffer


def make_template() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def filled(template: nn.Module, value: float) -> dict[str, torch.Tensor]:
    """A shadow in which every tensor holds ``value``."""
    return {k: torch.full_like(v, value) for k, v in template.state_dict().items()}


def constants(module: nn.Module) -> set[float]:
    """The distinct values held across every tensor of ``module``."""
    values = set()
    for tensor in module.state_dict().values():
        values.update(torch.unique(tensor).tolist())
    return values


@pytest.mark.parametrize("background", [True, False])
def test_publish_then_wait_shows_the_shadow(background: bool) -> None:
    template = make_template()
    ema = EMA(template, decay=0.9, warmup=False)
    buffer = DoubleBuffer(template, background=background)
    assert buffer.version == 0
    for version in (1, 2, 3):
        with torch.no_grad():
            for p in template.parameters():
                p.add_(1.0)
        ema.update(template)
        buffer.publish(ema.shadow, ema.num_updates)
        buffer.wait()
        assert buffer.version == version
        with buffer.read() as snapshot:
            assert snapshot.version == version
            assert snapshot.num_updates == ema.num_updates
            state = snapshot.module.state_dict()
            for name, value in ema.shadow.items():
                assert torch.equal(state[name], value), name
    buffer.close()


def test_snapshot_is_a_copy_not_the_shadow() -> None:
    template = make_template()
    buffer = DoubleBuffer(template, background=False)
    shadow = filled(template, 1.0)
    buffer.publish(shadow, 1)
    for tensor in shadow.values():
        tensor.fill_(99.0)  # after wait(), the caller may change its shadow
    with buffer.read() as snapshot:
        assert constants(snapshot.module) == {1.0}
        assert not snapshot.module.training
        assert not any(p.requires_grad for p in snapshot.module.parameters())
    buffer.close()


def test_close_finishes_the_publish_in_flight() -> None:
    template = make_template()
    buffer = DoubleBuffer(template, background=True)
    buffer.publish(filled(template, 4.0), 4)
    buffer.close()
    assert buffer.version == 1
    with buffer.read() as snapshot:
        assert constants(snapshot.module) == {4.0}


def test_reader_never_sees_a_mix_of_two_versions() -> None:
    template = make_template()
    buffer = DoubleBuffer(template, background=True)
    buffer.publish(filled(template, 1.0), 1)
    buffer.wait()

    stop = threading.Event()
    problems: list[str] = []
    seen_versions: set[int] = set()
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            with buffer.read() as snapshot:
                version = snapshot.version
                first = constants(snapshot.module)
                time.sleep(0)  # let the writer run while this lease is held
                second = constants(snapshot.module)
            reads += 1
            seen_versions.add(version)
            if first != {float(version)} or second != first:
                problems.append(f"version {version}: saw {first} then {second}")
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    last = 300
    for version in range(2, last + 1):
        buffer.publish(filled(template, float(version)), version)
        if version % 50 == 0:
            time.sleep(0.001)  # let the reader catch up now and then
    buffer.wait()
    time.sleep(0.05)
    stop.set()
    thread.join(10)
    buffer.close()

    assert not thread.is_alive()
    assert not problems, problems[:3]
    assert buffer.version == last
    assert reads > 50, f"the reader only got {reads} leases"
    assert len(seen_versions) > 5, "the reader should see many versions"


def test_leased_snapshot_stays_intact_while_two_versions_are_published() -> None:
    template = make_template()
    buffer = DoubleBuffer(template, background=True)
    buffer.publish(filled(template, 1.0), 1)
    buffer.wait()
    with buffer.read() as held:
        assert held.version == 1
        before = {k: v.clone() for k, v in held.module.state_dict().items()}
        for version in (2, 3):
            buffer.publish(filled(template, float(version)), version)
            buffer.wait()
        assert buffer.version == 3
        after = held.module.state_dict()
        for name, value in before.items():
            assert torch.equal(after[name], value), f"{name} changed under a lease"
        assert held.version == 1
        with buffer.read() as fresh:
            assert fresh.version == 3
            assert constants(fresh.module) == {3.0}
    # Released: further publishes keep working and show whole versions.
    for version in (4, 5, 6):
        buffer.publish(filled(template, float(version)), version)
    buffer.wait()
    with buffer.read() as latest:
        assert latest.version == 6
        assert constants(latest.module) == {6.0}
    buffer.close()


def test_two_readers_can_hold_the_same_version() -> None:
    template = make_template()
    buffer = DoubleBuffer(template, background=False)
    buffer.publish(filled(template, 1.0), 1)
    with buffer.read() as a, buffer.read() as b:
        assert a is b
        assert a.leases == 2
        buffer.publish(filled(template, 2.0), 2)
        buffer.publish(filled(template, 3.0), 3)
        assert constants(a.module) == {1.0}
    assert a.leases == 0
    buffer.close()
