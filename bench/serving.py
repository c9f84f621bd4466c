"""Serving latency under a fixed open-loop load, against the bare FastAPI floor.

Two servers run side by side: the real one (``python -m serving`` over a
bundle folder, metrics to a throwaway SQLite MLflow store) and ``bare_app``
below, a FastAPI app under uvicorn whose endpoints return a constant JSON -
the floor of this stack (same uvicorn, same access logging). Each target is
driven at a fixed rate for a fixed time, one target at a time:

* ``bare`` (async handler) and ``bare_sync`` (a ``def`` handler, so the
  threadpool hop the model endpoints pay) at 200 req/s;
* ``lookup``: ``GET /v1/users/{id}/embedding`` over known users, 200 req/s;
* ``cold_embedding``: ``POST /v1/embeddings``, one new user with features and
  5 item ids, 100 req/s;
* ``recommend``: ``POST /v1/recommendations``, warm and cold alternating,
  k=10, every one of the catalogue's items scored, 100 req/s.

The load is open-loop: request ``i`` is due at ``start + i / rate`` whatever
happened to earlier ones, and its latency runs from that due time to the
response. A closed loop (send, wait, send) slows down with the server and so
hides its stalls (coordinated omission); here a stall shows as latency for
every request that fell due during it. The generator's own lag (actual send
minus due time) is reported too, to tell a saturated client from a slow
server. The client shares the machine's cores with both servers, so ratios
to the bare floor are the robust figures, absolute ones less so.

A soak (``EMAREC_BENCH_SOAK_S``, default 600; 0 skips it) then runs a fresh
server at the production flush interval (30 s, charts included) under a
steady mix at 50 req/s (lookups, cold embeddings, warm and cold
recommendations, feedback) and compares the server's RSS after a warm-up
(one minute, or half the soak if shorter) with the middle and the end. The
recommendation log is allocated whole at start-up, so filling it adds
nothing; what grows after the warm-up is the server's own.

Micro-batching of concurrent cold-user requests is measured, not built: the
in-process cost of embedding 1 user against 16 at once gives the most a batch
could save per request, and Little's law (rate x latency) gives how many cold
requests are ever in flight together to batch. ``serving_batching_worth_it``
says whether both are large enough; see the report for the figures.

Environment: ``EMAREC_BENCH_BUNDLE`` (a bundle folder; else a short pipeline
run builds one), ``EMAREC_BENCH_LOAD_S`` (seconds per target, default 20; 0
skips the load phase, for a soak alone), ``EMAREC_BENCH_SOAK_S``. The soak's
RSS samples go to ``bench/serving_soak_rss.csv``, and the RSS trend of each
half after the warm-up (MB per minute) to the results. Everything listens on
and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import uvloop
from fastapi import FastAPI

from bench import THP, THP_SET_HERE

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
WARMUP_S = 2.0
REQUEST_TIMEOUT_S = 10.0
# Requests still out this long after the last one fell due count as errors.
DRAIN_S = 30.0
RSS_EVERY_S = 5.0
SOAK_RATE = 50.0
SOAK_FLUSH_S = 30.0
SOAK_WARMUP_S = 60.0
SOAK_SAMPLES = Path(__file__).resolve().parent / "serving_soak_rss.csv"
COLD_ITEMS = 5
K = 10
LOOKUP_P99_TARGET = 1.5
RECOMMEND_P99_TARGET_MS = 25.0

bare_app = FastAPI(title="bare floor")


@bare_app.get("/ping")
async def ping() -> dict:
    """A constant answer from the event loop."""
    return {"status": "ok"}


@bare_app.get("/ping-sync")
def ping_sync() -> dict:
    """A constant answer from the threadpool, like the model endpoints."""
    return {"status": "ok"}


# Load generation.


@dataclass(frozen=True)
class Request:
    """One request to send; ``label`` splits the figures (e.g. warm/cold)."""

    method: str
    path: str
    body: dict | None = None
    label: str = ""


RequestMaker = Callable[[int], Request]
ResponseHook = Callable[[Request, httpx.Response], None]


@dataclass
class LoadResult:
    """What one open-loop run measured.

    Attributes:
        latency_ms: due-to-response latency of successful requests by label.
        lag_ms: actual send minus due time of every request.
        errors: non-2xx answers plus requests that raised or timed out.
        ok: successful requests.
        start: ``perf_counter`` time the first request fell due.
        span_s: first due time to last response.
        error_samples: the first few errors, for the log.
    """

    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    lag_ms: list[float] = field(default_factory=list)
    errors: int = 0
    ok: int = 0
    start: float = 0.0
    span_s: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def all_latency_ms(self) -> list[float]:
        """Latencies of every label together."""
        return [v for values in self.latency_ms.values() for v in values]

    def add_error(self, what: str) -> None:
        """Count an error, keeping the first few descriptions."""
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def _send(
    client: httpx.AsyncClient,
    request: Request,
    due: float,
    result: LoadResult,
    hook: ResponseHook | None,
) -> None:
    result.lag_ms.append((time.perf_counter() - due) * 1000)
    try:
        response = await client.request(
            request.method, request.path, json=request.body
        )
    except httpx.HTTPError as exc:
        result.add_error(f"{request.path}: {type(exc).__name__}: {exc}")
        return
    done = time.perf_counter()
    if not response.is_success:
        detail = f"{response.status_code} {response.text[:200]}"
        result.add_error(f"{request.path}: {detail}")
        return
    result.ok += 1
    result.latency_ms.setdefault(request.label, []).append((done - due) * 1000)
    result.span_s = max(result.span_s, done - result.start)
    if hook is not None:
        hook(request, response)


async def drive(
    base_url: str,
    make: RequestMaker,
    rate: float,
    duration_s: float,
    hook: ResponseHook | None = None,
) -> LoadResult:
    """Send ``rate * duration_s`` requests, each at its due time (open loop).

    Args:
        base_url: server root, on 127.0.0.1.
        make: the ``i``-th request.
        rate: requests per second.
        duration_s: seconds over which requests fall due.
        hook: called with each successful response.

    Returns:
        Latencies from due time, errors and the span; requests still out
        :data:`DRAIN_S` after the last due time are cancelled and counted as
        errors.
    """
    count = int(rate * duration_s)
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    result = LoadResult()
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False
    ) as client:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole
        # milliseconds and is read once per loop iteration.
        result.start = time.perf_counter() + 0.05
        tasks = []
        for i in range(count):
            due = result.start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            send = _send(client, make(i), due, result, hook)
            tasks.append(asyncio.create_task(send))
        if not tasks:
            return result
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
        for task in pending:
            task.cancel()
            result.add_error("still unanswered after the drain time")
    return result


def run_async(coroutine: Coroutine) -> Any:
    """Run a coroutine on uvloop, like the servers: the generator shares the
    cores with them, so its own overhead should be as small as it can be."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 of ``values`` (NaN when empty)."""
    if not values:
        return dict.fromkeys(("p50", "p95", "p99"), float("nan"))
    points = np.percentile(np.asarray(values), (50, 95, 99))
    return {name: float(p) for name, p in zip(("p50", "p95", "p99"), points)}


