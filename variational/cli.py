"""`variational` command line: run, serve, sql, runs, report, show, export, models prepare, verifier-report,
data check.

Examples:
    variational run tiny                          # configs/tiny.yaml, no Prefect server needed
    variational run configs/full-17k.yaml --set weights.estimator=gml --data-root /scratch/vr
    variational runs                              # runs under ./data and the status of each stage
    variational sql tiny "select source, avg(correct) from verdicts join problems using (prompt_idx) group by 1"
    variational sql tiny -f sql/accuracy_by_source.sql
    variational serve                             # serve variational/{tiny,subset-1k,full-17k,full-17k-official}
    variational plan full-17k --gpus 8            # work, GPU-hours and wall time before launching
    variational export tiny --out out/tiny-train  # the train table as a Hub dataset folder (+ --push REPO_ID)
    variational show tiny 3                       # one question: its traces, weights, rollouts, train rows
    variational data check my.jsonl --json        # rejected rows and rows that overlap a benchmark
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
    from variational.pipeline.storage import open_root

    open_root(conf.data_root)  # an unknown URL scheme, a missing package or credentials: one line, now
    orchestration.prefect_env(conf.data_root)
    from variational import shutdown

    shutdown.install()  # SIGTERM / SIGINT: stop at a safe point, end every engine, exit 143 / 130
    # no server configured: our own temporary one, out of reach of the signals sent to our process group
    orchestration.ensure_api()
    from flows.recipe import variational

    try:
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
    if args.ablate and args.grader == "official":
        raise CliError(
            "verifier-report: --ablate switches off rules of the strict grader; use --grader strict|both"
        )
    report = verifier_report(data_dir, args.timeout_s, sets=sets, ablate=args.ablate, grader=args.grader)
    print(format_verifier_report(*report))
    return 0


def _contaminated(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The dataset's rows that overlap a benchmark problem (tasks/decontaminate.py, the same rule as a run):
    against the shipped sets (`--against`, default all) and, with `--config`, that run's eval benchmarks.
    The rows are ingested again (tasks/ingest.py keeps `check_dataset` to counts and rejects)."""
    from tasks.decontaminate import training_texts
    from tasks.ingest import ingest, load_raw
    from variational import registry
    from variational.config import DecontaminationConfig, load_config
    from variational.data import decontamination as dc

    conf, benchmarks = DecontaminationConfig(), {}
    if args.config:
        run_conf = load_config(args.config)
        conf, benchmarks = run_conf.data.decontamination, run_conf.eval.benchmarks
    if args.against is not None:
        names = [] if args.against == "none" else [s.strip() for s in args.against.split(",") if s.strip()]
        if unknown := sorted(set(names) - set(registry.REFERENCE_SETS)):
            raise CliError(
                f"data check: unknown --against {unknown}; choose from {','.join(registry.REFERENCE_SETS)}"
            )
        conf = conf.model_copy(update={"against": names})
    problems, _ = ingest(load_raw(args.dataset, args.split, args.max_row_bytes))
    references = dc.reference_problems(dc.reference_specs(list(conf.against), benchmarks))
    found = dc.find_contamination(training_texts(problems), references, conf.ngrams, conf.min_overlap)
    return [
        {"index": r["prompt_idx"], "benchmark": r["benchmark"], "problem": r["problem_id"],
         "overlap": round(r["overlap"], 4), "field": r["field"], "n": r["n"], "ngram": r["ngram"]}
        for r in found.iter_rows(named=True)
    ]  # fmt: skip


def cmd_data_check(args: argparse.Namespace) -> int:
    """Ingest's validation, then the benchmark overlaps: exit 0 when every row is usable and none overlaps a
    benchmark problem, 1 when some row is rejected or contaminated."""
    import json

    from tasks.ingest import check_dataset

    try:
        check = check_dataset(args.dataset, args.split, args.max_row_bytes)
    except (OSError, ValueError) as err:  # no such file / hub dataset, unreadable JSON array
        print(f"error: cannot read {args.dataset!r}: {err}", file=sys.stderr)
        return 2
    try:
        contaminated = _contaminated(args)
    except ValueError as err:  # a benchmark that cannot be loaded (hub offline, gated): one line naming it
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps(check.as_json() | {"contaminated": contaminated}, ensure_ascii=False))
    else:
        print(
            f"{args.dataset}: {check.rows} rows, {check.accepted} accepted, {check.rejects.height} rejected, "
            f"{len({c['index'] for c in contaminated})} contaminated"
        )
        for r in check.rejects.iter_rows(named=True):
            print(f"  row {r['row_index']} ({r['file']}, row {r['file_row']}): {r['reason']}")
        for c in contaminated:
            print(
                f"  row {c['index']}: {c['field']} overlaps {c['benchmark']} {c['problem']} "
                f'({c["n"]}-gram share {c["overlap"]:.2f}): "{c["ngram"][:60]}"'
            )
    return 1 if check.rejects.height or contaminated else 0


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


