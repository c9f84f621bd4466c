"""models.ema lazy tables: row-wise catch-up that matches the dense average."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from torch import nn

from models import lazy_rows
from models.ema import EMA

ROWS, DIM = 50, 4
# Rows 40.. are never in a batch; row 39 only in the first one.
NEVER = range(40, ROWS)
ONCE = 39


class Bags(nn.Module):
    """An ``EmbeddingBagCollection``-like model: ``embedding_bags.<t>.weight``."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embedding_bags = nn.ModuleDict(
            {
                "users": nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=sparse),
                "goods": nn.EmbeddingBag(ROWS, DIM, mode="mean", sparse=sparse),
            }
        )
        self.head = nn.Linear(2 * DIM, 1)

    def forward(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [self.embedding_bags[k](ids[k]) for k in ("users", "goods")]
        return self.head(torch.cat(pooled, 1)).squeeze(1)  # [B]


TABLES = ["embedding_bags.users.weight", "embedding_bags.goods.weight"]


def make_model(seed: int = 0, sparse: bool = False) -> Bags:
    torch.manual_seed(seed)
    return Bags(sparse)


def batch(step: int) -> dict[str, torch.Tensor]:
    """Random bags of 3 ids per example from rows 0..38 (39 too at step 0)."""
    generator = torch.Generator().manual_seed(1000 + step)
    ids = {
        k: torch.randint(0, ONCE, (6, 3), generator=generator)
        for k in ("users", "goods")
    }
    if step == 0:
        ids["users"][0, 0] = ONCE
    return ids


def touched(ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"embedding_bags.{k}.weight": v.reshape(-1) for k, v in ids.items()}


def train_step(model: Bags, optimizer, step: int, before=None) -> None:
    ids = batch(step)
    loss = model(ids).square().mean()
    optimizer.zero_grad()
    loss.backward()
    if before is not None:
        before(ids)
    optimizer.step()


def assert_same_average(lazy: EMA, dense: EMA, atol: float = 1e-6) -> None:
    lazy_shadow, dense_shadow = lazy.synced_shadow(), dense.synced_shadow()
    assert lazy_shadow.keys() == dense_shadow.keys()
    for name, expected in dense_shadow.items():
        torch.testing.assert_close(lazy_shadow[name], expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("warmup", "every"), [(False, 1), (True, 1), (False, 3), (True, 2)]
)
def test_lazy_matches_dense_with_an_optimizer_hook(warmup: bool, every: int) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dense = EMA(model, decay=0.9, warmup=warmup, update_every=every)
    lazy = EMA(
        model,
        decay=0.9,
        warmup=warmup,
        update_every=every,
        lazy_tables=True,
        optimizer=optimizer,
    )
    assert lazy.lazy_tables == TABLES
    start = {name: model.state_dict()[name].clone() for name in TABLES}
    for step in range(70):  # past the log-decay buffer's first growth (64)
        train_step(model, optimizer, step)
        dense.step(model)
        lazy.step(model)
    assert lazy.num_updates == dense.num_updates == 70 // every
    assert_same_average(lazy, dense)
    users = lazy.shadow[TABLES[0]]
    for row in NEVER:
        assert torch.equal(users[row], start[TABLES[0]][row]), "never touched"
    assert not torch.equal(users[ONCE], start[TABLES[0]][ONCE]), "touched once"


@pytest.mark.parametrize(
    ("fused", "dtype"),
    [(True, torch.float32), (False, torch.float32), (False, torch.bfloat16)],
)
def test_lazy_matches_dense_with_explicit_prepare(fused, dtype, monkeypatch) -> None:
    """Through the fused CPU loop, and through the torch ops that tables it
    does not take (other dtypes, devices) use."""
    if not fused:
        monkeypatch.setattr(lazy_rows, "fused", lambda shadow, source: False)
    model = make_model(1).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dense = EMA(model, decay=0.95, warmup=True)
    lazy = EMA(model, decay=0.95, warmup=True, lazy_tables=TABLES)
    for step in range(40):
        train_step(model, optimizer, step, lambda ids: lazy.prepare(touched(ids)))
        dense.step(model)
        lazy.step(model)
        if step % 13 == 0:  # reads in the middle of the run stay exact
            assert_same_average(lazy, dense)
    assert_same_average(lazy, dense)


def test_untouched_rows_wait_until_the_shadow_is_read() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lazy = EMA(model, decay=0.9, warmup=False, lazy_tables=True, optimizer=optimizer)
    start = model.embedding_bags.users.weight.detach().clone()
    with torch.no_grad():
        model.embedding_bags.users.weight[NEVER.start].add_(1.0)  # not via a step
    lazy.update(model)
    internal = lazy._shadow[TABLES[0]]
    assert torch.equal(internal[NEVER.start], start[NEVER.start]), "still lazy"
    expected = start[NEVER.start] + 0.1
    torch.testing.assert_close(lazy.shadow[TABLES[0]][NEVER.start], expected)


def test_sparse_gradients_with_sparse_adam_for_the_tables() -> None:
    model = make_model(2, sparse=True)
    tables = [model.embedding_bags.users.weight, model.embedding_bags.goods.weight]
    sparse = torch.optim.SparseAdam(tables, lr=0.05)
    adam = torch.optim.Adam(model.head.parameters(), lr=0.05)
    dense = EMA(model, decay=0.9, warmup=True)
    lazy = EMA(
        model, decay=0.9, warmup=True, lazy_tables=True, optimizer=[adam, sparse]
    )
    assert lazy.lazy_tables == TABLES
    for step in range(30):
        ids = batch(step)
        loss = model(ids).square().mean()
        adam.zero_grad()
        sparse.zero_grad()
        loss.backward()
        adam.step()
        sparse.step()
        dense.step(model)
        lazy.step(model)
    assert_same_average(lazy, dense)


def test_torchrec_collection_tables_are_found_and_exact() -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    torch.manual_seed(3)
    config = EmbeddingBagConfig(
        name="t0", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f0"]
    )
    model = nn.ModuleDict({"ebc": EmbeddingBagCollection(tables=[config])})
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    dense = EMA(model, decay=0.8, warmup=False)
    lazy = EMA(model, decay=0.8, warmup=False, lazy_tables=True, optimizer=optimizer)
    assert lazy.lazy_tables == ["ebc.embedding_bags.t0.weight"]
    for step in range(25):
        values = batch(step)["users"].reshape(-1)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0"], values=values, lengths=torch.full((6,), 3)
        )
        loss = model["ebc"](kjt).values().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dense.step(model)
        lazy.step(model)
    assert_same_average(lazy, dense)