def figures(name: str, result: LoadResult, rate: float) -> dict:
    """Flat ``serving_<name>_*`` figures of one run."""
    out = {
        f"serving_{name}_{key}_ms": round(value, 3)
        for key, value in percentiles(result.all_latency_ms()).items()
    }
    if len(result.latency_ms) > 1:
        for label, values in sorted(result.latency_ms.items()):
            for key, value in percentiles(values).items():
                out[f"serving_{name}_{label}_{key}_ms"] = round(value, 3)
    out[f"serving_{name}_rate"] = rate
    throughput = result.ok / max(result.span_s, 1e-9)
    out[f"serving_{name}_throughput"] = round(throughput, 1)
    out[f"serving_{name}_errors"] = result.errors
    lag_p99 = percentiles(result.lag_ms)["p99"]
    out[f"serving_{name}_send_lag_p99_ms"] = round(lag_p99, 3)
    return out


# Processes.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without ``EMAREC_*`` (the server reads those), plus
    ``extra``; MLflow telemetry off and no proxy for loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMAREC_")}
    if THP_SET_HERE:  # the servers run as they would outside the benchmark
        env.pop(THP, None)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env.update(NO_PROXY=f"{LOCALHOST},localhost", no_proxy=f"{LOCALHOST},localhost")
    paths = [str(REPO), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return {**env, **extra}


@contextmanager
def process(args: list[str], env: dict, cwd: Path, log: Path) -> Iterator:
    """Run a child with its output in ``log``; SIGTERM (then kill) on exit."""
    with open(log, "wb") as out:
        child = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield child
    finally:
        stop(child)


def stop(child: subprocess.Popen) -> None:
    """SIGTERM lets uvicorn run the shutdown, which makes the final flush."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(
            "pid %d ignored SIGTERM for %.0f s; killing", child.pid, STOP_TIMEOUT_S
        )
        child.kill()
        child.wait()


def wait_ready(url: str, child: subprocess.Popen, log: Path) -> None:
    """Poll ``url`` until it answers 200; raise if the child dies or stalls."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                status = child.returncode
                raise RuntimeError(f"{url} exited early ({status}):\n{tail}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"{url} not ready within {START_TIMEOUT_S:.0f} s; see {log}")


def start_serving(
    stack: ExitStack, bundle: Path, work: Path, name: str, flush_s: float
) -> tuple[str, subprocess.Popen]:
    """Start ``python -m serving`` on the bundle; returns its URL and process."""
    port = free_port()
    env = child_env(
        {
            "EMAREC_MODEL_DIR": str(bundle),
            "EMAREC_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
            "EMAREC_HOST": LOCALHOST,
            "EMAREC_PORT": str(port),
            "EMAREC_REPORT_INTERVAL_S": str(flush_s),
        }
    )
    log = work / f"{name}.log"
    # cwd is the scratch folder: MLflow puts the run's artifacts under it.
    child = stack.enter_context(
        process([sys.executable, "-m", "serving"], env, work, log)
    )
    return f"http://{LOCALHOST}:{port}", child


def start_bare(stack: ExitStack, work: Path) -> tuple[str, subprocess.Popen]:
    """Start ``bare_app`` under uvicorn; returns its URL and process."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "bench.serving:bare_app"]
    args += ["--host", LOCALHOST, "--port", str(port)]
    log = work / "bare.log"
    child = stack.enter_context(process(args, child_env({}), REPO, log))
    return f"http://{LOCALHOST}:{port}", child


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


# Payloads.


@dataclass
class Payloads:
    """Requests built from a bundle's known users and catalogue."""

    users: list[int]
    items: list[int]
    features: list[dict[str, str]]
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    recent: deque = field(default_factory=lambda: deque(maxlen=1000))

    @classmethod
    def from_bundle(cls, bundle: Path) -> Payloads:
        """Known user ids, item ids and real users' side features."""
        import pandas as pd

        users = pd.read_parquet(bundle / "users.parquet")
        items = pd.read_parquet(bundle / "items.parquet")
        names = [c for c in ("age", "gender", "occupation", "zip") if c in users]
        features = users[names].astype(str).to_dict("records")
        ids = users.user_id.astype(int).tolist()
        return cls(ids, items.item_id.astype(int).tolist(), features)

    def cold_user(self) -> dict:
        """A new user: a real user's side features and 5 random items."""
        return {
            "features": self.rng.choice(self.features),
            "item_ids": [int(i) for i in self.rng.sample(self.items, COLD_ITEMS)],
        }

    def lookup(self, i: int) -> Request:
        user = self.users[i % len(self.users)]
        return Request("GET", f"/v1/users/{user}/embedding")

    def cold_embedding(self, i: int) -> Request:
        return Request("POST", "/v1/embeddings", {"users": [self.cold_user()]})

    def recommend(self, i: int) -> Request:
        if i % 2 == 0:
            user = self.users[(i // 2) % len(self.users)]
            body = {"user_id": user, "k": K}
            return Request("POST", "/v1/recommendations", body, "warm")
        body = {**self.cold_user(), "k": K}
        return Request("POST", "/v1/recommendations", body, "cold")

    def feedback(self, i: int) -> Request:
        if not self.recent:
            return self.recommend(i)
        recommendation_id, items = self.recent.popleft()
        body = {"recommendation_id": recommendation_id, "clicks": items[:1]}
        return Request("POST", "/v1/feedback", body, "feedback")

    def soak(self, i: int) -> Request:
        makers = (self.lookup, self.cold_embedding, self.recommend, self.feedback)
        return makers[i % len(makers)](i // len(makers))

    def remember(self, request: Request, response: httpx.Response) -> None:
        """Keep recommendation ids so later feedback requests can quote them."""
        if request.path == "/v1/recommendations":
            body = response.json()
            items = [item["item_id"] for item in body["items"]]
            self.recent.append((body["recommendation_id"], items))


# Phases.


def load_seconds() -> float:
    return float(os.environ.get("EMAREC_BENCH_LOAD_S", "20"))


def soak_seconds() -> float:
    return float(os.environ.get("EMAREC_BENCH_SOAK_S", "600"))


def measure(name: str, url: str, make: RequestMaker, rate: float) -> dict:
    """Warm a target up (unmeasured), then drive it and name its figures."""
    run_async(drive(url, make, rate, WARMUP_S))
    result = run_async(drive(url, make, rate, load_seconds()))
    if result.error_samples:
        logger.warning("%s errors, e.g. %s", name, result.error_samples)
    found = figures(name, result, rate)
    p50, p99 = found[f"serving_{name}_p50_ms"], found[f"serving_{name}_p99_ms"]
    logger.info("%-15s %5.0f req/s: p50 %.2f ms, p99 %.2f ms", name, rate, p50, p99)
    return found


def targets(payloads: Payloads, bare: str, real: str) -> list[tuple]:
    """(name, url, request maker, rate) of each measured target."""
    return [
        ("bare", bare, lambda i: Request("GET", "/ping"), 200.0),
        ("bare_sync", bare, lambda i: Request("GET", "/ping-sync"), 200.0),
        ("lookup", real, payloads.lookup, 200.0),
        ("cold_embedding", real, payloads.cold_embedding, 100.0),
        ("recommend", real, payloads.recommend, 100.0),
    ]


def load_phase(bundle: Path, work: Path, payloads: Payloads) -> dict:
    """Both servers up, every target measured, then both stopped."""
    with ExitStack() as stack:
        bare_url, bare = start_bare(stack, work)
        real_url, real = start_serving(stack, bundle, work, "server", 3600.0)
        wait_ready(f"{bare_url}/ping", bare, work / "bare.log")
        wait_ready(f"{real_url}/healthz", real, work / "server.log")
        out: dict = {"serving_server_rss_ready_mb": round(rss_mb(real.pid), 1)}
        for name, url, make, rate in targets(payloads, bare_url, real_url):
            out.update(measure(name, url, make, rate))
        out["serving_server_rss_after_load_mb"] = round(rss_mb(real.pid), 1)
    out["serving_load_plots"] = serving_plots(work)
    return out


async def _sample_rss(pid: int, duration_s: float, samples: list) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < duration_s:
        samples.append((loop.time() - start, rss_mb(pid)))
        await asyncio.sleep(RSS_EVERY_S)
    samples.append((loop.time() - start, rss_mb(pid)))


async def _soak(url: str, pid: int, payloads: Payloads, seconds: float) -> tuple:
    samples: list[tuple[float, float]] = []
    result, _ = await asyncio.gather(
        drive(url, payloads.soak, SOAK_RATE, seconds, payloads.remember),
        _sample_rss(pid, seconds, samples),
    )
    return result, samples


def soak_phase(bundle: Path, work: Path, payloads: Payloads, seconds: float) -> dict:
    """A fresh server, flushing every 30 s, under a steady mix for ``seconds``."""
    soak_dir = work / "soak"
    soak_dir.mkdir()
    with ExitStack() as stack:
        url, server = start_serving(stack, bundle, soak_dir, "soak", SOAK_FLUSH_S)
        wait_ready(f"{url}/healthz", server, soak_dir / "soak.log")
        result, samples = run_async(_soak(url, server.pid, payloads, seconds))
    warmup = min(SOAK_WARMUP_S, seconds / 2)
    start_mb = next(mb for at, mb in samples if at >= warmup)
    mid_mb = next(mb for at, mb in samples if at >= (warmup + seconds) / 2)
    latency = percentiles(result.all_latency_ms())
    out = {f"serving_soak_{k}_ms": round(v, 3) for k, v in latency.items()}
    out.update(
        serving_soak_seconds=seconds,
        serving_soak_rate=SOAK_RATE,
        serving_soak_errors=result.errors,
        serving_soak_warmup_s=warmup,
        serving_soak_rss_ready_mb=round(samples[0][1], 1),
        serving_soak_rss_start_mb=round(start_mb, 1),
        serving_soak_rss_mid_mb=round(mid_mb, 1),
        serving_soak_rss_end_mb=round(samples[-1][1], 1),
        serving_soak_rss_max_mb=round(max(mb for _, mb in samples), 1),
        serving_soak_plots=serving_plots(soak_dir),
    )
    out.update(soak_growth(result, samples[-1][1] - start_mb, start_mb))
    out.update(rss_slopes(samples, warmup, seconds))
    write_samples(samples, SOAK_SAMPLES)
    out["serving_soak_flushes"] = flush_count(soak_dir)
    if result.error_samples:
        logger.warning("soak errors, e.g. %s", result.error_samples)
    return out


def rss_slopes(samples: list[tuple[float, float]], warmup: float, seconds: float):
    """RSS trend (least-squares MB per minute) in each half after the warm-up.

    Flat memory shows as a second-half slope near zero; a leak keeps its
    slope, warm-up growth (allocator pools, caches filling) loses it.
    """
    middle = (warmup + seconds) / 2
    halves = {"1st": (warmup, middle), "2nd": (middle, seconds + RSS_EVERY_S)}
    out = {}
    for half, (low, high) in halves.items():
        points = np.array([(at, mb) for at, mb in samples if low <= at <= high])
        slope = 0.0
        if len(points) > 2:
            slope = np.polyfit(points[:, 0] / 60, points[:, 1], 1)[0]  # MB/min
        out[f"serving_soak_rss_slope_{half}_half_mb_per_min"] = round(float(slope), 3)
    return out


def write_samples(samples: list[tuple[float, float]], path: Path) -> None:
    """The soak's RSS samples as CSV (``seconds,rss_mb``), for a plot."""
    rows = [f"{at:.1f},{mb:.2f}" for at, mb in samples]
    path.write_text("seconds,rss_mb\n" + "\n".join(rows) + "\n")
    logger.info("soak RSS samples in %s", path)


def soak_growth(result: LoadResult, growth_mb: float, start_mb: float) -> dict:
    """RSS growth after the warm-up, in MB and as a share of the RSS then."""
    made = sum(len(result.latency_ms.get(label, [])) for label in ("warm", "cold"))
    return {
        "serving_soak_recommendations": made,
        "serving_soak_rss_growth_mb": round(growth_mb, 1),
        "serving_soak_rss_growth_pct": round(100 * growth_mb / start_mb, 2),
    }


def _serving_run(work: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emarec-serving")
    if experiment is None:
        return client, None
    runs = client.search_runs([experiment.experiment_id], max_results=1)
    return client, (runs[0] if runs else None)


def serving_plots(work: Path) -> bool:
    """Whether the server's MLflow run holds both charts."""
    client, run = _serving_run(work)
    if run is None:
        return False
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    return listed == {"plots/ctr_by_cohort.png", "plots/latency_histogram.png"}


def flush_count(work: Path) -> int:
    """Flushes (steps of ``serving/ctr``) in the server's MLflow run."""
    client, run = _serving_run(work)
    if run is None:
        return 0
    return len(client.get_metric_history(run.info.run_id, "serving/ctr"))


def batching_phase(bundle: Path, payloads: Payloads, rate_figures: dict) -> dict:
    """In-process model costs (best of many) and the micro-batching verdict."""
    from models.bundle import ColdUser, load_bundle

    model = load_bundle(bundle)
    users = [
        ColdUser(u["features"], tuple(u["item_ids"]))
        for u in (payloads.cold_user() for _ in range(16))
    ]
    one = _best_ms(lambda: model.cold_embeddings(users[:1]), 200)
    many = _best_ms(lambda: model.cold_embeddings(users), 50)
    saving = one - many / len(users)
    p50_s = rate_figures["serving_cold_embedding_p50_ms"] / 1000
    in_flight = rate_figures["serving_cold_embedding_rate"] * p50_s
    # Batching needs company: with under 2 requests in flight (Little's law)
    # a batch is a batch of one unless a wait window is added, and that window
    # costs each request more than the sub-millisecond model saving.
    worth_it = in_flight >= 2.0 and saving > 0.0
    return {
        "serving_cold_model_ms_batch1": round(one, 3),
        "serving_cold_model_ms_per_user_batch16": round(many / len(users), 3),
        "serving_batching_saving_ms": round(saving, 3),
        "serving_cold_in_flight": round(in_flight, 3),
        "serving_batching_worth_it": worth_it,
        "serving_recommend_warm_model_ms": round(
            _best_ms(lambda: model.recommend_known(payloads.users[0], K), 50), 3
        ),
        "serving_recommend_cold_model_ms": round(
            _best_ms(lambda: model.recommend_cold(users[0], K), 50), 3
        ),
    }


def _best_ms(call: Callable[[], object], repeats: int) -> float:
    # The best run is the cost without the noise of other jobs on the box.
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return float(min(times))


def bundle_path(work: Path) -> Path:
    """``EMAREC_BENCH_BUNDLE``, else a bundle from a short pipeline run."""
    given = os.environ.get("EMAREC_BENCH_BUNDLE")
    if given:
        return Path(given).resolve()
    run_dir = work / "pipeline"
    args = [str(VENV_BIN / "emarec"), "run", "--work-dir", str(run_dir)]
    args += ["--tracking-uri", f"sqlite:///{work / 'pipeline.db'}"]
    args += ["--max-steps", "50", "--student-epochs", "0"]
    logger.info("no EMAREC_BENCH_BUNDLE; building one (about 2 minutes)")
    with open(work / "pipeline.log", "wb") as log:
        env = child_env({})
        subprocess.run(
            args, env=env, cwd=work, stdout=log, stderr=log, check=True, timeout=1800
        )
    return run_dir / "bundle"


def verdicts(out: dict) -> dict:
    """The headline figures and whether each meets its target."""
    ratio = out["serving_lookup_p99_ms"] / out["serving_bare_p99_ms"]
    errors = sum(v for k, v in out.items() if k.endswith("_errors"))
    return {
        "serving_lookup_p99_vs_bare": round(ratio, 3),
        "serving_lookup_p99_vs_bare_ok": ratio <= LOOKUP_P99_TARGET,
        "serving_recommend_p99_ok": out["serving_recommend_p99_ms"]
        < RECOMMEND_P99_TARGET_MS,
        "serving_errors": errors,
    }


def run() -> dict:
    """Load phase, soak and batching measurement; flat ``serving_*`` figures."""
    # httpx logs every request at INFO; that would load the generator itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out: dict = {"serving_loadavg_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="emarec-bench-serving-") as folder:
        work = Path(folder)
        bundle = bundle_path(work)
        payloads = Payloads.from_bundle(bundle)
        out["serving_catalogue_items"] = len(payloads.items)
        if load_seconds() > 0:
            out.update(load_phase(bundle, work, payloads))
            out.update(verdicts(out))
        seconds = soak_seconds()
        if seconds > 0:
            out.update(soak_phase(bundle, work, payloads, seconds))
        if load_seconds() > 0:
            out.update(batching_phase(bundle, payloads, out))
    out["serving_loadavg_end"] = round(os.getloadavg()[0], 2)
    return out

