"""Replay against a real uvicorn server (in a thread) serving the fake model."""

from __future__ import annotations

import os

# MLflow's usage telemetry would call out of the machine; tests stay local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import pytest  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from models.bundle import ColdUser  # noqa: E402
from serving.app import LoadedModel, create_app  # noqa: E402
from serving.cli import replay as replay_from_data  # noqa: E402
from serving.config import ServingSettings  # noqa: E402
from serving.replay import ReplayUser, replay  # noqa: E402
from serving.reporter import ServingReporter  # noqa: E402
from tests.fakes import FakeMlflowClient, FakePredictor, reporter_factory  # noqa: E402


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    predictor: FakePredictor
    mlflow_client: FakeMlflowClient

    @property
    def reporter(self) -> ServingReporter:
        return self.app.state.serving.reporter


@pytest.fixture
def live_server() -> Iterator[LiveServer]:
    """``create_app`` with the fake model under uvicorn on a free loopback port."""
    predictor, mlflow_client = FakePredictor(), FakeMlflowClient()
    settings = ServingSettings(tracking_uri="fake://tracking", report_interval_s=3600)

    reporter = reporter_factory(mlflow_client)

    app = create_app(
        settings, lambda _: LoadedModel(predictor, "train"), reporter_factory=reporter
    )
    # Binding the socket here avoids the race of probing a port and rebinding.
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            time.sleep(0.02)
        yield LiveServer(f"http://127.0.0.1:{port}", app, predictor, mlflow_client)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not shut down"


def warm_user(predictor: FakePredictor, user_id: int, hits: int) -> ReplayUser:
    """A known user whose test clicks include the first ``hits`` of its top 5."""
    top = [s.item_id for s in predictor.recommend_known(user_id, 5)]
    return ReplayUser(user_id, "warm", test_clicks=set(top[:hits]) | {10_000})


def cold_user(predictor: FakePredictor, item_ids: list[int], hits: int) -> ReplayUser:
    """A new user whose test clicks include the first ``hits`` of its top 5."""
    features = {"gender": "M", "occupation": "writer"}
    top = predictor.recommend_cold(ColdUser(features, tuple(item_ids)), 5)
    clicks = {s.item_id for s in top[:hits]}
    return ReplayUser(1_000, "cold", features, item_ids, clicks)


def test_replay_counts_impressions_and_clicks_per_cohort(live_server):
    predictor = live_server.predictor
    users = [
        warm_user(predictor, 1, hits=2),
        warm_user(predictor, 2, hits=0),
        cold_user(predictor, [3, 4], hits=1),
        cold_user(predictor, [7], hits=3),
    ]

    summary = replay(live_server.url, users, k=5)

    assert summary.errors == 0
    warm, cold = summary.cohorts["warm"], summary.cohorts["cold"]
    assert (warm.users, warm.impressions, warm.clicks) == (2, 10, 2)
    assert (cold.users, cold.impressions, cold.clicks) == (2, 10, 4)
    assert warm.ctr == pytest.approx(0.2) and cold.ctr == pytest.approx(0.4)
    assert summary.ctr == pytest.approx(6 / 20)
    # The server counted the same feedback the client sent.
    counts = live_server.reporter.snapshot()
    assert counts.impressions == {"warm": 10, "cold": 10}
    assert counts.clicks == {"warm": 2, "cold": 4}
    assert counts.requests["recommendations"] == 4
    assert counts.requests["feedback"] == 4


def test_cold_replay_sends_features_and_items_without_user_id(live_server):
    predictor = live_server.predictor
    replay(live_server.url, [cold_user(predictor, [5, 6], hits=0)], k=3)
    sent = predictor.cold_calls[-1]
    assert sent.features == {"gender": "M", "occupation": "writer"}
    assert sent.item_ids == (5, 6)
    assert sent.clicked is None, "no onboarding clicks known: none sent"
    assert sent.ratings is None, "no onboarding ratings known: none sent"
    assert live_server.reporter.snapshot().impressions["cold"] == 3


