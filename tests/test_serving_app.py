"""The serving API against a fake predictor, plus settings and model resolution."""

from __future__ import annotations

import os

# MLflow's usage telemetry would call out of the machine; tests stay local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from models.bundle import ColdUser  # noqa: E402
from serving.app import LoadedModel, create_app  # noqa: E402
from serving.config import ServingSettings  # noqa: E402
from serving.middleware import BodySizeLimit  # noqa: E402
from serving.registry import find_bundle_dir, resolve_model  # noqa: E402
from serving.watcher import ModelWatcher  # noqa: E402
from tests.fakes import (  # noqa: E402
    BlockingPredictor,
    FakeMlflowClient,
    FakePredictor,
    FakeSource,
    reporter_factory,
)

REPO = Path(__file__).resolve().parents[1]
TRAINING_RUN = "train-run-1"


def make_app(
    predictor: FakePredictor | None,
    mlflow_client: FakeMlflowClient,
    source: FakeSource | None = None,
    **settings,
):
    """An app serving ``predictor`` (or following ``source``) whose reporters
    log to ``mlflow_client``."""
    settings = ServingSettings(
        tracking_uri="fake://tracking", report_interval_s=3600, **settings
    )

    reporter = reporter_factory(mlflow_client)

    return create_app(
        settings,
        None if predictor is None else lambda _: LoadedModel(predictor, TRAINING_RUN),
        reporter_factory=reporter,
        source=source,
    )


@pytest.fixture
def predictor() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def mlflow_client() -> FakeMlflowClient:
    return FakeMlflowClient()


@pytest.fixture
def client(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client)) as test_client:
        yield test_client


def snapshot(client: TestClient):
    return client.app.state.serving.reporter.snapshot()


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def error_text(response) -> str:
    assert 400 <= response.status_code < 500, response.text
    return str(response.json()["detail"])


COLD = {"features": {"gender": "F", "age": "25"}, "item_ids": [3, 5, 8]}


# Health, documentation and known-user embeddings.


def test_healthz_names_model_version(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "model_version": "7",
        "last_reload_error": None,
    }


def test_openapi_documents_every_route_with_schemas(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/healthz",
        "/v1/users/{user_id}/embedding",
        "/v1/embeddings",
        "/v1/recommendations",
        "/v1/feedback",
        "/v1/admin/reload",
    }
    feedback = schema["components"]["schemas"]["FeedbackRequest"]
    assert feedback["description"].startswith("What the user saw and clicked")


def test_known_user_embedding_comes_from_teacher(client, predictor):
    response = client.get("/v1/users/4/embedding")
    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == 4
    assert body["source"] == "ema_teacher"
    assert body["model_version"] == "7"
    np.testing.assert_allclose(body["embedding"], predictor.users[4], rtol=1e-6)


def test_unknown_user_embedding_is_404_pointing_to_cold_endpoint(client):
    response = client.get("/v1/users/999/embedding")
    assert response.status_code == 404
    assert "POST /v1/embeddings" in response.json()["detail"]


@pytest.mark.parametrize("user_id", ["-1", "abc", "1.5", str(2**64)])
def test_invalid_user_id_in_path_is_422(client, user_id):
    response = client.get(f"/v1/users/{user_id}/embedding")
    assert response.status_code == 422


# Cold-start embeddings.


def test_cold_embeddings_come_from_student_in_request_order(client, predictor):
    users = [COLD, {"item_ids": [1]}]
    response = client.post("/v1/embeddings", json={"users": users})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "student_int8"
    assert body["model_version"] == "7"
    expected = predictor.cold_embeddings(
        [ColdUser({"gender": "F", "age": "25"}, (3, 5, 8)), ColdUser({}, (1,))]
    )
    np.testing.assert_allclose(body["embeddings"], expected, rtol=1e-5)


def test_cold_user_missing_features_are_allowed(client, predictor):
    response = client.post("/v1/embeddings", json={"users": [{"item_ids": [2, 2]}]})
    assert response.status_code == 200
    assert predictor.cold_calls[-1] == ColdUser({}, (2, 2))


def test_cold_user_clicks_reach_the_model_item_by_item(client, predictor):
    users = [{**COLD, "clicked": [True, False, True]}, {"item_ids": [1]}]
    response = client.post("/v1/embeddings", json={"users": users})
    assert response.status_code == 200, response.text
    features = {"gender": "F", "age": "25"}
    assert predictor.cold_calls[-2:] == [
        ColdUser(features, (3, 5, 8), (True, False, True)),
        ColdUser({}, (1,)),
    ]
    recommend(client, **COLD, clicked=[False, False, True])
    expected = ColdUser(features, (3, 5, 8), (False, False, True))
    assert predictor.cold_calls[-1] == expected


