"""The core-splitting multi-tensor lerp matches torch's foreach lerp exactly."""

from __future__ import annotations

import pytest
import torch

from models.multi_tensor import GRAIN, MIN_SPLIT, SplitLerp


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _tensors(seed: int) -> list[torch.Tensor]:
    sizes_from = torch.Generator().manual_seed(0)  # same sizes whatever the seed
    small = torch.randint(1, GRAIN, (200,), generator=sizes_from)
    sizes = [3 * GRAIN, GRAIN + 1] + [int(n) for n in small]
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=generator) for n in sizes]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_split_lerp_equals_foreach(two_threads, per_tensor: bool) -> None:
    shadows, sources = _tensors(0), _tensors(1)
    expected = [s.clone() for s in shadows]
    weight = [0.001 * (i % 7 + 1) for i in range(len(shadows))] if per_tensor else 0.01
    lerp = SplitLerp(shadows)

    lerp(sources, weight)
    torch._foreach_lerp_(expected, sources, weight)

    assert lerp.split
    assert sum(shadows[i].numel() for g in lerp.groups for i in g) == sum(
        s.numel() for s in shadows
    )
    for got, want in zip(shadows, expected, strict=True):
        assert torch.equal(got, want)


def test_no_split_on_one_thread_or_little_work(two_threads) -> None:
    few = [torch.rand(100) for _ in range(10)]
    assert sum(t.numel() for t in few) < MIN_SPLIT
    assert not SplitLerp(few).split

    torch.set_num_threads(1)
    many = _tensors(0)
    lerp = SplitLerp(many)
    assert not lerp.split
    sources = _tensors(1)
    expected = [s.clone() for s in many]
    lerp(sources, 0.5)
    torch._foreach_lerp_(expected, sources, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(many, expected, strict=True))