def test_cold_replay_sends_which_onboarding_items_were_clicked(live_server):
    predictor = live_server.predictor
    user = replace(cold_user(predictor, [5, 6, 9], hits=0), clicked=[True, False, True])
    replay(live_server.url, [user], k=3)
    assert predictor.cold_calls[-1].clicked == (True, False, True)


def test_cold_replay_sends_how_onboarding_items_were_rated(live_server):
    predictor = live_server.predictor
    user = replace(cold_user(predictor, [5, 6, 9], hits=0), ratings=[5, 1, 4])
    replay(live_server.url, [user], k=3)
    assert predictor.cold_calls[-1].ratings == (5, 1, 4)


def test_failed_requests_are_counted_not_raised(live_server):
    predictor = live_server.predictor
    users = [
        ReplayUser(999, "warm"),  # unknown user: 404
        ReplayUser(5, "cold", {"shoe_size": "44"}, [1]),  # unknown feature: 422
        warm_user(predictor, 3, hits=1),
    ]
    summary = replay(live_server.url, users, k=4)
    assert summary.errors == 2
    reasons = list(summary.failures)
    assert len(reasons) == 2 and sum(summary.failures.values()) == 2
    assert reasons[0].startswith("POST /v1/recommendations: 404")
    assert reasons[1].startswith("POST /v1/recommendations: 422")
    assert "shoe_size" in reasons[1]
    assert summary.cohorts["warm"].users == 1
    assert summary.cohorts["warm"].clicks == 1
    assert summary.cohorts["cold"].impressions == 0


def test_unreachable_server_counts_every_user_as_error():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    users = [ReplayUser(1, "warm"), ReplayUser(2, "warm")]
    summary = replay(f"http://127.0.0.1:{port}", users, timeout_s=2)
    assert summary.errors == 2
    [(reason, count)] = summary.failures.items()
    assert count == 2 and reason.startswith("POST /v1/recommendations: ConnectError")
    assert summary.impressions == 0 and summary.ctr == 0


def test_replay_of_the_test_period_refuses_impossible_limits():
    from pipeline.replay import replay_test_period

    with pytest.raises(ValueError, match="--limit -1: replay at least 1 user"):
        replay_test_period("http://127.0.0.1:9", None, limit=-1)
    with pytest.raises(ValueError, match="--k 0: ask for at least 1"):
        replay_test_period("http://127.0.0.1:9", None, k=0)


def test_cli_replay_samples_limit_users_with_seed(live_server, tmp_path):
    predictor = live_server.predictor
    users = [warm_user(predictor, i, hits=1) for i in range(10)]
    seen_dirs = []

    def load_users(data_dir):
        seen_dirs.append(data_dir)
        return users

    summary = replay_from_data(
        live_server.url, tmp_path, limit=4, k=2, seed=3, load_users=load_users
    )
    assert seen_dirs == [tmp_path]
    assert summary.cohorts["warm"].users == 4
    assert summary.cohorts["warm"].impressions == 8
    assert live_server.reporter.snapshot().requests["recommendations"] == 4
    with pytest.raises(ValueError, match="limit"):
        replay_from_data(live_server.url, tmp_path, limit=0, load_users=load_users)


def test_cold_users_replay_their_onboarding_items_with_their_clicks_and_ratings(
    ml100k_dir,
):
    from data.movielens import load_movielens
    from pipeline.replay import replay_users

    ratings = load_movielens(ml100k_dir).interactions.set_index(["user_id", "item_id"])
    cold = [u for u in replay_users(ml100k_dir) if u.cohort == "cold"]
    assert len(cold) > 150
    for user in cold:
        assert len(user.item_ids) == len(user.clicked) == len(user.ratings) == 5
        clicks = [bool(ratings.at[(user.user_id, i), "click"]) for i in user.item_ids]
        assert user.clicked == clicks
        given = [int(ratings.at[(user.user_id, i), "rating"]) for i in user.item_ids]
        assert user.ratings == given
    answers = [c for u in cold for c in u.clicked]
    assert any(answers) and not all(answers)