@pytest.mark.parametrize("clicked", [[True, False], [True, False, True, True]])
def test_clicks_not_one_per_item_are_422_naming_the_counts(client, clicked):
    users = [COLD, {**COLD, "clicked": clicked}]
    response = client.post("/v1/embeddings", json={"users": users})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 1, "clicked"]
    assert f"clicked holds {len(clicked)} values for 3 item_ids" in error["msg"]
    response = client.post("/v1/recommendations", json={**COLD, "clicked": clicked})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "clicked"]


def test_cold_user_ratings_reach_the_model_item_by_item(client, predictor):
    both = {**COLD, "clicked": [True] * 3, "ratings": [1] * 3}
    users = [{**COLD, "ratings": [5, 2, 4]}, both]
    response = client.post("/v1/embeddings", json={"users": users})
    assert response.status_code == 200, response.text
    features = {"gender": "F", "age": "25"}
    assert predictor.cold_calls[-2:] == [
        ColdUser(features, (3, 5, 8), None, (5, 2, 4)),
        ColdUser(features, (3, 5, 8), (True,) * 3, (1,) * 3),
    ]
    recommend(client, **COLD, ratings=[3, 3, 4])
    assert predictor.cold_calls[-1] == ColdUser(features, (3, 5, 8), None, (3, 3, 4))


def test_ratings_not_one_per_item_are_422_naming_the_counts(client):
    users = [COLD, {**COLD, "ratings": [4, 4]}]
    response = client.post("/v1/embeddings", json={"users": users})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 1, "ratings"]
    assert "ratings holds 2 values for 3 item_ids" in error["msg"]
    response = client.post("/v1/recommendations", json={**COLD, "ratings": [5] * 4})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "ratings"]


@pytest.mark.parametrize("value", [0, 6, 4.5, "4", True, None])
def test_a_rating_that_is_not_an_integer_from_1_to_5_is_422(client, value):
    body = {**COLD, "ratings": [4, value, 2]}
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:3] == ["body", "ratings", 1]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_click_that_is_not_true_or_false_is_422(client, value):
    body = {**COLD, "clicked": [True, value, False]}
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "clicked"]


