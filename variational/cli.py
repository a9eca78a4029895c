"""`variational` command line: run, serve, sql, runs, report, models prepare, verifier-report.

Examples:
    variational run tiny                          # configs/tiny.yaml, no Prefect server needed
    variational run configs/full-17k.yaml --set weights.estimator=gml --data-root /scratch/vr
    variational runs                              # runs under ./data and the status of each stage
    variational sql tiny "select source, avg(correct) from verdicts join problems using (prompt_idx) group by 1"
    variational sql tiny -f sql/accuracy_by_source.sql
    variational serve                             # serve variational/{tiny,subset-1k,full-17k} to a Prefect server
    variational plan full-17k --gpus 8            # work, GPU-hours and wall time before launching
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class CliError(Exception):
    """A problem the user fixes outside the code (a server down, a missing file); main prints one line."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def cmd_run(args: argparse.Namespace) -> int:
    from variational.config import load_config
    from variational.pipeline import orchestration

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    conf = load_config(args.config, overrides)  # the one load: fail fast, before Prefect starts
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
    print(f"run {conf.name!r} finished; tables under {Path(conf.data_root) / conf.name}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from variational.pipeline import orchestration

    orchestration.prefect_env(args.data_root or "data")
    orchestration.check_api(orchestration.api_url())
    from flows.recipe import variational
    from variational.config import load_config

    deployments = []
    for name in args.names:
        config = REPO / "configs" / f"{name}.yaml"
        deployments.append(
            orchestration.deployment(
                variational,
                load_config(config).executor,
                name=name,
                parameters={"config": str(config), "overrides": []},
                description=f"The variational recipe with configs/{name}.yaml",
            )
        )
    return orchestration.serve(deployments, limit=args.limit)  # SIGTERM: cancel the runs, exit 143


def cmd_sql(args: argparse.Namespace) -> int:
    from variational.analysis.sql import run_sql

    if args.file:
        path = Path(args.file)
        if not path.exists() and (REPO / "sql" / f"{args.file.removesuffix('.sql')}.sql").exists():
            path = REPO / "sql" / f"{args.file.removesuffix('.sql')}.sql"
        query = path.read_text()
    elif args.query:
        query = args.query
    else:
        print(
            "give a QUERY or -f FILE; saved analyses:",
            ", ".join(p.stem for p in sorted((REPO / "sql").glob("*.sql"))),
        )
        return 2
    df = run_sql(args.data_root, args.run, query)
    import polars as pl

    with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
        print(df)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from variational.analysis.sql import format_runs, list_runs

    runs = list_runs(args.data_root)
    print(format_runs(runs) if runs else f"no runs under {args.data_root}")
    return 0


def cmd_verify_store(args: argparse.Namespace) -> int:
    """Hash-check every file of a run against its manifests; set aside what is damaged (exit 1)."""
    from variational.pipeline.store import verify_run

    results = verify_run(args.data_root, args.run, set_aside=not args.dry_run)
    for stage, round_, bad in results:
        print(f"{stage:<18} round {round_}: " + ("ok" if not bad else "DAMAGED: " + "; ".join(bad)))
    damaged = sum(1 for *_, bad in results if bad)
    if damaged:
        verb = "would be set aside" if args.dry_run else "were set aside"
        print(f"{damaged} stage(s) damaged; their files {verb}: rerun the flow to recompute them")
    return 1 if damaged else 0


def cmd_report(args: argparse.Namespace) -> int:
    from variational.analysis.report import write_report

    print(write_report(args.data_root, args.run))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from variational.engines.models import prepare_embedded

    print(prepare_embedded(args.name, force=args.force))
    return 0


def cmd_verifier_report(args: argparse.Namespace) -> int:
    from variational.verifiers.labelled import LABELLED_SETS, format_verifier_report, verifier_report

    data_dir = Path(args.data_dir) if args.data_dir else REPO.parent / "shared" / "data"
    sets = [s.strip() for s in args.sets.split(",")] if args.sets else list(LABELLED_SETS)
    if unknown := [s for s in sets if s not in LABELLED_SETS]:
        raise CliError(f"verifier-report: unknown --sets {unknown}; choose from {','.join(LABELLED_SETS)}")
    report = verifier_report(data_dir, args.timeout_s, sets=sets, ablate=args.ablate)
    print(format_verifier_report(*report))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Ingest's validation alone: exit 0 when every row is usable, 1 when some are rejected."""
    import json

    from tasks.ingest import check_dataset

    try:
        check = check_dataset(args.dataset, args.split, args.max_row_bytes)
    except (OSError, ValueError) as err:  # no such file / hub dataset, unreadable JSON array
        print(f"error: cannot read {args.dataset!r}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(check.as_json(), ensure_ascii=False))
    else:
        print(
            f"{args.dataset}: {check.rows} rows, {check.accepted} accepted, {check.rejects.height} rejected"
        )
        for r in check.rejects.iter_rows(named=True):
            print(f"  row {r['row_index']} ({r['file']}, row {r['file_row']}): {r['reason']}")
    return 1 if check.rejects.height else 0


class IntermixedParser(argparse.ArgumentParser):
    """Options before, between or after positionals (`sql RUN --data-root D "query"`): argparse's default
    stops filling positionals at the first option and then calls the query an unrecognized argument.
    A parser with sub-commands parses the default way (argparse cannot intermix those)."""

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if self._intermixing or has_subcommands:  # parse_known_intermixed_args calls us back
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


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


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run the whole flow for a config (no server needed)")
    r.add_argument("config", help="a YAML path or the name of one in configs/ (tiny, subset-1k, full-17k)")
    r.add_argument("--data-root", help="where tables and models go (default: the config's data_root)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. K=4")
    r.add_argument(
        "--verbose", action="store_true", help="print engine and library logs too (always in the log file)"
    )
    r.set_defaults(func=cmd_run)


def _add_plan(sub: Any) -> None:
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


def _add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve the deployments to a Prefect server (prefect server start)")
    s.add_argument("names", nargs="*", default=["tiny", "subset-1k", "full-17k"])
    s.add_argument("--data-root", default=None)
    s.add_argument("--limit", type=int, default=1, help="concurrent flow runs")
    s.set_defaults(func=cmd_serve)


def _add_store_commands(sub: Any) -> None:
    """sql, runs, verify-store, report: read a finished data root."""
    q = sub.add_parser("sql", help="DuckDB SQL over a run's tables (one view per stage)")
    q.add_argument("run")
    q.add_argument("query", nargs="?")
    q.add_argument("-f", "--file", help="a .sql file, or the name of a saved analysis in sql/")
    q.add_argument("--data-root", default="data")
    q.add_argument("--max-rows", type=int, default=50)
    q.set_defaults(func=cmd_sql)

    ls = sub.add_parser("runs", help="list runs and their stage status")
    ls.add_argument("--data-root", default="data")
    ls.set_defaults(func=cmd_runs)

    vs = sub.add_parser("verify-store", help="hash-check a run's files; set aside damaged shards")
    vs.add_argument("run")
    vs.add_argument("--data-root", default="data")
    vs.add_argument("--dry-run", action="store_true", help="only report, move nothing")
    vs.set_defaults(func=cmd_verify_store)

    rep = sub.add_parser("report", help="write the markdown + PNG report of a run")
    rep.add_argument("run")
    rep.add_argument("--data-root", default="data")
    rep.set_defaults(func=cmd_report)


def _add_models(sub: Any) -> None:
    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_models)


def _add_verifier_report(sub: Any) -> None:
    v = sub.add_parser("verifier-report", help="plain math-verify and check_answers against labelled pairs")
    v.add_argument("--data-dir", help="folder with verify_pairs_*.jsonl (default: ../shared/data)")
    v.add_argument("--sets", help="comma-separated names (default: all); see LABELLED_SETS")
    v.add_argument("--timeout-s", type=float, default=5.0, help="per-row deadline, as verify.timeout_s")
    v.add_argument("--ablate", action="store_true", help="also run ours with each rule switched off in turn")
    v.set_defaults(func=cmd_verifier_report)


def _add_data(sub: Any) -> None:
    d = sub.add_parser("data", help="check a dataset before a run")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser(
        "check", help="ingest's row validation alone: counts and every reject's row and reason"
    )
    dc.add_argument(
        "dataset", metavar="PATH|HUB_ID", help="a .jsonl/.parquet file or folder, embedded:<name>, a hub id"
    )
    dc.add_argument("--split", default="train")
    dc.add_argument(
        "--max-row-bytes", type=int, default=1 << 20, help="reject larger rows (data.max_row_bytes)"
    )
    dc.add_argument(
        "--json", action="store_true", help='print {"rows", "accepted", "rejected": [{"index", "reason"}]}'
    )
    dc.set_defaults(func=cmd_data_check)


COMMANDS = (
    _add_run,
    _add_plan,
    _add_serve,
    _add_store_commands,
    _add_models,
    _add_verifier_report,
    _add_data,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="variational", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; the errors a user causes or fixes print one line (no traceback) and set the exit
    code: 2 for a bad config, a missing run or file, an unreachable server; 1 for SQL that fails; 3 when
    another run is computing a stage or a damaged file was set aside (rerun)."""
    args = build_parser().parse_args(argv)
    import duckdb

    from variational.analysis.sql import SqlError
    from variational.config import ConfigError
    from variational.pipeline.orchestration import ServerUnreachable
    from variational.pipeline.store import DamagedStage, StageLocked

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        return _fail(err, 2)
    except (StageLocked, DamagedStage) as err:  # another run holds a stage; a file was set aside
        return _fail(err, 3)
    except CliError as err:
        return _fail(err, err.exit_code)
    except ServerUnreachable as err:
        return _fail(err, 2)
    except (SqlError, duckdb.Error) as err:
        return _fail(err, 1)


def _fail(err: Exception, exit_code: int) -> int:
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
