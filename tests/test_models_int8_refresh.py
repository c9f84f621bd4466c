"""Refreshing the served INT8 student in float32 keeps it faithful."""

from __future__ import annotations

import copy

import pytest
import torch

from data.features import FeatureSpace
from models.network import Batch, NetworkConfig, RecNetwork
from models.quantize import (
    WEIGHT_RANGE,
    Int8Refresher,
    dequantize_rows,
    quantize_dense,
    quantize_head,
    quantize_rows,
    quantize_tables,
)

DECAY = 0.9
TABLE = "item_tables.embedding_bags.t_item_id.weight"


@pytest.fixture
def student() -> RecNetwork:
    torch.manual_seed(0)
    space = FeatureSpace(
        user_ids=[1, 2],
        item_ids=list(range(1, 41)),
        user_features={"gender": "categorical"},
        user_vocab={"gender": ["F", "M"]},
        item_vocab={"genres": ["a", "b"]},
        item_tokens={"genres": [[1] if i % 2 else [2] for i in range(40)]},
    )
    return RecNetwork(NetworkConfig.from_space(space, use_user_id=False), space.item_tokens)


def row_step(rows: torch.Tensor) -> torch.Tensor:
    """One quantization step per row: its range over 255 levels."""
    return (rows.max(1).values - rows.min(1).values) / 255


def drift(model: RecNetwork, step: int) -> None:
    """The float student keeps learning, and its tables' range keeps growing."""
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.03).add_(0.05 * torch.randn_like(param) + 0.01 * step)


def test_rows_round_trip_within_half_a_step():
    rows = torch.randn(50, 32) * torch.linspace(0.1, 10, 50)[:, None]
    back = dequantize_rows(quantize_rows(rows))
    assert ((back - rows).abs().amax(1) <= row_step(rows) * 0.5 + 1e-3).all()


def test_repeated_refreshes_stay_within_one_step_of_the_float_ema(student):
    served = quantize_tables(student)
    refresher = Int8Refresher(served, DECAY)
    exact = dequantize_rows(served.state_dict()[TABLE]).clone()
    naive = served.state_dict()[TABLE].clone()
    source = copy.deepcopy(student)
    for step in range(60):
        drift(source, step)
        theta = source.state_dict()[TABLE]
        refresher.refresh(source)
        exact.lerp_(theta, 1 - DECAY)
        # What the refresher avoids: updating the INT8 values themselves.
        naive = quantize_rows(dequantize_rows(naive).lerp_(theta, 1 - DECAY))

    served_rows = dequantize_rows(served.state_dict()[TABLE])
    error = (served_rows - exact).abs().amax(1)
    assert (error <= row_step(exact) + 1e-4).all(), float((error / row_step(exact)).max())
    naive_error = (dequantize_rows(naive) - exact).abs().amax(1)
    assert naive_error.mean() > error.mean()


def test_refreshed_student_scores_like_a_fresh_quantization(student):
    served = quantize_tables(student)
    refresher = Int8Refresher(served, DECAY)
    source = copy.deepcopy(student)
    exact = copy.deepcopy(student)
    for step in range(10):
        drift(source, step)
        refresher.refresh(source)
        with torch.no_grad():
            for e, s in zip(exact.parameters(), source.parameters()):
                e.lerp_(s, 1 - DECAY)
    fresh = quantize_tables(exact)
    for name, tensor in fresh.state_dict().items():
        if tensor.dtype != torch.uint8:
            torch.testing.assert_close(served.state_dict()[name], tensor, atol=1e-5, rtol=0)


def test_refresh_refuses_int8_dense_layers(student):
    with pytest.raises(ValueError, match="float or static INT8 dense layers"):
        Int8Refresher(quantize_dense(quantize_tables(student)), DECAY)


def static_student(student: RecNetwork) -> torch.nn.Module:
    """``student`` with INT8 tables and a static INT8 head, calibrated on
    random users scored against the whole catalogue."""
    generator = torch.Generator().manual_seed(5)
    size, items = 16, student.config.num_items
    batch = Batch(
        user_idx=torch.zeros(size, dtype=torch.int64),
        user_feats=torch.randint(0, 3, (size, 1), generator=generator),
        item_idx=torch.zeros(size, dtype=torch.int64),
        history=torch.randint(1, items, (size, 5), generator=generator),
        history_len=torch.randint(1, 6, (size,), generator=generator),
    )
    return quantize_head(quantize_tables(student), [batch], torch.arange(items))


def channel_step(weight: torch.Tensor) -> torch.Tensor:
    """One quantization step per output channel of a 7-bit symmetric weight."""
    low, high = WEIGHT_RANGE
    return weight.abs().amax(1) / ((high - low) / 2)


def test_static_head_refreshes_within_one_step_of_the_float_ema(student):
    served = static_student(student)
    refresher = Int8Refresher(served, DECAY)
    columns = served.head.segment_scales.repeat_interleave(served.head.dim)
    first, second = served.head.hidden
    exact = [first.weight().dequantize() / columns, second.weight().dequantize()]
    exact_out = served.head.out.weight.detach().clone()
    source = copy.deepcopy(student)
    for step in range(30):
        drift(source, step)
        refresher.refresh(source)
        exact[0].lerp_(source.head[0].weight.detach(), 1 - DECAY)
        exact[1].lerp_(source.head[2].weight.detach(), 1 - DECAY)
        exact_out.lerp_(source.head[4].weight.detach(), 1 - DECAY)

    served_weights = [first.weight().dequantize() / columns, second.weight().dequantize()]
    for layer, (got, want) in enumerate(zip(served_weights, exact, strict=True)):
        folded = want * columns if layer == 0 else want
        error = ((got - want) * (columns if layer == 0 else 1)).abs().amax(1)
        assert (error <= channel_step(folded) + 1e-6).all(), layer
    torch.testing.assert_close(served.head.out.weight, exact_out, atol=1e-5, rtol=0)
    # The refreshed student still scores: finite, and the tables moved too.
    assert not torch.equal(
        dequantize_rows(served.state_dict()[TABLE]),
        dequantize_rows(static_student(student).state_dict()[TABLE]),
    )
