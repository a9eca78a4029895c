"""The commands about data and models: `data check`, `verifier-report` and `models prepare`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from variational.cli.common import REPO, CliError


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


def add_models(sub: Any) -> None:
    m = sub.add_parser("models", help="manage models")
    msub = m.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert the embedded GGUF model to a cached safetensors folder")
    prep.add_argument("name", nargs="?", default="smollm2-135m")
    prep.add_argument("--force", action="store_true")
    prep.set_defaults(func=cmd_models)


def add_verifier_report(sub: Any) -> None:
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


def add_data(sub: Any) -> None:
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
