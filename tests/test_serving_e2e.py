"""``python -m serving`` as a real uvicorn process, loading the champion that the
pipeline registered in a real ``mlflow server``, driven over HTTP; then a replay
of the test period and a clean stop whose report lands in MLflow."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from models.bundle import load_bundle
from pipeline.replay import replay_test_period
from tests.conftest import E2E_MODEL
from tests.servers import Process, child_env, free_port

SERVING_EXPERIMENT = "e2e-serving"


@pytest.fixture(scope="module")
def server(pipeline_run, tmp_path_factory):
    config, results = pipeline_run
    port = free_port()
    env = child_env(
        EMAREC_TRACKING_URI=config.tracking_uri,
        EMAREC_MODEL_NAME=E2E_MODEL,
        EMAREC_PORT=str(port),
        EMAREC_SERVING_EXPERIMENT=SERVING_EXPERIMENT,
        EMAREC_REPORT_INTERVAL_S="2",
    )
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process = Process(
        [sys.executable, "-m", "serving"],
        log_path=log,
        env=env,
        ready_url=f"{url}/healthz",
        ready_timeout_s=180,
        stop_timeout_s=60,
        name="emarec serve",
    )
    with process:
        yield url, config, results, process


def known_user(config) -> int:
    users = pd.read_parquet(config.work_dir / "bundle" / "users.parquet")
    return int(users.user_id.iloc[0])


def test_server_reports_the_champion_version(server):
    url, _, results, _ = server
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok"
    assert health["model_version"] == str(results["register"]["version"])


def test_known_user_gets_ema_teacher_embedding(server):
    url, config, _, _ = server
    user_id = known_user(config)
    body = httpx.get(f"{url}/v1/users/{user_id}/embedding").json()
    assert body["source"] == "ema_teacher"
    assert len(body["embedding"]) == config.train.embedding_dim
    assert httpx.get(f"{url}/v1/users/5/embedding").status_code == 404  # cold user


def test_served_embeddings_and_recommendations_match_the_networks(server):
    """The server's load-time caches answer what the networks compute directly."""
    url, config, _, _ = server
    bundle = load_bundle(config.work_dir / "bundle")
    users = pd.read_parquet(config.work_dir / "bundle" / "users.parquet")
    for user_id in users.user_id.astype(int).iloc[:5]:
        body = httpx.get(f"{url}/v1/users/{user_id}/embedding").json()
        direct = bundle.compute_user_embeddings([user_id])[0]
        np.testing.assert_allclose(body["embedding"], direct, atol=1e-5, rtol=0)
        rec = httpx.post(
            f"{url}/v1/recommendations", json={"user_id": int(user_id), "k": 10}
        ).json()
        expected = bundle.compute_recommend_known(int(user_id), 10)
        assert [i["item_id"] for i in rec["items"]] == [s.item_id for s in expected]
        np.testing.assert_allclose(
            [i["score"] for i in rec["items"]],
            [s.score for s in expected],
            atol=1e-5,
        )


def test_server_sizes_torch_threads_from_settings(server):
    _, _, _, process = server
    assert "torch threads: 1 intra-op, 1 inter-op" in process.log_text()


def test_an_idle_connection_outlives_common_client_pools(server):
    # Clients keep idle connections for reuse (httpx 5 s, as uvicorn's default
    # keep-alive): a server closing first races their next request on it.
    url, _, _, _ = server
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        for wait_s in (0, 6):  # the second request after 6 s idle, same socket
            time.sleep(wait_s)
            connection.sendall(request)
            answer = read_response(connection)
            assert answer.startswith(b"HTTP/1.1 200"), (wait_s, answer[:80])


