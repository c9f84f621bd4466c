"""The serving API against a fake predictor, plus settings and model resolution."""

from __future__ import annotations

import os

# MLflow's usage telemetry would call out of the machine; tests stay local.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import subprocess  # noqa: E402
import sys  # noqa: E402
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
from serving.registry import find_bundle_dir, resolve_model  # noqa: E402
from serving.reporter import ServingReporter  # noqa: E402
from tests.fakes import FakeMlflowClient, FakePredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINING_RUN = "train-run-1"


def make_app(predictor: FakePredictor, mlflow_client: FakeMlflowClient, **settings):
    """An app serving ``predictor`` whose reporter logs to ``mlflow_client``."""
    settings = ServingSettings(
        tracking_uri="fake://tracking", report_interval_s=3600, **settings
    )

    def reporter(settings, version, run_id):
        return ServingReporter(
            tracking_uri=settings.tracking_uri,
            experiment=settings.serving_experiment,
            model_name=settings.model_name,
            model_version=version,
            model_run_id=run_id,
            interval_s=settings.report_interval_s,
            client=mlflow_client,
        )

    return create_app(
        settings,
        lambda _: LoadedModel(predictor, TRAINING_RUN),
        reporter_factory=reporter,
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
    assert response.json() == {"status": "ok", "model_version": "7"}


def test_openapi_documents_every_route_with_schemas(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/healthz",
        "/v1/users/{user_id}/embedding",
        "/v1/embeddings",
        "/v1/recommendations",
        "/v1/feedback",
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


def test_unknown_feature_is_422_naming_it(client):
    user = {"features": {"gender": "F", "shoe_size": "44"}, "item_ids": [1]}
    response = client.post("/v1/embeddings", json={"users": [COLD, user]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "users", 1, "features", "shoe_size"]
    assert "shoe_size" in error["msg"] and "occupation" in error["msg"]


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
        {"users": [{"item_ids": [1], "features": {"age": 25}}]},
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
    assert 'emarec_impressions_total{cohort="warm"} 4.0' in text
    assert 'emarec_clicks_total{cohort="warm"} 0.0' in text
    assert 'emarec_request_latency_seconds_count{endpoint="recommendations"} 1.0' in text


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
        # Touching the oldest makes the middle one least recently used.
        feedback = {"recommendation_id": oldest["recommendation_id"]}
        assert client.post("/v1/feedback", json=feedback).status_code == 200
        recommend(client, user_id=3)
        stale = {"recommendation_id": middle["recommendation_id"]}
        assert client.post("/v1/feedback", json=stale).status_code == 404
        assert client.post("/v1/feedback", json=feedback).status_code == 200


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


@pytest.mark.parametrize(
    "body",
    [
        {"recommendation_id": "not-a-uuid"},
        {"recommendation_id": str(uuid.uuid4()), "impressions": []},
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
        ("model_dir", "/nonexistent/bundle", "EMAREC_MODEL_DIR"),
        ("model_name", " ", "EMAREC_MODEL_NAME"),
    ],
)
def test_invalid_setting_names_field_and_fix(field, value, hint):
    with pytest.raises(ValidationError) as raised:
        ServingSettings(**{field: value})
    assert field in str(raised.value) and hint in str(raised.value)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValidationError, match="extra"):
        ServingSettings(max_kk=3)


def test_python_m_serving_rejects_bad_settings_with_message(tmp_path):
    env = {**os.environ, "EMAREC_REPORT_INTERVAL_S": "-1"}
    result = subprocess.run(
        [sys.executable, "-m", "serving"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
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
