"""Which data and training each step's output came from.

Ingest stamps its data; train stamps its networks and records the data's
stamp; quantize records the training's stamp and one of its own; evaluate
both stamps and its K. Register then refuses a bundle whose parts come from
different trainings (a retrain after quantize, say) or a training of data
ingested since, which would otherwise be registered with the gate figures of
another model. A run without the stamps (a step that did not complete, a
file deleted by hand) is refused, naming the step to run again.

Quantize and evaluate write their stamp last, once everything else in the
step (its MLflow logging included) has succeeded, and remove the one they
are about to make stale before writing anything: outputs of a step that
failed or was stopped are never vouched for, and register names the step to
run again.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

LINEAGE = "lineage.json"
# Quantize's stamp, beside the INT8 student it vouches for (and in the bundle).
QUANTIZE = "quantize.json"

# The steps that write a run's files, in order, and the one that writes each
# folder's lineage.json.
STEPS = ("ingest", "train", "quantize", "evaluate")
WRITERS = {"ingest": "ingest", "model": "train", "eval": "evaluate"}
# Each folder's stamps that a lineage.json it wrote always holds.
REQUIRED = {
    "ingest": ("ingested",),
    "model": ("trained",),
    "eval": ("trained", "quantized"),
}


def stamp() -> str:
    """A fresh identity for one step's output."""
    return uuid.uuid4().hex


def rewrite_error(path: Path, step: str, problem: str) -> ValueError:
    """The error for a file ``step`` wrote that a later step cannot use:
    names the file, what is wrong, and the steps that write it again (the
    step itself, then those whose stamps it makes stale)."""
    work_dir = Path(path).parent.parent
    after = STEPS[STEPS.index(step) + 1 :]
    then = ""
    if after:
        then = ", then " + (
            f"{', '.join(after[:-1])} and {after[-1]}" if len(after) > 1 else after[0]
        )
    return ValueError(
        f"{path} {problem}: run `emarec {step} --work-dir {work_dir}` again to "
        f"rewrite it{then}"
    )


def read_json(path: Path, step: str) -> dict:
    """The JSON object in ``path``, which ``step`` writes.

    A file cut short or edited by hand would otherwise surface as a bare
    ``JSONDecodeError`` (or a ``KeyError`` further on) that names neither the
    file nor how to get a good one back.

    Raises:
        ValueError: the file is not JSON, or holds no object (see
            :func:`rewrite_error`).
    """
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise rewrite_error(path, step, f"is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise rewrite_error(path, step, f"holds a JSON {kind}, not an object")
    return value


def check_stamps(path: Path, step: str, stamps: dict, required=()) -> dict:
    """``stamps`` when each stamp it holds is a string of letters, digits,
    ``_`` and ``-`` (:func:`stamp` writes hex) or null (``eval_k`` a
    positive integer) and each of ``required`` is there.

    Raises:
        ValueError: naming the field, the file and the step that rewrites it.
    """
    for key in required:
        if key not in stamps:
            raise rewrite_error(path, step, f"has no {key!r} stamp")
    for key in ("ingested", "trained", "quantized"):
        value = stamps.get(key)
        if value is not None and not (
            isinstance(value, str) and re.fullmatch(r"[\w-]+", value)
        ):
            raise rewrite_error(path, step, f"has {key!r} {value!r}, not a stamp")
    k = stamps.get("eval_k")
    if "eval_k" in stamps and (type(k) is not int or k < 1):
        raise rewrite_error(path, step, f"has 'eval_k' {k!r}, not a positive integer")
    return stamps


def read_lineage(folder: Path) -> dict:
    """``folder/lineage.json``, or ``{}`` when the step wrote none.

    Raises:
        ValueError: the file is unreadable or not a lineage (see
            :func:`read_json`).
    """
    path = Path(folder) / LINEAGE
    if not path.is_file():
        return {}
    name = Path(folder).name
    step = WRITERS[name]
    return check_stamps(path, step, read_json(path, step), REQUIRED[name])


def read_quantized(folder: Path) -> dict:
    """``folder/quantize.json``, what quantize did and its stamp, or ``{}``
    when there is no INT8 student beside it either.

    Raises:
        ValueError: the INT8 student is there without the file (the quantize
            that wrote it failed or was stopped), or the file is unreadable.
    """
    path = Path(folder) / QUANTIZE
    if path.is_file():
        return check_stamps(path, "quantize", read_json(path, "quantize"))
    if (Path(folder) / "student_int8.pt").is_file():
        raise rewrite_error(
            path,
            "quantize",
            "is missing beside student_int8.pt: the quantize that wrote it did "
            "not complete (it failed or was stopped, in its MLflow logging, say)",
        )
    return {}


def write_json(path: Path, value: dict) -> None:
    """Writes ``path`` whole or not at all (through a file beside it), so a
    step stopped while writing its stamp leaves none rather than half of one."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def write_lineage(folder: Path, **stamps) -> None:
    write_json(Path(folder) / LINEAGE, stamps)


def missing_training(work_dir: Path) -> str:
    """The refusal of networks no completed train vouches for."""
    return (
        f"{work_dir}/model/lineage.json is missing: the train that wrote "
        f"{work_dir}/model/ did not complete (it failed or was stopped, in its "
        f"MLflow logging, say): run `emarec train --work-dir {work_dir}`, then "
        "quantize and evaluate, before register"
    )


def trained_stamp(work_dir: Path) -> str:
    """The stamp of the training in ``work_dir/model``.

    Raises:
        ValueError: no completed train wrote one (see :func:`missing_training`).
    """
    trained = read_lineage(Path(work_dir) / "model").get("trained")
    if not trained:
        raise ValueError(missing_training(work_dir))
    return trained


def stale_int8(work_dir: Path, then: str) -> ValueError:
    """The error for an INT8 student quantized from an earlier training;
    ``then`` names what to run after quantize."""
    return ValueError(
        f"{work_dir}/model/student_int8.pt was quantized from another training "
        "than the networks now in model/ (train ran after quantize): run "
        f"`emarec quantize --work-dir {work_dir}`{then}"
    )


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
    again = f"--work-dir {work_dir}"
    if not ingested:
        raise ValueError(
            f"{work_dir}/ingest/lineage.json is missing: the ingest that wrote "
            f"{work_dir}/ingest/ did not complete: run `emarec ingest {again}`, "
            "then train, quantize and evaluate, before register"
        )
    if not trained:
        raise ValueError(missing_training(work_dir))
    if "ingested" in trained and trained["ingested"] != ingested.get("ingested"):
        raise ValueError(
            f"{work_dir}/model/ was trained on other data than {work_dir}/ingest/ "
            f"now holds (ingest ran after train): run `emarec train {again}`, "
            "then quantize and evaluate, before register"
        )
    if quantized.get("trained") != trained["trained"]:
        raise stale_int8(work_dir, f" and `emarec evaluate {again}` before register")
    if not evaluated:
        raise ValueError(
            f"{work_dir}/eval/lineage.json is missing: the evaluate that wrote "
            f"{work_dir}/eval/metrics.json did not complete (it failed or was "
            f"stopped, in its MLflow logging, say): run `emarec evaluate {again}` "
            "before register"
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
