"""The commands that read a data root: `sql`, `runs`, `verify-store`, `report`, `show` and `export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from variational.cli.common import REPO, CliError, positive


def cmd_sql(args: argparse.Namespace) -> int:
    from variational.analysis.sql import parse_memory, run_sql

    if args.file:
        path = Path(args.file)
        if not path.exists() and (REPO / "sql" / f"{args.file.removesuffix('.sql')}.sql").exists():
            path = REPO / "sql" / f"{args.file.removesuffix('.sql')}.sql"
        try:
            query = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:  # missing, a folder, no permission, not text
            why = getattr(err, "strerror", None) or "not UTF-8 text"
            raise CliError(f"sql -f {args.file}: cannot read {str(path)!r}: {why}") from None
    elif args.query:
        query = args.query
    else:
        print(
            "give a QUERY or -f FILE; saved analyses:",
            ", ".join(p.stem for p in sorted((REPO / "sql").glob("*.sql"))),
        )
        return 2
    limits = {"memory": parse_memory(args.memory)} if args.memory else {}
    limits |= {"timeout_s": args.timeout} if args.timeout else {}  # the defaults are sql.py's
    df = run_sql(args.data_root, args.run, query, args.max_rows, **limits)
    import polars as pl

    with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
        print(df.head(args.max_rows))
    if df.height > args.max_rows:  # run_sql computed max_rows + 1 rows: there is more
        print(f"(the first {args.max_rows} rows; the result has more: raise --max-rows or narrow the query)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from variational.analysis.sql import format_runs, list_runs

    runs = list_runs(args.data_root)
    print(format_runs(runs) if runs else f"no runs under {args.data_root}")
    damaged = [s["problem"] for _, stages in runs for s in stages if s["stage"] == "run.json"]
    for problem in damaged:  # the other runs are listed; the damaged run.json is named, exit 2
        print(f"error: {problem}", file=sys.stderr)
    return 2 if damaged else 0


def cmd_verify_store(args: argparse.Namespace) -> int:
    """Hash-check every file of a run against its manifests; set aside what is damaged (exit 1). A stage
    whose manifest or record points outside its folder is named and left alone (nothing read or moved)."""
    from variational.pipeline.runs import verify_run

    results = verify_run(args.data_root, args.run, set_aside=not args.dry_run)
    for stage, round_, bad, _ in results:
        print(f"{stage:<18} round {round_}: " + ("ok" if not bad else "DAMAGED: " + "; ".join(bad)))
    damaged = sum(1 for _, _, bad, refused in results if bad and not refused)
    refused = sum(1 for *_, refused in results if refused)
    if damaged:
        verb = "would be set aside" if args.dry_run else "were set aside"
        print(f"{damaged} stage(s) damaged; their files {verb}: rerun the flow to recompute them")
    if refused:
        print(
            f"{refused} stage(s) refused (nothing read or moved): delete the folders named above, then rerun"
        )
    return 1 if damaged or refused else 0


def cmd_report(args: argparse.Namespace) -> int:
    from variational.analysis.report import write_report

    print(write_report(args.data_root, args.run, args.out))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One question of a run end to end (variational/analysis/show.py)."""
    import json

    from variational.analysis.show import ShowError, format_view, show_question

    try:
        view = show_question(args.data_root, args.run, args.prompt_idx, args.round)
    except ShowError as err:
        raise CliError(str(err), 2) from None
    print(json.dumps(view, ensure_ascii=False, indent=1) if args.json else format_view(view, args.run))
    return 0


def dag_steps(data_root: str, run: str) -> list | None:
    """The flow's DAG for the run's recorded config, as the export's lineage reads it (only the CLI may
    import flows); None, with a note, when it cannot be traced (a config of an older release, a moved file)."""
    import json

    from variational.analysis.export import Step
    from variational.pipeline.runs import run_json

    path = run_json(data_root, run)
    if not path.is_file():
        return None  # the export names the missing run
    try:
        from flows.recipe import dag

        calls = dag(json.loads(path.read_text())["config"])
    # whatever the trace hit (an old config, a moved data file), the export goes on: the card then lists
    # every stage the run recorded
    except Exception as err:
        reason = " ".join(str(err).split())[:200]
        print(
            f"note: the DAG of run {run!r} could not be traced ({type(err).__name__}: {reason})",
            file=sys.stderr,
        )
        return None
    return [
        Step(c.stage.name, c.round, c.fingerprint, tuple(c.inputs.values()), c.stage.fields, c.stage.uses)
        for c in calls
    ]


