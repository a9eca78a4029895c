"""`variational run`, `serve` and `plan`: start the recipe (here, or as deployments) and price it first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from variational.cli.common import REPO, CliError


def cmd_run(args: argparse.Namespace) -> int:
    from variational.config import load_config
    from variational.pipeline import orchestration

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    conf = load_config(args.config, overrides)  # the one load: fail fast, before Prefect starts
    from variational.pipeline.storage import open_root

    open_root(conf.data_root)  # an unknown URL scheme, a missing package or credentials: one line, now
    orchestration.prefect_env(conf.data_root)
    from variational import shutdown

    shutdown.install()  # SIGTERM / SIGINT: stop at a safe point, end every engine, exit 143 / 130
    # no server configured: our own temporary one, out of reach of the signals sent to our process group
    orchestration.ensure_api()
    from flows.recipe import variational
    from variational.pipeline.console import log_path, run_console

    log_file = log_path(conf.data_root, conf.name)
    print(
        f"run {conf.name!r}: the full log goes to {log_file}"
        + ("" if args.verbose else " (--verbose: here too)")
    )
    try:
        with run_console(log_file, verbose=args.verbose):
            result = orchestration.run_flow(variational, conf.executor, config=conf.model_dump(mode="json"))
    except BaseException as err:
        if shutdown.requested_signal() is None:
            raise
        # whatever surfaced (StopRequested, Prefect's TerminationSignal, an engine that died of the
        # signal too), the run was stopped: its finished stages and shards are on disk for the rerun
        print(
            f"run {conf.name!r} stopped by {shutdown.requested_signal()}; rerun the same command to resume",
            file=sys.stderr,
        )
        return shutdown.exit_code(err)
    from variational.pipeline.runs import run_folder

    print(f"run {conf.name!r} finished; tables under {run_folder(conf.data_root, conf.name)}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from variational.pipeline import orchestration

    orchestration.prefect_env(args.data_root or "data")
    orchestration.check_api(orchestration.api_url())
    from flows.recipe import variational
    from variational.config import load_config

    # every run served reads and writes D (absolute: a flow run may start in another directory), not the
    # config's data_root; a separate parameter, so that a run's `--param overrides=[...]` keeps it
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    deployments = []
    for name in args.names:
        config = REPO / "configs" / f"{name}.yaml"
        deployments.append(
            orchestration.deployment(
                variational,
                load_config(config).executor,
                name=name,
                parameters={"config": str(config), "overrides": [], "data_root": data_root},
                description=f"The variational recipe with configs/{name}.yaml",
            )
        )
    return orchestration.serve(deployments, limit=args.limit)  # SIGTERM: cancel the runs, exit 143


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from flows.recipe import dag
    from variational.analysis.plan import KIND_OF, format_plan, plan
    from variational.analysis.rates import load_rates
    from variational.config import load_config

    overrides = list(args.set or []) + ([f"data_root={args.data_root}"] if args.data_root else [])
    conf = load_config(args.config, overrides)  # the one load; the DAG is traced from this very config
    calls = dag(conf.model_dump(mode="json"))  # the flow owns the stages, rounds and fingerprints
    try:  # a run under the data root, or a calibration file (bench/gpu_check.py writes one)
        rates = load_rates(args.calibrate, conf.data_root, KIND_OF)
    except ValueError as err:
        raise CliError(str(err)) from None
    estimate = plan(conf, calls, gpus=args.gpus, cpus=args.cpus, use_data=not args.no_data, rates=rates)
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_plan(estimate))
    return 0


def add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run the whole flow for a config (no server needed)")
    r.add_argument(
        "config",
        help="a YAML path or the name of one in configs/ (tiny, subset-1k, full-17k, full-17k-official)",
    )
    r.add_argument("--data-root", help="where tables and models go (default: the config's data_root)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. K=4")
    r.add_argument(
        "--verbose", action="store_true", help="print engine and library logs too (always in the log file)"
    )
    r.set_defaults(func=cmd_run)


def add_plan(sub: Any) -> None:
    pl = sub.add_parser("plan", help="estimate a run's work, GPU-hours and wall time before launching it")
    pl.add_argument("config", help="a YAML path or the name of one in configs/")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs of the cluster (H200-class; default 8)")
    pl.add_argument("--cpus", type=int, default=None, help="CPU cores for verification (default 12 per GPU)")
    pl.add_argument("--data-root", help="where an earlier run's problems table may be (default: config's)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. K=4")
    pl.add_argument("--no-data", action="store_true", help="ignore local data: use the paper's counts")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument(
        "--calibrate",
        metavar="RUN|FILE",
        help="take the rates from a finished run under --data-root (its shard stats) or a calibration file",
    )
    pl.set_defaults(func=cmd_plan)


def add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve the deployments to a Prefect server (prefect server start)")
    s.add_argument("names", nargs="*", default=["tiny", "subset-1k", "full-17k", "full-17k-official"])
    s.add_argument(
        "--data-root", default=None, help="where every served run reads and writes (default: each config's)"
    )
    s.add_argument("--limit", type=int, default=1, help="concurrent flow runs")
    s.set_defaults(func=cmd_serve)
