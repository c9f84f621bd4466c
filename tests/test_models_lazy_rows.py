"""The fused row catch-up against the torch ops it replaces."""

from __future__ import annotations

import pytest
import torch

from models import lazy_rows

ROWS, DIM = 20_000, 8


def torch_catch_up(shadow, source, last, weights, base, rows, now) -> None:
    """The reference: gathers, ``lerp_``, scatter and fill as torch ops."""
    weight = weights.index_select(0, last.index_select(0, rows) - base)  # [R]
    caught_up = shadow.index_select(0, rows)  # [R, D]
    caught_up.lerp_(source.index_select(0, rows), weight.unsqueeze(1))
    shadow.index_copy_(0, rows, caught_up)
    last.index_fill_(0, rows, now)


def tables(seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shadow = torch.randn(ROWS, DIM, generator=generator)
    source = torch.randn(ROWS, DIM, generator=generator)
    # Rows last caught up at updates 3..9, weights tabulated from update 3.
    last = torch.randint(3, 10, (ROWS,), generator=generator)
    weights = torch.rand(8, generator=generator)  # index 7 is update 10, now
    weights[7] = 0.0
    return shadow, source, last, weights


@pytest.mark.parametrize("count", [1, 100, 3 * lazy_rows.PARALLEL_ROWS])
def test_fused_catch_up_matches_torch_ops_with_duplicates(count: int) -> None:
    shadow, source, last, weights = tables(seed=count)
    rows = torch.randint(0, ROWS, (count,), generator=torch.Generator().manual_seed(1))
    rows = torch.cat([rows, rows[: count // 3]])  # a third listed twice
    expected_shadow, expected_last = shadow.clone(), last.clone()
    torch_catch_up(expected_shadow, source, expected_last, weights, 3, rows, 10)

    lazy_rows.catch_up_rows(shadow, source, last, weights, 3, rows, 10)

    assert torch.equal(last, expected_last)
    torch.testing.assert_close(shadow, expected_shadow, atol=1e-6, rtol=0)
    untouched = torch.ones(ROWS, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(shadow[untouched], tables(seed=count)[0][untouched])


@pytest.mark.parametrize("bad", [-1, ROWS])
def test_out_of_range_rows_are_refused_before_any_write(bad: int) -> None:
    shadow, source, last, weights = tables(seed=0)
    before = shadow.clone()
    with pytest.raises(IndexError, match=rf"\[0, {ROWS}\)"):
        lazy_rows.catch_up_rows(
            shadow, source, last, weights, 3, torch.tensor([0, bad]), 10
        )
    assert torch.equal(shadow, before)


def test_only_contiguous_float32_cpu_tables_are_fused() -> None:
    table = torch.zeros(4, 2)
    assert lazy_rows.fused(table, table)
    assert not lazy_rows.fused(table, table.to(torch.bfloat16))
    assert not lazy_rows.fused(table, torch.zeros(2, 4).t())
    assert not lazy_rows.fused(table, table.clone().requires_grad_())
