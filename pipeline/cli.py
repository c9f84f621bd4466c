"""The ``emarec`` command line."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from data.structured import read_structured
from pipeline.config import ConfigError, PipelineConfig

logger = logging.getLogger("emarec")

STEP_NAMES = ("ingest", "train", "quantize", "evaluate", "register")


def _pipeline_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pipeline")
    group.add_argument("--data", type=Path, help="MovieLens-100K folder or a log file")
    group.add_argument("--mapping", type=Path, help="column mapping of a log file")
    group.add_argument("--config", type=Path, help="JSON or YAML pipeline config")
    group.add_argument("--work-dir", type=Path, help="where the run writes (runs/<time>)")
    group.add_argument("--tracking-uri", help="MLflow tracking URI")
    group.add_argument("--epochs", type=int, help="teacher epochs")
    group.add_argument("--max-steps", type=int, help="stop the teacher after N steps")
    group.add_argument("--student-epochs", type=int, help="extra distillation epochs")
    group.add_argument("--seed", type=int)
    group.add_argument(
        "--nproc",
        type=int,
        help="0 (default): one process, Adam everywhere; N: N TorchRec-sharded "
        "processes under torchrun, tables on fused row-wise Adagrad (N divides "
        "train.data_shards, 8)",
    )
    group.add_argument("--sharding", help="table_wise, column_wise or row_wise (CUDA)")
    group.add_argument(
        "--checkpoint-every", type=int, help="teacher steps per checkpoint (a multiple of 10)"
    )


# Command-line options that set a config field: field (dotted) -> option.
FLAGS = {
    "data": "--data",
    "mapping": "--mapping",
    "work_dir": "--work-dir",
    "tracking_uri": "--tracking-uri",
    "train.epochs": "--epochs",
    "train.max_steps": "--max-steps",
    "train.student_epochs": "--student-epochs",
    "train.seed": "--seed",
    "train.nproc": "--nproc",
    "train.sharding": "--sharding",
    "train.checkpoint_every": "--checkpoint-every",
}


MLFLOW_STEP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The config fields set on the command line, by dotted name."""
    values = {
        name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()
    }
    return {name: value for name, value in values.items() if value is not None}