def test_unknown_feature_is_422_naming_it(client):
    user = {"features": {"gender": "F", "shoe_size": "44"}, "item_ids": [1]}
    response = client.post("/v1/embeddings", json={"users": [COLD, user]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 1, "features", "shoe_size"]
    assert "shoe_size" in error["msg"] and "occupation" in error["msg"]


@pytest.mark.parametrize("route", ["/v1/embeddings", "/v1/recommendations"])
def test_feature_value_not_seen_in_training_is_422_naming_the_known_values(
    client, predictor, route
):
    features = {"gender": "F", "occupation": "astronaut"}
    user = {"features": features, "item_ids": [1]}
    body = {"users": [COLD, user]} if route == "/v1/embeddings" else user
    calls = len(predictor.cold_calls)
    response = client.post(route, json=body)

    assert response.status_code == 422
    [error] = response.json()["detail"]
    prefix = ["body", "users", 1] if route == "/v1/embeddings" else ["body"]
    assert error["loc"] == [*prefix, "features", "occupation"]
    assert error["input"] == "astronaut"
    known = predictor.FEATURE_VOCAB["occupation"]
    assert f"the known values are {', '.join(map(repr, known))}" in error["msg"]
    assert "leave occupation out to serve the user as unknown" in error["msg"]
    assert len(predictor.cold_calls) == calls, "nothing reached the model"


def test_feature_value_that_cannot_be_read_is_422(client):
    user = {"features": {"age": "old"}, "item_ids": [1]}
    response = client.post("/v1/embeddings", json={"users": [user]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 0, "features", "age"]
    assert error["msg"].startswith("age 'old' is not an age in years")


@pytest.mark.parametrize("age", ["-5", "500", -5, True, "3_1", "\u0663\u0661"])
def test_an_age_that_is_no_age_in_years_is_422(client, age):
    user = {"features": {"age": age}, "item_ids": [1]}
    response = client.post("/v1/embeddings", json={"users": [user]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 0, "features", "age"]


def test_an_age_sent_as_a_number_reads_as_its_text(client):
    def embed(age):
        user = {"features": {"age": age}, "item_ids": [1, 2]}
        response = client.post("/v1/embeddings", json={"users": [user]})
        assert response.status_code == 200, response.text
        return response.json()["embeddings"][0]

    assert embed(31) == embed("31") == embed(31.0)


@pytest.mark.parametrize("value", ["unknown", ""])
def test_feature_value_asking_for_unknown_is_served(client, predictor, value):
    user = {"features": {"gender": "F", "occupation": value}, "item_ids": [1]}
    response = client.post("/v1/embeddings", json={"users": [user]})
    assert response.status_code == 200, response.text
    assert predictor.cold_calls[-1].features == {"gender": "F", "occupation": value}


def test_unknown_items_are_422_naming_them(client):
    user = {"item_ids": [1, 400, 77, 400]}
    response = client.post("/v1/embeddings", json={"users": [user]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 0, "item_ids"]
    assert "[77, 400]" in error["msg"]


def test_batch_above_max_batch_is_422(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client, max_batch=2)) as client:
        response = client.post("/v1/embeddings", json={"users": [COLD] * 3})
        assert "at most 2" in error_text(response)
        ok = client.post("/v1/embeddings", json={"users": [COLD] * 2})
        assert ok.status_code == 200


def test_history_above_max_history_is_422(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client, max_history=3)) as client:
        user = {"item_ids": [1, 2, 3, 4]}
        response = client.post("/v1/embeddings", json={"users": [user]})
        assert "at most 3" in error_text(response)
        response = client.post("/v1/recommendations", json={"item_ids": [1, 2, 3, 4]})
        assert "at most 3" in error_text(response)


@pytest.mark.parametrize(
    "body",
    [
        {"users": []},
        {"users": [{"item_ids": []}]},
        {"users": [{"features": {"gender": "F"}}]},
        {"users": [{"item_ids": [-1]}]},
        {"users": [{"item_ids": ["3"]}]},
        {"users": [{"item_ids": [1], "features": {"age": [25]}}]},
        {"users": [{"item_ids": [1], "extra": True}]},
        {"users": "everyone"},
        {},
    ],
)
def test_invalid_embeddings_body_is_422(client, body):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


# Recommendations.


def test_known_user_gets_warm_recommendations_without_seen_items(client, predictor):
    body = recommend(client, user_id=3, k=5)
    uuid.UUID(body["recommendation_id"])
    assert body["cohort"] == "warm"
    assert body["model_version"] == "7"
    items = body["items"]
    expected = predictor.recommend_known(3, 5)
    assert [i["item_id"] for i in items] == [s.item_id for s in expected]
    assert not {i["item_id"] for i in items} & predictor.seen_items(3)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(i["title"] == f"Item {i['item_id']}" or i["item_id"] == 0 for i in items)


def test_new_user_gets_cold_recommendations_without_onboarding_items(client, predictor):
    body = recommend(client, **COLD, k=10)
    assert body["cohort"] == "cold"
    assert len(body["items"]) == 10
    assert not {i["item_id"] for i in body["items"]} & {3, 5, 8}
    assert predictor.cold_calls[-1] == ColdUser({"gender": "F", "age": "25"}, (3, 5, 8))


def test_unknown_user_id_with_items_is_served_cold(client):
    assert recommend(client, user_id=999, item_ids=[1, 2])["cohort"] == "cold"


def test_known_user_id_with_items_is_served_warm(client):
    assert recommend(client, user_id=2, item_ids=[1, 2])["cohort"] == "warm"


def test_default_k_is_ten(client):
    assert len(recommend(client, user_id=1)["items"]) == 10


def test_unknown_user_without_items_is_404(client):
    response = client.post("/v1/recommendations", json={"user_id": 999})
    assert response.status_code == 404
    assert "item_ids" in response.json()["detail"]


def test_recommendation_without_user_or_items_is_422(client):
    response = client.post("/v1/recommendations", json={"features": {"age": "25"}})
    assert "item_ids" in error_text(response)


def test_cold_recommendation_with_unknown_feature_is_422(client):
    body = {"features": {"zodiac": "leo"}, "item_ids": [1]}
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "features", "zodiac"]


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": 1, "k": 0},
        {"user_id": 1, "k": 101},
        {"user_id": 1, "k": "ten"},
        {"user_id": 1, "k": 2.5},
        {"user_id": -3},
        {"user_id": "1"},
        {"user_id": 2**64},
        {"item_ids": []},
        {"item_ids": [1, -2]},
        {"item_ids": [1], "features": ["age"]},
        {"user_id": 1, "page": 2},
        [1, 2],
        None,
    ],
)
def test_invalid_recommendation_body_is_422(client, body):
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "path", ["/v1/recommendations", "/v1/embeddings", "/v1/feedback"]
)
@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe", b'{"k": 1', b'{"k": NaN, "clicks": Infinity}'],
)
def test_malformed_json_is_4xx_not_500(client, path, content):
    headers = {"content-type": "application/json"}
    response = client.post(path, content=content, headers=headers)
    assert error_text(response)


# Feedback.