@pytest.mark.parametrize(
    ("make_optimizer", "reason"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2), "weight decay"),
        (lambda p: torch.optim.Adam(p, lr=0.01), "Adam"),
        (lambda p: torch.optim.AdamW(p, lr=0.01), "AdamW"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=1e-2), "weight decay"),
        (lambda p: torch.optim.RMSprop(p, lr=0.01), "RMSprop"),
    ],
)
def test_inexact_optimizer_falls_back_to_dense(make_optimizer, reason, caplog) -> None:
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    with caplog.at_level(logging.WARNING, logger="models.ema"):
        lazy = EMA(model, decay=0.9, lazy_tables=True, optimizer=optimizer)
    assert lazy.lazy_tables == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per reason, naming every table"
    assert "stay dense" in warnings[0] and reason in warnings[0]
    assert all(name in warnings[0] for name in TABLES)

    dense = EMA(model, decay=0.9)
    for step in range(8):
        train_step(model, optimizer, step)  # every row moves: only dense is exact
        dense.step(model)
        lazy.step(model)
    for name, expected in dense.shadow.items():
        assert torch.equal(lazy.shadow[name], expected), name


def test_tables_outside_the_given_optimizer_stay_dense(caplog) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="models.ema"):
        lazy = EMA(model, lazy_tables=True, optimizer=optimizer)
    assert lazy.lazy_tables == []
    assert "do not hold it" in caplog.text