def _dag_steps(data_root: str, run: str) -> list | None:
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
        req.steps = _dag_steps(args.data_root, args.run)
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
    from variational.analysis.plan import format_plan, plan
    from variational.config import load_config

    overrides = list(args.set or []) + ([f"data_root={args.data_root}"] if args.data_root else [])
    conf = load_config(args.config, overrides)  # the one load; the DAG is traced from this very config
    calls = dag(conf.model_dump(mode="json"))  # the flow owns the stages, rounds and fingerprints
    estimate = plan(conf, calls, gpus=args.gpus, cpus=args.cpus, use_data=not args.no_data)
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_plan(estimate))
    return 0


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run the whole flow for a config (no server needed)")
    r.add_argument(
        "config",
        help="a YAML path or the name of one in configs/ (tiny, subset-1k, full-17k, full-17k-official)",
    )
    r.add_argument("--data-root", help="where tables and models go (default: the config's data_root)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. K=4")
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
    pl.set_defaults(func=cmd_plan)


def _add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="serve the deployments to a Prefect server (prefect server start)")
    s.add_argument("names", nargs="*", default=["tiny", "subset-1k", "full-17k", "full-17k-official"])
    s.add_argument(
        "--data-root", default=None, help="where every served run reads and writes (default: each config's)"
    )
    s.add_argument("--limit", type=int, default=1, help="concurrent flow runs")
    s.set_defaults(func=cmd_serve)


def _positive(kind: type) -> Any:
    """An argparse type: a number of `kind` above 0 (argparse prints the one-line usage error otherwise)."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:  # `not >`: nan too
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"  # argparse names the type in its error
    return parse


def _add_store_commands(sub: Any) -> None:
    """sql, runs, verify-store, report: read a finished data root."""
    q = sub.add_parser("sql", help="DuckDB SQL over a run's tables (one view per stage)")
    q.add_argument("run")
    q.add_argument("query", nargs="?")
    q.add_argument("-f", "--file", help="a .sql file, or the name of a saved analysis in sql/")
    q.add_argument("--data-root", default="data")
    q.add_argument(
        "--max-rows", type=_positive(int), default=50, help="rows to print (only those are computed)"
    )
    q.add_argument(
        "--timeout", type=_positive(float), help="seconds before the query is stopped (default 300)"
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


def _add_models(sub: Any) -> None:
    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_models)


def _add_verifier_report(sub: Any) -> None:
    from variational.registry import GRADERS

    v = sub.add_parser("verifier-report", help="the math graders (strict, official) against labelled pairs")
    v.add_argument("--data-dir", help="folder with verify_pairs_*.jsonl (default: ../shared/data)")
    v.add_argument("--sets", help="comma-separated names (default: all); see LABELLED_SETS")
    v.add_argument("--timeout-s", type=float, default=5.0, help="per-row deadline, as verify.timeout_s")
    v.add_argument("--ablate", action="store_true", help="also run ours with each rule switched off in turn")
    v.add_argument(
        "--grader",
        choices=(*GRADERS, "both"),
        default="both",
        help="strict: plain math-verify and ours; official: the official harness's grader; both (default)",
    )
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
        "--json",
        action="store_true",
        help='print {"rows", "accepted", "rejected": [{"index", "reason"}], "contaminated": [{"index", '
        '"benchmark", "problem", "overlap"}]}',
    )
    dc.add_argument(
        "--against", help="comma list of shipped benchmark sets to check (default: all; none: skip them)"
    )
    dc.add_argument("--config", help="also check that run config's eval benchmarks, with its settings")
    dc.set_defaults(func=cmd_data_check)


def _add_export(sub: Any) -> None:
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


def _add_show(sub: Any) -> None:
    s = sub.add_parser("show", help="one question of a run end to end: traces, weights, rollouts, train rows")
    s.add_argument("run")
    s.add_argument("prompt_idx", type=int)
    s.add_argument("--round", type=int, default=None, help="EM round (default: the last)")
    s.add_argument("--json", action="store_true", help="print the view as JSON")
    s.add_argument("--data-root", default="data")
    s.set_defaults(func=cmd_show)


COMMANDS = (
    _add_run,
    _add_plan,
    _add_serve,
    _add_store_commands,
    _add_models,
    _add_verifier_report,
    _add_data,
    _add_export,
    _add_show,
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
    code: 2 for a bad config, a missing run or file, a damaged run.json or manifest, a path the store refuses,
    a read-only root that must be written, an unreachable server; 1 for SQL that fails; 3 when another run
    is computing a stage or a damaged file was set aside (rerun); 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run handles SIGINT itself: variational/shutdown.py)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    import duckdb

    from variational.analysis.sql import SqlError
    from variational.config import ConfigError
    from variational.pipeline.orchestration import ServerUnreachable
    from variational.pipeline.store import DamagedStage, StageLocked, StoreError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, StoreError) as err:  # StoreError: a damaged or unsafe record
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
