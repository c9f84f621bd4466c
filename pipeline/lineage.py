"""Which data and training each step's output came from.

Ingest stamps its data; train stamps its networks and records the data's
stamp; quantize records the training's stamp and one of its own; evaluate
both stamps and its K. Register then refuses a bundle whose parts come from
different trainings (a retrain after quantize, say) or a training of data
ingested since, which would otherwise be registered with the gate figures of
another model. Runs made before the stamps existed carry none and are not
checked.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

LINEAGE = "lineage.json"


def stamp() -> str:
    """A fresh identity for one step's output."""
    return uuid.uuid4().hex


def read_lineage(folder: Path) -> dict:
    """``folder/lineage.json``, or ``{}`` when the step wrote none."""
    path = Path(folder) / LINEAGE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_lineage(folder: Path, **stamps) -> None:
    (Path(folder) / LINEAGE).write_text(json.dumps(stamps, indent=2))


def check_lineage(
    ingested: dict, trained: dict, quantized: dict, evaluated: dict, work_dir: Path
) -> None:
    """Refuses parts of a run made from different trainings, or a training
    made from other data than ingest now holds.

    Args:
        ingested: ``ingest/lineage.json``.
        trained: ``model/lineage.json``.
        quantized: ``model/quantize.json``.
        evaluated: ``eval/lineage.json``.

    Raises:
        ValueError: naming the stale step and the commands that bring it up
            to date.
    """
    if not trained:
        return
    again = f"--work-dir {work_dir}"
    if "ingested" in trained and trained["ingested"] != ingested.get("ingested"):
        raise ValueError(
            f"{work_dir}/model/ was trained on other data than {work_dir}/ingest/ "
            f"now holds (ingest ran after train): run `emarec train {again}`, "
            "then quantize and evaluate, before register"
        )
    if quantized.get("trained") != trained["trained"]:
        raise ValueError(
            f"{work_dir}/model/student_int8.pt was quantized from another "
            "training than the networks now in model/ (train ran after "
            f"quantize): run `emarec quantize {again}` and `emarec evaluate "
            f"{again}` before register"
        )
    stale = (
        evaluated.get("trained") != trained["trained"]
        or evaluated.get("quantized") != quantized.get("quantized")
    )
    if stale:
        raise ValueError(
            f"{work_dir}/eval/metrics.json measured other networks than those "
            f"now in model/ (train or quantize ran after evaluate): run "
            f"`emarec evaluate {again}` before register"
        )