def test_feedback_defaults_to_all_items_shown(client, predictor):
    rec = recommend(client, user_id=3, k=4)
    clicked = rec["items"][1]["item_id"]
    response = client.post(
        "/v1/feedback",
        json={"recommendation_id": rec["recommendation_id"], "clicks": [clicked]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "recorded_impressions": 4,
        "recorded_clicks": 1,
        "duplicates": 0,
    }
    counts = snapshot(client)
    assert counts.impressions == {"warm": 4, "cold": 0}
    assert counts.clicks == {"warm": 1, "cold": 0}


def test_metrics_endpoint_exposes_the_same_counts_for_prometheus(client):
    rec = recommend(client, user_id=3, k=4)
    body = {"recommendation_id": rec["recommendation_id"], "clicks": []}
    client.post("/v1/feedback", json=body)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'emarec_impressions_total{cohort="warm",model_version="7"} 4.0' in text
    assert 'emarec_clicks_total{cohort="warm",model_version="7"} 0.0' in text
    latency = 'emarec_request_latency_seconds_count{endpoint="recommendations"'
    assert f'{latency},model_version="7"}} 1.0' in text
    assert 'emarec_model_info{model_version="7"} 1.0' in text


def test_repeated_feedback_is_counted_once(client):
    rec = recommend(client, **COLD, k=3)
    item = rec["items"][0]["item_id"]
    body = {"recommendation_id": rec["recommendation_id"], "clicks": [item]}
    assert client.post("/v1/feedback", json=body).json()["duplicates"] == 0
    again = client.post("/v1/feedback", json=body).json()
    assert again == {"recorded_impressions": 0, "recorded_clicks": 0, "duplicates": 4}
    counts = snapshot(client)
    assert counts.impressions["cold"] == 3
    assert counts.clicks["cold"] == 1


def test_partial_impressions_then_rest_counts_only_new(client):
    rec = recommend(client, user_id=5, k=4)
    ids = [i["item_id"] for i in rec["items"]]
    rid = rec["recommendation_id"]
    first = client.post(
        "/v1/feedback",
        json={"recommendation_id": rid, "impressions": ids[:2], "clicks": [ids[0]]},
    ).json()
    assert first == {"recorded_impressions": 2, "recorded_clicks": 1, "duplicates": 0}
    rest = client.post(
        "/v1/feedback",
        json={"recommendation_id": rid, "impressions": None, "clicks": ids[:2]},
    ).json()
    assert rest == {"recorded_impressions": 2, "recorded_clicks": 1, "duplicates": 3}
    assert snapshot(client).impressions["warm"] == 4
    assert snapshot(client).clicks["warm"] == 2


def test_unknown_recommendation_feedback_is_404(client):
    body = {"recommendation_id": str(uuid.uuid4()), "clicks": []}
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == 404
    assert "unknown or expired" in response.json()["detail"]


def test_evicted_recommendation_feedback_is_404(predictor, mlflow_client):
    app = make_app(predictor, mlflow_client, recommendation_cache=2)
    with TestClient(app) as client:
        oldest, middle = recommend(client, user_id=1), recommend(client, user_id=2)
        feedback = {"recommendation_id": oldest["recommendation_id"]}
        assert client.post("/v1/feedback", json=feedback).status_code == 200
        recommend(client, user_id=3)  # takes the oldest one's slot
        response = client.post("/v1/feedback", json=feedback)
        assert response.status_code == 404
        assert "last 2 recommendations" in response.json()["detail"]
        kept = {"recommendation_id": middle["recommendation_id"]}
        assert client.post("/v1/feedback", json=kept).status_code == 200


def test_click_outside_recommendation_is_422_naming_it(client):
    rec = recommend(client, user_id=3, k=2)
    shown = [i["item_id"] for i in rec["items"]]
    outside = next(i for i in range(40) if i not in shown)
    body = {"recommendation_id": rec["recommendation_id"], "clicks": [outside]}
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "clicks"]
    assert str(outside) in error["msg"] and "not in this recommendation" in error["msg"]
    assert snapshot(client).impressions["warm"] == 0


def test_impression_outside_recommendation_is_422_naming_it(client):
    rec = recommend(client, user_id=3, k=2)
    shown = [i["item_id"] for i in rec["items"]]
    outside = next(i for i in range(40) if i not in shown)
    body = {
        "recommendation_id": rec["recommendation_id"],
        "impressions": [shown[0], outside],
    }
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "impressions"]
    assert f"[{outside}]" in error["msg"]


def test_click_not_among_impressions_is_422(client):
    rec = recommend(client, user_id=3, k=3)
    ids = [i["item_id"] for i in rec["items"]]
    body = {
        "recommendation_id": rec["recommendation_id"],
        "impressions": ids[:1],
        "clicks": [ids[2]],
    }
    response = client.post("/v1/feedback", json=body)
    assert "not among the impressions" in error_text(response)