def read_response(connection: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (headers, then Content-Length bytes);
    ``b""`` if the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def test_new_users_get_student_embeddings_in_a_batch(server):
    url, config, _, _ = server
    writer = {"gender": "F", "age": "31", "occupation": "writer"}
    users = [
        {"features": writer, "item_ids": [1, 50]},
        {"features": {}, "item_ids": [181]},
        {"features": writer, "item_ids": [1, 50], "clicked": [True, False]},
        {"features": writer, "item_ids": [1, 50], "ratings": [5, 2]},
    ]
    response = httpx.post(f"{url}/v1/embeddings", json={"users": users})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "student_int8"
    assert len(body["embeddings"]) == 4
    assert body["embeddings"][0] != body["embeddings"][1]
    # Same items, told more each time: items, then clicks, then ratings.
    told = [tuple(body["embeddings"][n]) for n in (0, 2, 3)]
    assert len(set(told)) == 3
    users[2]["clicked"] = [True]
    users[3]["ratings"] = [5, 2, 4]
    response = httpx.post(f"{url}/v1/embeddings", json={"users": users})
    assert response.status_code == 422
    locs = [error["loc"] for error in response.json()["detail"]]
    assert locs == [["body", "users", 2, "clicked"], ["body", "users", 3, "ratings"]]


def test_recommendations_exclude_seen_items_and_accept_feedback(server):
    url, config, _, _ = server
    user_id = known_user(config)
    users = pd.read_parquet(config.work_dir / "bundle" / "users.parquet")
    seen = set(users.set_index("user_id").loc[user_id, "seen"])
    response = httpx.post(f"{url}/v1/recommendations", json={"user_id": user_id, "k": 10})
    assert response.status_code == 200, response.text
    rec = response.json()
    items = [i["item_id"] for i in rec["items"]]
    assert rec["cohort"] == "warm" and len(items) == 10
    assert not seen & set(items)

    cold = httpx.post(
        f"{url}/v1/recommendations", json={"item_ids": [1, 2, 3], "k": 5}
    ).json()
    assert cold["cohort"] == "cold"
    assert not {1, 2, 3} & {i["item_id"] for i in cold["items"]}

    feedback = {"recommendation_id": rec["recommendation_id"], "clicks": items[:2]}
    first = httpx.post(f"{url}/v1/feedback", json=feedback).json()
    again = httpx.post(f"{url}/v1/feedback", json=feedback).json()
    assert first["recorded_clicks"] == 2 and again["recorded_clicks"] == 0
    unknown = {"recommendation_id": str(uuid.uuid4()), "clicks": []}
    assert httpx.post(f"{url}/v1/feedback", json=unknown).status_code == 404


def test_invalid_requests_get_4xx(server):
    url, _, _, _ = server
    bad = [
        ("/v1/recommendations", {"k": 10}),
        ("/v1/recommendations", {"item_ids": [10**9]}),
        ("/v1/recommendations", {"user_id": 1, "k": 0}),
        ("/v1/embeddings", {"users": []}),
        ("/v1/embeddings", {"users": [{"features": {"shoe": "9"}, "item_ids": [1]}]}),
    ]
    for path, body in bad:
        response = httpx.post(f"{url}{path}", json=body)
        assert 400 <= response.status_code < 500, (path, body, response.text)
        assert response.json()["detail"]


def test_replay_then_stop_reports_ctr_and_latency_to_mlflow(server, ml100k_dir):
    url, config, results, process = server
    summary = replay_test_period(url, ml100k_dir, limit=60)
    assert summary["errors"] == 0
    assert summary["cohorts"]["warm"]["users"] + summary["cohorts"]["cold"]["users"] == 60
    assert summary["impressions"] == 60 * 10

    # uvicorn shuts down cleanly on SIGTERM, then re-raises the signal.
    assert process.stop() in (0, -signal.SIGTERM), process.log_tail()
    assert "Application shutdown complete" in process.log_text()

    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(SERVING_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    metrics = run.data.metrics
    assert run.data.tags["model_version"] == str(results["register"]["version"])
    training_run = json.loads((config.work_dir / "run.json").read_text())["run_id"]
    assert run.data.tags["model_run_id"] == training_run
    # The replay's own clicks are at least the ones the server counted from it.
    assert metrics["serving/impressions"] >= summary["impressions"]
    for cohort in ("cold", "warm"):
        assert f"serving/{cohort}/ctr" in metrics
    warm = summary["cohorts"]["warm"]
    if warm["impressions"]:
        assert metrics["serving/warm/clicks"] >= warm["clicks"]
    for endpoint in ("recommendations", "feedback"):
        assert metrics[f"serving/{endpoint}/latency_p99_ms"] > 0
    history = client.get_metric_history(run.info.run_id, "serving/impressions")
    assert history[-1].step >= 0
