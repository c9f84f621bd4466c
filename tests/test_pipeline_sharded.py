"""Sharded training: TorchRec DistributedModelParallel under ``torchrun``, on CPU.

Real processes throughout: ``emarec train --nproc N`` launches ``torchrun``,
which starts N gloo ranks; each shards the tables table-wise with TorchRec's
planner. The 2-process run is compared with the 1-process run of the same
sharded code (same tables, same fused row-wise Adagrad), a killed run with its
resumption, and the per-shard lazy EMA with a plain dense EMA of the whole
gathered teacher.

Runs use the synchronous snapshot publish (``background_sync: false``): with
the background publisher the student's step may read the snapshot one publish
older, as thread timing decides, and two runs are then only alike, not equal.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.config import PipelineConfig
from pipeline.plan import format_plan, plan_memory

REPO = Path(__file__).resolve().parents[1]
EMAREC = [sys.executable, "-m", "pipeline.cli"]
STEPS, CHECKPOINT_EVERY, KILL_AT = 300, 100, 200
RECALL_TOLERANCE = 0.01
NETWORKS = ("online_teacher", "ema_teacher", "student")


def emarec(args: list[str], log: Path, **popen) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        [*EMAREC, *args], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, **popen
    )


def finished(child: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    code = child.wait(timeout)
    assert code == 0, f"{child.args} exited {code}:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def ingested(ml100k_dir: Path, tmp_path_factory) -> Path:
    """One ingested work dir, copied for each run (ingest is not under test)."""
    root = tmp_path_factory.mktemp("sharded")
    config = root / "settings.json"
    config.write_text(json.dumps({"train": {"background_sync": False}}))
    work = root / "template"
    log = root / "ingest.log"
    args = ["ingest", "--data", str(ml100k_dir), "--config", str(config)]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    finished(emarec([*args, "--work-dir", str(work), "--tracking-uri", uri], log), log)
    return work


def fresh_run(template: Path, name: str) -> Path:
    work = template.parent / name
    shutil.copytree(template / "ingest", work / "ingest")
    shutil.copy(template / "config.json", work / "config.json")
    return work


def train_args(work: Path, nproc: int) -> list[str]:
    return [
        "train", "--work-dir", str(work), "--nproc", str(nproc),
        "--max-steps", str(STEPS), "--epochs", "1", "--student-epochs", "0",
        "--checkpoint-every", str(CHECKPOINT_EVERY),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(ingested: Path) -> dict[int, Path]:
    """A 1-process and a 2-process sharded run, trained and evaluated."""
    works = {}
    for nproc in (1, 2):
        work = fresh_run(ingested, f"n{nproc}")
        log = work / "train.log"
        finished(emarec(train_args(work, nproc), log), log)
        for step in ("quantize", "evaluate"):
            log = work / f"{step}.log"
            finished(emarec([step, "--work-dir", str(work)], log), log)
        works[nproc] = work
    return works


def metrics(work: Path) -> dict[str, float]:
    return json.loads((work / "eval" / "metrics.json").read_text())


def test_two_processes_match_one_in_recall(runs):
    one, two = metrics(runs[1]), metrics(runs[2])
    summary = json.loads((runs[2] / "model" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["teacher_steps"] == STEPS
    for model in ("ema_teacher", "student"):
        for cohort in ("cold", "warm"):
            key = f"{model}/{cohort}/recall_at_10"
            assert abs(one[key] - two[key]) <= RECALL_TOLERANCE, (key, one[key], two[key])
    # Trained, not a copy of the initial weights or of popularity.
    assert two["ema_teacher/warm/auc"] > two["popularity/warm/auc"]


def test_two_process_checkpoint_holds_every_rank(runs):
    folder = runs[2] / "model" / "checkpoints"
    done = sorted(p.name for p in folder.glob("step-*/meta.json"))
    assert len(done) == 2  # only the last two are kept
    last = folder / f"step-{STEPS:08d}"
    assert {p.name for p in last.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS


def load_networks(work: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = work / "model"
    return {n: torch.load(folder / f"{n}.pt", weights_only=True) for n in NETWORKS}


def test_killed_run_resumes_to_the_uninterrupted_result(ingested, runs):
    work = fresh_run(ingested, "killed")
    log = work / "train.log"
    child = emarec(train_args(work, 2), log)
    marker = work / "model" / "checkpoints" / f"step-{KILL_AT:08d}" / "meta.json"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert child.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint to kill after"
        time.sleep(0.1)
    # emarec and torchrun killed outright: the ranks (in sessions of their
    # own) end with them rather than train on as orphans.
    tree = psutil.Process(child.pid).children(recursive=True)
    ranks = [
        p
        for p in tree
        if "pipeline.train" in p.cmdline()
        and "torch.distributed.run" not in p.cmdline()
    ]
    assert len(ranks) == 2, [p.cmdline() for p in tree]
    for process in [psutil.Process(child.pid), *(p for p in tree if p not in ranks)]:
        process.send_signal(signal.SIGKILL)
    child.wait(60)
    _, orphans = psutil.wait_procs(ranks, timeout=60)
    for orphan in orphans:
        orphan.kill()
    assert not orphans, "ranks outlived their torchrun agent"
    assert not (work / "model" / "train_summary.json").exists()

    log = work / "resume.log"
    finished(emarec([*train_args(work, 2), "--resume"], log), log)
    assert f"resumed from {work / 'model' / 'checkpoints' / f'step-{KILL_AT:08d}'}" in (
        log.read_text()
    )
    resumed, uninterrupted = load_networks(work), load_networks(runs[2])
    for name in NETWORKS:
        for key, tensor in uninterrupted[name].items():
            diff = (resumed[name][key] - tensor).abs().max().item()
            assert diff <= 1e-6, (name, key, diff)


def test_sharded_ema_equals_the_ema_of_the_whole_table(ingested, tmp_path):
    out = tmp_path / "ema.json"
    log = tmp_path / "ema.log"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node=2", str(REPO / "tests" / "sharded_ema_check.py"),
        str(ingested), str(out), "60",
    ]  # fmt: skip
    handle = log.open("w")
    child = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    finished(child, log)
    ranks = json.loads(out.read_text())
    diffs = ranks[0]["max_abs_diff"]
    tables = set(ranks[0]["table_rows"])
    assert tables and tables <= diffs.keys()
    assert max(diffs.values()) <= 1e-6, diffs
    # Each rank averages only the rows it holds, lazily: no rank holds every table.
    held = [set(rank["lazy_tables"]) for rank in ranks]
    assert all(held) and set().union(*held) == tables
    assert all(h != tables for h in held)
    for rank in ranks:
        for name, shape in rank["lazy_tables"].items():
            assert shape == ranks[0]["table_rows"][name]


def test_plan_on_paper_for_a_cluster():
    plan, ranks, dense = plan_memory(100_000_000, 10_000_000, 128, 64, "row_wise")
    assert len(ranks) == 64
    rows = (100_000_001 + 10_000_001 + 8 + 3 + 22 + 1000 + 20) * 128 * 4
    assert sum(r.weights for r in ranks) == rows
    for rank in ranks:
        assert rank.ema == rank.weights  # a float32 shadow of each local row
        assert 0 < rank.ema_lazy_step < rank.ema_dense_step / 10
    text = format_plan(plan, ranks, dense, hbm_gb=80)
    assert "t_user_id" in text and "row_wise" in text
    assert len([line for line in text.splitlines() if line[:4].strip().isdigit()]) == 64


def test_checkpoint_interval_must_land_on_a_published_snapshot():
    with pytest.raises(ValueError, match="multiple of distill_interval"):
        PipelineConfig.model_validate({"train": {"checkpoint_every": 15}})