def test_a_late_click_on_an_earlier_impression_is_recorded_alone(client):
    rec = recommend(client, user_id=3, k=5)
    ids = [i["item_id"] for i in rec["items"]]
    rid = rec["recommendation_id"]
    shown = client.post(
        "/v1/feedback", json={"recommendation_id": rid, "impressions": ids[:1]}
    )
    late = {"recommendation_id": rid, "impressions": [], "clicks": ids[:1]}
    response = client.post("/v1/feedback", json=late)

    assert shown.json()["recorded_impressions"] == 1
    assert response.status_code == 200, response.text
    assert response.json() == {
        "recorded_impressions": 0,
        "recorded_clicks": 1,
        "duplicates": 0,
    }
    assert snapshot(client).impressions["warm"] == 1  # the other 4 were never shown


@pytest.mark.parametrize(
    "body",
    [
        {"recommendation_id": "not-a-uuid"},
        {"recommendation_id": str(uuid.uuid4()), "clicks": [-1]},
        {"recommendation_id": str(uuid.uuid4()), "clicks": "all"},
        {"clicks": [1]},
    ],
)
def test_invalid_feedback_body_is_422(client, body):
    assert client.post("/v1/feedback", json=body).status_code == 422


# Latency and reporting.


def test_latency_is_recorded_per_endpoint_including_failures(client):
    client.get("/v1/users/1/embedding")
    client.get("/v1/users/999/embedding")
    client.post("/v1/embeddings", json={"users": [COLD]})
    rec = recommend(client, user_id=1)
    recommend(client, **COLD)
    client.post("/v1/feedback", json={"recommendation_id": rec["recommendation_id"]})
    counts = snapshot(client)
    assert counts.requests == {
        "embedding": 2,
        "embeddings": 1,
        "recommendations": 2,
        "feedback": 1,
    }
    for endpoint, latency in counts.latency_ms.items():
        assert 0 < latency[50] <= latency[95] <= latency[99], endpoint


def test_shutdown_flushes_metrics_tagged_with_model(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client)) as client:
        rec = recommend(client, user_id=1, k=5)
        feedback = {
            "recommendation_id": rec["recommendation_id"],
            "clicks": [rec["items"][0]["item_id"]],
        }
        client.post("/v1/feedback", json=feedback)
        assert mlflow_client.batches == []
    [run_id] = mlflow_client.runs
    assert mlflow_client.runs[run_id]["tags"] == {
        "model_name": "emarec",
        "model_version": "7",
        "model_run_id": TRAINING_RUN,
    }
    metrics = mlflow_client.last_metrics()
    assert metrics["serving/warm/impressions"] == 5
    assert metrics["serving/warm/ctr"] == pytest.approx(0.2)
    assert metrics["serving/recommendations/requests"] == 1
    assert mlflow_client.terminated == {run_id: "FINISHED"}


# Settings.


def test_settings_read_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMAREC_PORT", "9123")
    monkeypatch.setenv("EMAREC_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    settings = ServingSettings()
    assert settings.port == 9123
    assert settings.model_dir == tmp_path
    assert settings.tracking_uri == "http://127.0.0.1:5999"


def test_settings_default_tracking_uri_is_local_sqlite(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EMAREC_TRACKING_URI", raising=False)
    assert ServingSettings().tracking_uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("report_interval_s", 0, "EMAREC_REPORT_INTERVAL_S"),
        ("report_interval_s", float("nan"), "EMAREC_REPORT_INTERVAL_S"),
        ("port", 70000, "EMAREC_PORT"),
        ("max_k", 0, "EMAREC_MAX_K"),
        ("recommendation_cache", -1, "EMAREC_RECOMMENDATION_CACHE"),
        ("recommendation_cache", 2**32, "EMAREC_RECOMMENDATION_CACHE"),
        ("recommendation_cache_items", 99, "EMAREC_RECOMMENDATION_CACHE_ITEMS"),
        ("recommendation_cache_items", 10**13, "EMAREC_RECOMMENDATION_CACHE_ITEMS"),
        ("model_dir", "/nonexistent/bundle", "EMAREC_MODEL_DIR"),
        ("model_name", " ", "EMAREC_MODEL_NAME"),
        ("torch_threads", 0, "EMAREC_TORCH_THREADS"),
        ("torch_interop_threads", -1, "EMAREC_TORCH_INTEROP_THREADS"),
    ],
)
def test_invalid_setting_names_field_and_fix(field, value, hint):
    with pytest.raises(ValidationError) as raised:
        ServingSettings(**{field: value})
    assert field in str(raised.value) and hint in str(raised.value)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValidationError, match="extra"):
        ServingSettings(max_kk=3)