def cmd_export(args: argparse.Namespace) -> int:
    """A finished stage -> a folder `datasets` / transformers load, with its card; optionally pushed."""
    from variational.analysis.export import ExportError, Request, export, hub_token, push

    if args.private and not args.push:
        raise CliError("--private needs --push REPO_ID")
    try:
        if args.push:
            hub_token(args.push)  # before the work: a push that cannot happen stops here
        req = Request(Path(args.data_root), args.run, args.stage, args.round, args.format)
        req.steps = dag_steps(args.data_root, args.run)
        done = export(req, Path(args.out), log=print)
    except ExportError as err:
        raise CliError(str(err)) from None
    print(f"wrote {done.rows} rows to {done.path}: {', '.join(done.files)}")
    if done.left_out:
        print(f"{done.left_out} train row(s) left out: this format cannot carry them (README.md lists them)")
    if args.push:
        try:
            url = push(done.path, args.push, done.repo_type, private=args.private)
        except ExportError as err:
            raise CliError(str(err)) from None
        print(f"pushed to {url}")
    return 0


def add_store_commands(sub: Any) -> None:
    """sql, runs, verify-store, report: read a finished data root."""
    q = sub.add_parser("sql", help="DuckDB SQL over a run's tables (one view per stage)")
    q.add_argument("run")
    q.add_argument("query", nargs="?")
    q.add_argument("-f", "--file", help="a .sql file, or the name of a saved analysis in sql/")
    q.add_argument("--data-root", default="data")
    q.add_argument(
        "--max-rows", type=positive(int), default=50, help="rows to print (only those are computed)"
    )
    q.add_argument(
        "--timeout", type=positive(float), help="seconds before the query is stopped (default 300)"
    )
    q.add_argument(
        "--memory", help="DuckDB's memory limit, e.g. 4GB or 512MiB (default: a quarter of the RAM)"
    )
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
    rep.add_argument(
        "--out", help="folder for report.md and the PNGs (default: DATA_ROOT/RUN/report when writable)"
    )
    rep.set_defaults(func=cmd_report)


def add_export(sub: Any) -> None:
    from variational.analysis.formats import FORMATS
    from variational.registry import STAGES

    e = sub.add_parser("export", help="a finished stage -> a Hub-ready folder (Parquet or model + card)")
    e.add_argument("run")
    e.add_argument("--out", required=True, help="the folder to write (absent or empty)")
    e.add_argument(
        "--stage",
        default="train",
        choices=[s for s in STAGES if s != "base_model"],
        help="train (default), another table (exported as stored), or pi_theta0 / q_phi / pi_theta (a model)",
    )
    e.add_argument(
        "--format", choices=FORMATS, help="train only: messages (default), bespoke, prompt_completion"
    )
    e.add_argument("--round", type=int, help="the EM round (default: the stage's latest)")
    e.add_argument(
        "--push", metavar="REPO_ID", help="then upload the folder to this Hub repo (HF_TOKEN or login)"
    )
    e.add_argument("--private", action="store_true", help="create the Hub repo private")
    e.add_argument("--data-root", default="data")
    e.set_defaults(func=cmd_export)


def add_show(sub: Any) -> None:
    s = sub.add_parser("show", help="one question of a run end to end: traces, weights, rollouts, train rows")
    s.add_argument("run")
    s.add_argument("prompt_idx", type=int)
    s.add_argument("--round", type=int, default=None, help="EM round (default: the last)")
    s.add_argument("--json", action="store_true", help="print the view as JSON")
    s.add_argument("--data-root", default="data")
    s.set_defaults(func=cmd_show)
