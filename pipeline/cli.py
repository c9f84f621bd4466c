"""The ``emarec`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import PipelineConfig

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
}


def _flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The config fields set on the command line, by dotted name."""
    values = {
        name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()
    }
    return {name: value for name, value in values.items() if value is not None}


def build_config(args: argparse.Namespace) -> PipelineConfig:
    """The config file (if any), then command-line values over it.

    Raises:
        ConfigError: a value is impossible; the message names the option or
            file it came from.
    """
    raw, base = {}, "the defaults"
    if args.config:
        raw = PipelineConfig.from_file(args.config).model_dump(exclude_unset=True)
        base = str(args.config)
    elif args.work_dir and (args.work_dir / "config.json").is_file():
        # A later step of an existing run: reuse that run's settings.
        base = str(args.work_dir / "config.json")
        raw = PipelineConfig.load(args.work_dir / "config.json").model_dump()
    flags = _flag_values(args)
    raw.setdefault("train", {})
    for name, value in flags.items():
        *parents, key = name.split(".")
        (raw[parents[0]] if parents else raw)[key] = value
    return PipelineConfig.validated(
        raw, lambda name: FLAGS[name] if name in flags else base
    )


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
    result = run_step(args.command, config)
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

    demo = commands.add_parser("demo", help="pipeline, server, replay, stop")
    _pipeline_options(demo)
    demo.add_argument("--port", type=int, help="server port (a free one by default)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow's usage telemetry would call out of the machine: off unless asked for.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