def run_python_m_serving(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -m serving`` with extra environment, expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "serving"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_serving_rejects_bad_settings_with_message(tmp_path):
    result = run_python_m_serving({"EMAREC_REPORT_INTERVAL_S": "-1"})
    assert result.returncode != 0
    assert "EMAREC_REPORT_INTERVAL_S" in result.stderr


# Model resolution.


def make_bundle(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "bundle.json").write_text("{}")
    return path


def test_local_model_dir_is_served_as_local_version(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    settings = ServingSettings(model_dir=bundle)
    assert resolve_model(settings) == (bundle, "local", None)


def test_bundle_dir_is_found_below_downloaded_model(tmp_path):
    bundle = make_bundle(tmp_path / "model" / "artifacts" / "bundle")
    make_bundle(tmp_path / "model" / "artifacts" / "bundle" / "old" / "copy")
    assert find_bundle_dir(tmp_path / "model") == bundle


def test_missing_bundle_json_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="bundle.json"):
        find_bundle_dir(tmp_path)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One SQLite registry for the module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


def test_missing_champion_says_to_run_pipeline(sqlite_uri):
    settings = ServingSettings(tracking_uri=sqlite_uri, model_name="unregistered")
    with pytest.raises(RuntimeError, match="emarec run"):
        resolve_model(settings)
    client = mlflow.MlflowClient(sqlite_uri)
    client.create_registered_model("unregistered")
    with pytest.raises(RuntimeError, match="no champion"):
        resolve_model(settings)


def test_champion_alias_resolves_to_registered_bundle(sqlite_uri, tmp_path):
    client = mlflow.MlflowClient(sqlite_uri)
    experiment = client.create_experiment(
        "train", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment).info.run_id
    model = tmp_path / "model"
    make_bundle(model / "artifacts" / "bundle")
    (model / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run_id, str(model), "model")
    client.create_registered_model("emarec")
    client.create_model_version("emarec", f"runs:/{run_id}/model", run_id=run_id)
    version = client.create_model_version(
        "emarec", f"runs:/{run_id}/model", run_id=run_id
    )
    client.set_registered_model_alias("emarec", "champion", version.version)

    path, served, served_run = resolve_model(ServingSettings(tracking_uri=sqlite_uri))

    assert (path / "bundle.json").is_file()
    assert path.name == "bundle" and path.parent.name == "artifacts"
    assert (served, served_run) == ("2", run_id)


# Following the registry: swaps, rollback, failed loads, per-version reports.

TOKEN = "s3cret-admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def following(source, mlflow_client):
    """A client of an app that follows ``source``, with admin enabled."""
    app = make_app(None, mlflow_client, source, admin_token=TOKEN)
    with TestClient(app) as test_client:
        yield test_client


def reload(client: TestClient) -> dict:
    response = client.post("/v1/admin/reload", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def served_version(client: TestClient) -> str:
    body = recommend(client, user_id=1, k=3)
    return body["model_version"]


def test_model_responses_name_their_version_in_a_header(client):
    rid = recommend(client, user_id=1)["recommendation_id"]
    calls = [
        client.get("/v1/users/1/embedding"),
        client.get("/v1/users/999/embedding"),
        client.post("/v1/embeddings", json={"users": [COLD]}),
        client.post("/v1/recommendations", json={"user_id": 2}),
        client.post("/v1/feedback", json={"recommendation_id": rid}),
    ]
    for response in calls:
        assert response.headers["X-Model-Version"] == "7", response.request.url
    assert "X-Model-Version" not in client.get("/openapi.json").headers


def test_reload_swaps_in_the_new_champion(following, source):
    assert served_version(following) == "7"
    assert reload(following) == {
        "model_version": "7",
        "previous_version": "7",
        "changed": False,
        "error": None,
    }
    source.champion_version = "8"
    assert reload(following) == {
        "model_version": "8",
        "previous_version": "7",
        "changed": True,
        "error": None,
    }
    response = following.post("/v1/recommendations", json={"user_id": 1, "k": 3})
    assert response.json()["model_version"] == "8"
    assert response.headers["X-Model-Version"] == "8"
    expected = source.predictors["8"].recommend_known(1, 3)
    assert [i["item_id"] for i in response.json()["items"]] == [
        s.item_id for s in expected
    ]
    assert following.get("/healthz").json()["model_version"] == "8"


def test_rollback_is_served_from_memory(following, source):
    source.champion_version = "8"
    reload(following)
    source.champion_version = "7"
    assert reload(following)["model_version"] == "7"
    assert served_version(following) == "7"
    assert source.loads == ["7", "8"]


def test_request_in_flight_finishes_on_the_model_it_started_with(mlflow_client):
    blocking = BlockingPredictor(version="7")
    source = FakeSource({"7": blocking, "8": FakePredictor(seed=8, version="8")})
    app = make_app(None, mlflow_client, source, admin_token=TOKEN)
    with TestClient(app) as client:
        result = {}

        def slow_request():
            result["response"] = client.post(
                "/v1/recommendations", json={"user_id": 1, "k": 3}
            )

        thread = threading.Thread(target=slow_request)
        thread.start()
        assert blocking.entered.wait(10)
        source.champion_version = "8"
        assert reload(client)["model_version"] == "8"
        blocking.release.set()
        thread.join(10)
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["model_version"] == "7"
        assert response.headers["X-Model-Version"] == "7"
        assert served_version(client) == "8"


def test_failed_load_keeps_serving_and_is_reported(following, source, caplog):
    source.champion_version = "9"
    source.broken.add("9")
    with caplog.at_level(logging.WARNING, logger="serving.watcher"):
        body = reload(following)
    assert body["model_version"] == "7" and body["changed"] is False
    assert "loading model version 9 failed" in body["error"]["message"]
    assert "PytorchStreamReader" in body["error"]["message"]
    assert "still serving version 7" in caplog.text
    health = following.get("/healthz").json()
    assert health["model_version"] == "7"
    assert health["last_reload_error"]["model_version"] == "9"
    assert served_version(following) == "7"

    source.broken.clear()
    assert reload(following)["model_version"] == "9"
    assert following.get("/healthz").json()["last_reload_error"] is None


def test_unreachable_registry_keeps_serving(following, source):
    source.down = True
    body = reload(following)
    assert body["model_version"] == "7"
    assert body["error"]["model_version"] is None
    assert "registry unreachable" in body["error"]["message"]
    assert served_version(following) == "7"
    source.down = False
    assert reload(following)["error"] is None


def test_background_poll_follows_the_alias(source, mlflow_client):
    app = make_app(None, mlflow_client, source, poll_interval_s=0.05)
    with TestClient(app) as client:
        source.champion_version = "8"
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["model_version"] != "8":
            assert time.monotonic() < deadline, "the poll never swapped in v8"
            time.sleep(0.02)
        assert served_version(client) == "8"


def runs_by_version(mlflow_client: FakeMlflowClient) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for run_id, run in mlflow_client.runs.items():
        runs.setdefault(run["tags"]["model_version"], []).append(run_id)
    return runs


def final_metric(mlflow_client: FakeMlflowClient, run_id: str, key: str) -> float:
    batches = [metrics for rid, metrics in mlflow_client.batches if rid == run_id]
    return {m.key: m.value for m in batches[-1]}[key]


def test_feedback_counts_for_the_version_that_recommended(source, mlflow_client):
    app = make_app(None, mlflow_client, source, admin_token=TOKEN)
    with TestClient(app) as client:
        old = recommend(client, user_id=1, k=4)
        source.champion_version = "8"
        reload(client)
        new = recommend(client, user_id=1, k=2)
        for rec in (old, new):
            body = {
                "recommendation_id": rec["recommendation_id"],
                "clicks": [rec["items"][0]["item_id"]],
            }
            response = client.post("/v1/feedback", json=body)
            assert response.headers["X-Model-Version"] == rec["model_version"]
    runs = runs_by_version(mlflow_client)
    [v7], [v8] = runs["7"], runs["8"]
    assert mlflow_client.runs[v7]["tags"]["model_run_id"] == "train-7"
    assert mlflow_client.runs[v8]["tags"]["model_run_id"] == "train-8"
    assert final_metric(mlflow_client, v7, "serving/warm/impressions") == 4
    assert final_metric(mlflow_client, v8, "serving/warm/impressions") == 2
    assert final_metric(mlflow_client, v8, "serving/warm/ctr") == pytest.approx(0.5)
    assert mlflow_client.terminated == {v7: "FINISHED", v8: "FINISHED"}


def test_evicted_version_is_reported_and_late_feedback_still_counts(
    source, mlflow_client
):
    app = make_app(None, mlflow_client, source, admin_token=TOKEN, model_cache=1)
    with TestClient(app) as client:
        old = recommend(client, user_id=1, k=4)
        source.champion_version = "8"
        reload(client)
        [v7] = runs_by_version(mlflow_client)["7"]
        deadline = time.monotonic() + 10
        while v7 not in mlflow_client.terminated:
            assert time.monotonic() < deadline, "the retired reporter never ended"
            time.sleep(0.02)
        body = {"recommendation_id": old["recommendation_id"], "clicks": []}
        assert client.post("/v1/feedback", json=body).status_code == 200
    runs = runs_by_version(mlflow_client)["7"]
    assert len(runs) == 2
    impressions = [
        final_metric(mlflow_client, run, "serving/warm/impressions") for run in runs
    ]
    assert sum(impressions) == 4


def test_watcher_retries_a_broken_version_later_unless_forced():
    source = FakeSource()
    watcher = ModelWatcher(source, cache_size=2, poll_interval_s=3600)
    watcher.start_serving()
    source.champion_version = "9"
    source.broken.add("9")
    assert watcher.check(force=False).error is not None
    assert watcher.check(force=False).error is not None
    assert source.loads == ["7", "9"]
    watcher.check()
    assert source.loads == ["7", "9", "9"]
    assert watcher.current.version == "7"


def test_cache_keeps_the_last_versions():
    source = FakeSource()
    watcher = ModelWatcher(source, cache_size=2, poll_interval_s=3600)
    watcher.start_serving()
    for version in ("8", "9", "8"):
        source.champion_version = version
        assert watcher.check().model_version == version
    assert watcher.cached_versions == ("9", "8")
    assert source.loads == ["7", "8", "9"]


# Admin endpoints.


def test_admin_is_disabled_without_a_token(client):
    response = client.post("/v1/admin/reload", headers=ADMIN)
    assert response.status_code == 403
    assert "EMAREC_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-of-enough-length"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer caf\u00e9".encode()},
        {"Authorization": "Bearer"},
    ],
)
def test_admin_needs_the_right_token(following, headers):
    response = following.post("/v1/admin/reload", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "EMAREC_ADMIN_TOKEN" in response.json()["detail"]


def test_admin_token_is_never_shown():
    settings = ServingSettings(admin_token=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())


def test_short_admin_token_is_rejected():
    with pytest.raises(ValidationError, match="EMAREC_ADMIN_TOKEN"):
        ServingSettings(admin_token="short")


# Request body size.


def test_body_over_the_declared_limit_is_413(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client, max_body_bytes=100)) as client:
        body = {"users": [COLD] * 5}
        response = client.post("/v1/embeddings", json=body)
        assert response.status_code == 413
        assert "limit of 100 bytes" in response.json()["detail"]
        assert client.post("/v1/embeddings", json={"users": [COLD]}).status_code == 200