def build_config(args: argparse.Namespace) -> PipelineConfig:
    """The run's settings: the config file, or those of the run already in
    ``--work-dir``; then command-line values over them.

    A later step of an existing run (train, quantize, evaluate, register)
    starts from that run's saved settings and lays only the keys the
    ``--config`` file sets over them: the file changes what it names, not
    every setting it leaves out. ``run`` and ``ingest`` start a run afresh
    from the file alone.

    Raises:
        ConfigError: a value is impossible; the message names the option or
            file it came from.
    """
    raw, base, given = {}, "the defaults", {}
    if args.config:
        given = read_structured(args.config, "--config") or {}
        if not isinstance(given, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of settings")
    # The run's folder: the flag's, else the one the file names.
    work_dir = args.work_dir
    if work_dir is None and isinstance(given.get("work_dir"), str):
        work_dir = Path(given["work_dir"])
    saved = work_dir / "config.json" if work_dir else None
    later_step = args.command in STEP_NAMES and args.command != "ingest"
    if saved is not None and saved.is_file() and (later_step or not args.config):
        base = str(saved)
        raw = PipelineConfig.load(saved).model_dump()
    if args.config and raw:
        # Checked with the run's settings, not alone: an interval or a shard
        # count the file names may only fit the run's.
        _overlay(raw, copy.deepcopy(given))
    elif args.config:
        raw = PipelineConfig.from_file(args.config).model_dump(exclude_unset=True)
        base = str(args.config)
    flags = _flag_values(args)
    # A run started again from its saved settings still finds its data as a
    # first one would: EMAREC_DATA set elsewhere is then other data, refused
    # by name, not ignored for the saved path.
    env_data = os.environ.get("EMAREC_DATA")
    data_from_env = (
        args.command in ("ingest", "run")
        and base == str(saved)
        and "data" not in flags
        and bool(env_data)
    )
    if data_from_env:
        raw["data"] = env_data
    raw.setdefault("train", {})
    for name, value in flags.items():
        *parents, key = name.split(".")
        (raw[parents[0]] if parents else raw)[key] = value

    def origin(name: str) -> str:
        if name in flags:
            return FLAGS[name]
        if name == "data" and data_from_env:
            return "EMAREC_DATA"
        *parents, key = name.split(".")
        section = given.get(parents[0]) if parents else given
        named = isinstance(section, dict) and key in section
        return str(args.config) if named else base

    return PipelineConfig.validated(raw, origin).anchored()


def _overlay(raw: dict, given: dict) -> None:
    """Sets in ``raw`` each key ``given`` sets, section by section."""
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value


def cmd_run(args) -> int:
    from pipeline.run import run_pipeline
    from pipeline.summary import print_summary

    config = build_config(args)
    results = run_pipeline(config)
    print_summary(config, results)
    return 0


def cmd_step(args) -> int:
    from pipeline.run import run_step

    config = build_config(args)
    options = {"resume": args.resume} if args.command == "train" else {}
    result = run_step(args.command, config, **options)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_report(args) -> int:
    from pipeline.report import run_report

    result = run_report(build_config(args), seeds=args.seeds)
    print(result["table"])
    for name, value in result["findings"].items():
        print(f"{name}: {value:+.4f}")
    return 0


def cmd_serve(args) -> int:
    from serving.cli import serve
    from serving.config import ServingSettings

    overrides = {"host": args.host, "port": args.port, "model_dir": args.model_dir}
    overrides["tracking_uri"] = args.tracking_uri
    settings = ServingSettings(**{k: v for k, v in overrides.items() if v is not None})
    serve(settings)
    return 0


def cmd_replay(args) -> int:
    from pipeline.replay import replay_test_period

    summary = replay_test_period(args.url, args.data, args.mapping, limit=args.limit, k=args.k)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["errors"] == 0 else 1


def _count(text: str) -> int:
    """``100M``, ``10k``, ``1.5G`` or a plain integer."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
    text = text.strip().lower()
    try:
        if text and text[-1] in scale:
            return int(float(text[:-1]) * scale[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 100M or 5000")


def cmd_plan(args) -> int:
    from pipeline.plan import format_plan, plan_memory

    for flag, value in (("--users", args.users), ("--items", args.items),
                        ("--dim", args.dim), ("--world-size", args.world_size),
                        ("--batch-size", args.batch_size), ("--hbm-gb", args.hbm_gb)):  # fmt: skip
        if value <= 0:
            raise ValueError(f"{flag} must be positive, not {value}")

    if not args.verbose:  # the planner narrates every proposal it tries
        logging.getLogger("torchrec").setLevel(logging.WARNING)

    plan, ranks, dense = plan_memory(
        args.users, args.items, args.dim, args.world_size, args.sharding,
        batch_size=args.batch_size, history=args.history, hbm_gb=args.hbm_gb,
    )  # fmt: skip
    print(format_plan(plan, ranks, dense, args.hbm_gb))
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    return run_demo(build_config(args), port=args.port)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emarec", description="EMA-distillation recommender pipeline"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the whole batch pipeline")
    _pipeline_options(run)
    run.set_defaults(func=cmd_run)
    for name in STEP_NAMES:
        step = commands.add_parser(name, help=f"only the {name} step of a run")
        _pipeline_options(step)
        if name == "train":
            step.add_argument(
                "--resume",
                action="store_true",
                help="continue from the last checkpoint (same --nproc and settings)",
            )
        step.set_defaults(func=cmd_step)

    report = commands.add_parser(
        "report", help="every model and ablation side by side, over seeds"
    )
    _pipeline_options(report)
    report.add_argument("--seeds", type=int, default=3)
    report.set_defaults(func=cmd_report)

    serve = commands.add_parser("serve", help="the REST service (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model-dir", type=Path, help="serve a bundle folder, not MLflow")
    serve.add_argument("--tracking-uri")
    serve.set_defaults(func=cmd_serve)

    replay = commands.add_parser("replay", help="replay the test period against a server")
    replay.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    replay.add_argument("--data", type=Path)
    replay.add_argument("--mapping", type=Path)
    replay.add_argument("--limit", type=int, help="at most N users")
    replay.add_argument("--k", type=int, default=10)
    replay.set_defaults(func=cmd_replay)

    plan = commands.add_parser(
        "plan", help="sharding plan and per-rank memory for sizes past this machine"
    )
    plan.add_argument("--users", type=_count, required=True, help="e.g. 100M")
    plan.add_argument("--items", type=_count, required=True, help="e.g. 10M")
    plan.add_argument("--dim", type=int, default=128)
    plan.add_argument("--world-size", type=int, required=True, help="GPUs in all")
    plan.add_argument(
        "--sharding", default="row_wise", help="row_wise, table_wise, column_wise or auto"
    )
    plan.add_argument("--hbm-gb", type=float, default=80.0, help="memory per GPU, GiB")
    plan.add_argument("--batch-size", type=_count, default=65536, help="global batch")
    plan.add_argument("--history", type=int, default=20, help="history items per example")
    plan.set_defaults(func=cmd_plan)

    demo = commands.add_parser("demo", help="pipeline, server, replay, stop")
    _pipeline_options(demo)
    demo.add_argument("--port", type=int, help="server port (a free one by default)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow's usage telemetry would call out of the machine: off unless asked for.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's HTTP defaults (7 retries with exponential backoff, 120 s
    # timeouts) leave a step against a tracking server that is down silent
    # for many minutes; a few short retries still ride out a blip.
    for name, value in MLFLOW_STEP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # FBGEMM and torch announce every kernel library they load.
    logging.getLogger().handlers[0].addFilter(
        lambda record: record.name != "root" or record.levelno >= logging.WARNING
    )
    # One line per replayed HTTP request drowns the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValidationError as error:  # serving settings from the environment
        print(f"emarec: invalid configuration:\n{error}", file=sys.stderr)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"emarec: {error}", file=sys.stderr)
    except Exception as error:
        from mlflow.exceptions import MlflowException  # imported by the steps

        if not isinstance(error, MlflowException):
            raise
        # A tracking server down or refusing: one line, not five tracebacks.
        first = (str(error.message).strip().splitlines() or ["no message"])[0][:500]
        print(
            f"emarec: MLflow failed: {first}. Check the tracking URI "
            "(--tracking-uri, or MLFLOW_TRACKING_URI) and that its server is up, "
            "then run the command again",
            file=sys.stderr,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