def test_row_exact_optimizers_keep_tables_lazy(caplog) -> None:
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: RowWiseAdagrad(p, lr=0.1),  # TorchRec's, for 2-D tables
    ):
        model = make_model()
        tables = [model.embedding_bags.users.weight, model.embedding_bags.goods.weight]
        head = torch.optim.Adam(model.head.parameters())  # dense params: any
        with caplog.at_level(logging.WARNING, logger="models.ema"):
            lazy = EMA(model, lazy_tables=True, optimizer=[head, make(tables)])
        assert lazy.lazy_tables == TABLES
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_lazy_state_round_trip_mid_run_continues_identically() -> None:
    model = make_model(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"decay": 0.9, "warmup": True, "update_every": 2, "lazy_tables": True}
    original = EMA(model, optimizer=optimizer, **kwargs)
    dense = EMA(model, decay=0.9, warmup=True, update_every=2)
    for step in range(11):
        train_step(model, optimizer, step)
        original.step(model)
        dense.step(model)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = EMA(model, optimizer=optimizer, **{**kwargs, "decay": 0.5})
    resumed.load_state_dict(saved)
    assert (resumed.decay, resumed.num_updates, resumed.num_calls) == (0.9, 5, 11)
    for step in range(11, 30):
        train_step(model, optimizer, step)  # both hooks prepare their own rows
        assert original.step(model) == resumed.step(model)
        dense.step(model)
    for name, expected in original.shadow.items():
        assert torch.equal(resumed.shadow[name], expected), name
    assert_same_average(resumed, dense)


def test_prepare_ignores_dense_fallback_tables_and_refuses_unknown() -> None:
    model = make_model()
    ema = EMA(model, lazy_tables=False)
    ema.prepare({TABLES[0]: torch.tensor([1, 2])})  # a dense table: nothing to do
    with pytest.raises(KeyError, match="nope"):
        ema.prepare({"nope.weight": torch.tensor([1])})


def test_explicit_tables_must_be_2d_float_tensors() -> None:
    with pytest.raises(ValueError, match="head.bias"):
        EMA(make_model(), lazy_tables=["head.bias"])
    with pytest.raises(ValueError, match="missing"):
        EMA(make_model(), lazy_tables=["missing.weight"])


def test_write_barrier_runs_before_shadow_writes() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    ema = EMA(
        model,
        lazy_tables=True,
        optimizer=optimizer,
        write_barrier=lambda: calls.append(1),
    )
    train_step(model, optimizer, 0)  # the hook's prepare writes rows
    assert calls
    calls.clear()
    ema.step(model)
    assert calls, "update writes the dense shadow"
    calls.clear()
    ema.synced_shadow()
    assert calls, "sync writes stale rows"
    calls.clear()
    ema.synced_shadow()
    assert not calls, "nothing stale: nothing written"


def test_detach_optimizer_removes_the_hook() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, lazy_tables=True, optimizer=optimizer)
    ema.detach_optimizer()
    before = ema._tables[TABLES[0]].last.clone()
    ema.update(model)
    train_step(model, optimizer, 0)
    assert torch.equal(ema._tables[TABLES[0]].last, before), "no prepare ran"


def test_swapping_a_lazy_ema_in_syncs_first_and_restores_the_raw() -> None:
    model = make_model(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dense = EMA(model, decay=0.9, warmup=False)
    lazy = EMA(model, decay=0.9, warmup=False, lazy_tables=True, optimizer=optimizer)
    for step in range(5):
        train_step(model, optimizer, step)
        dense.step(model)
        lazy.step(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with lazy.swapped(model):
        for name, value in dense.shadow.items():
            swapped_in = model.state_dict()[name]
            torch.testing.assert_close(swapped_in, value, atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="swapped"):
            train_step(model, optimizer, 5)  # the hook refuses to train on EMA weights
    for name, value in raw.items():
        assert torch.equal(model.state_dict()[name], value), name