def test_chunked_body_over_the_limit_is_413(predictor, mlflow_client):
    with TestClient(make_app(predictor, mlflow_client, max_body_bytes=100)) as client:
        chunks = [b'{"users": [', b" " * 60, b" " * 60, b"]}"]
        response = client.post(
            "/v1/embeddings",
            content=iter(chunks),
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        assert "limit of 100 bytes" in response.json()["detail"]
        small = [b'{"users": [', json.dumps(COLD).encode(), b"]}"]
        response = client.post(
            "/v1/embeddings",
            content=iter(small),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 200, response.text


def asgi_call(app, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """Drive an ASGI app once with raw headers; returns status and JSON body."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.mark.parametrize(
    ("length", "status"),
    [(b"abc", 400), (b"-1", 400), (b"\xb2", 400), (b"9" * 5000, 413), (b"10", 413)],
)
def test_unusable_content_length_is_refused_before_reading(length, status):
    async def never_called(scope, receive, send):
        raise AssertionError("the app must not see this request")

    app = BodySizeLimit(never_called, max_bytes=5)
    code, body = asgi_call(app, [(b"content-length", length)], b"x" * 10)
    assert code == status
    assert body["detail"]


# Start-up.


def test_python_m_serving_without_a_loadable_model_exits_with_message(tmp_path):
    result = run_python_m_serving(
        {"EMAREC_MODEL_DIR": str(tmp_path), "EMAREC_PORT": "1"}
    )
    assert result.returncode != 0
    assert "no loadable model to serve" in result.stderr
    assert "bundle.json" in result.stderr
    # The reason in a line, not under a traceback of the start-up machinery.
    assert "Traceback" not in result.stderr


def test_lifespan_freezes_start_up_objects_and_hands_them_back(
    predictor, mlflow_client
) -> None:
    import gc

    app = make_app(predictor, mlflow_client, malloc_trim_interval_s=0.01)
    with TestClient(app) as test_client:
        assert gc.get_freeze_count() > 0
        assert test_client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == 0

    with TestClient(make_app(predictor, mlflow_client, malloc_trim_interval_s=0)):
        assert gc.get_freeze_count() == 0


def test_the_largest_request_the_limits_allow_fits_the_default_body_limit(
    predictor, mlflow_client
):
    """``max_batch`` users of ``max_history`` items each, with clicks, ratings
    and features, sent indented: the default body limit follows those two."""
    with TestClient(make_app(predictor, mlflow_client, max_batch=64)) as client:
        settings = ServingSettings(tracking_uri="fake://tracking", max_batch=64)
        items = [(i % 39) + 1 for i in range(settings.max_history)]
        user = {
            "features": {"gender": "F", "age": "25"},
            "item_ids": items,
            "clicked": [i % 2 == 0 for i in items],
            "ratings": [(i % 5) + 1 for i in items],
        }
        body = json.dumps({"users": [user] * settings.max_batch}, indent=2)
        assert len(body) > 64 * 1024  # the old fixed limit refused it
        assert len(body) < settings.max_body_bytes
        response = client.post(
            "/v1/embeddings", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["embeddings"]) == settings.max_batch
        # One more item per user than max_history is refused for what it is.
        user = {"item_ids": items + [1]}
        response = client.post("/v1/embeddings", json={"users": [user]})
        assert response.status_code == 422
