"""Sharded training throughput: 2 processes against 1 on this machine.

Ingests MovieLens-100K once, then runs ``emarec train --nproc 1`` and
``--nproc 2`` (TorchRec-sharded, gloo) for the same number of teacher steps on
the same global batches, one after the other, and compares the teacher steps
per second each reports (the training loop only: start-up, planning and
writing the networks are left out). On a 2-core machine the two processes
share the cores that one process's intra-op threads would otherwise use, so
the ratio says what the communication costs, not what more machines would buy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from data.locate import resolve_data

logger = logging.getLogger(__name__)

STEPS = 300
REPO = Path(__file__).resolve().parents[1]


def _emarec(args: list[str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"emarec {args[0]} failed; see {log}:\n{log.read_text()[-2000:]}")


def run() -> dict:
    """Trains with 1 and 2 processes and compares their step rates.

    Returns:
        ``dist_1proc_steps_per_second``, ``dist_2proc_steps_per_second`` and
        ``dist_2proc_step_speedup`` (2-process rate over 1-process rate).
    """
    data = resolve_data(None)  # EMAREC_DATA, ../shared, or the download
    root = Path(tempfile.mkdtemp(prefix="emarec-bench-dist-"))
    try:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        template = root / "template"
        _emarec(["ingest", "--data", str(data), "--work-dir", str(template),
                 "--tracking-uri", uri], root / "ingest.log")  # fmt: skip
        rates = {}
        for nproc in (1, 2):
            work = root / f"n{nproc}"
            shutil.copytree(template / "ingest", work / "ingest")
            shutil.copy(template / "config.json", work / "config.json")
            args = ["train", "--work-dir", str(work), "--nproc", str(nproc),
                    "--max-steps", str(STEPS), "--epochs", "1", "--student-epochs", "0"]  # fmt: skip
            logger.info("training %d steps with %d process(es)", STEPS, nproc)
            _emarec(args, root / f"train{nproc}.log")
            summary = json.loads((work / "model" / "train_summary.json").read_text())
            rates[nproc] = summary["teacher_steps_per_second"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        "dist_steps": STEPS,
        "dist_1proc_steps_per_second": rates[1],
        "dist_2proc_steps_per_second": rates[2],
        "dist_2proc_step_speedup": round(rates[2] / rates[1], 3),
        "dist_loadavg_end": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"  {key:<30} {value}")
    return figures
