"""`variational` command line: run, serve, sql, runs, report, models prepare, verifier-report.

Examples:
    variational run tiny                          # configs/tiny.yaml, no Prefect server needed
    variational run configs/full-17k.yaml --set weights.estimator=gml --data-root /scratch/vr
    variational runs                              # runs under ./data and the status of each stage
    variational sql tiny "select source, avg(correct) from verdicts join problems using (prompt_idx) group by 1"
    variational sql tiny -f sql/accuracy_by_source.sql
    variational serve                             # serve variational/{tiny,subset-1k,full-17k} to a Prefect server
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _prefect_env(data_root: str) -> None:
    """Results of cached tasks live in the data root, beside the tables they point to."""
    os.environ.setdefault(
        "PREFECT_LOCAL_STORAGE_PATH", str(Path(data_root).resolve() / ".prefect" / "results")
    )
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; avoids log noise


def cmd_run(args: argparse.Namespace) -> int:
    from variational.config import load_config

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    cfg = load_config(args.config, overrides)  # fail fast, before Prefect starts
    _prefect_env(cfg.data_root)
    from flows.recipe import variational

    result = variational(config=str(args.config), overrides=overrides)
    print(f"run {cfg.name!r} finished; tables under {Path(cfg.data_root) / cfg.name}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _prefect_env(args.data_root or "data")
    from prefect import serve

    from flows.recipe import variational

    deployments = [
        variational.to_deployment(
            name=name,
            parameters={"config": str(REPO / "configs" / f"{name}.yaml"), "overrides": []},
            description=f"The variational recipe with configs/{name}.yaml",
            tags=["variational", name],
        )
        for name in args.names
    ]
    serve(*deployments, limit=args.limit)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from variational.sqlview import run_sql

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
    from variational.sqlview import format_runs, list_runs

    runs = list_runs(args.data_root)
    print(format_runs(runs) if runs else f"no runs under {args.data_root}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from variational.report import write_report

    print(write_report(args.data_root, args.run))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from variational.models import prepare_embedded

    print(prepare_embedded(args.name, force=args.force))
    return 0


def cmd_verifier_report(args: argparse.Namespace) -> int:
    from tasks.verify import format_verifier_report, verifier_report

    data_dir = Path(args.data_dir) if args.data_dir else REPO.parent / "shared" / "data"
    print(format_verifier_report(*verifier_report(data_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="variational", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole flow for a config (no server needed)")
    r.add_argument("config", help="a YAML path or the name of one in configs/ (tiny, subset-1k, full-17k)")
    r.add_argument("--data-root", help="where tables and models go (default: the config's data_root)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. K=4")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="serve the deployments to a Prefect server (prefect server start)")
    s.add_argument("names", nargs="*", default=["tiny", "subset-1k", "full-17k"])
    s.add_argument("--data-root", default=None)
    s.add_argument("--limit", type=int, default=1, help="concurrent flow runs")
    s.set_defaults(func=cmd_serve)

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

    rep = sub.add_parser("report", help="write the markdown + PNG report of a run")
    rep.add_argument("run")
    rep.add_argument("--data-root", default="data")
    rep.set_defaults(func=cmd_report)

    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_models)

    v = sub.add_parser("verifier-report", help="check_answers agreement with the labelled verification pairs")
    v.add_argument("--data-dir", help="folder with verify_pairs_*.jsonl (default: ../shared/data)")
    v.set_defaults(func=cmd_verifier_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from variational.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
