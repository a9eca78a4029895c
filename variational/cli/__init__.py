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
from typing import Any

from variational.cli.common import REPO, CliError
from variational.cli.data import add_data, add_models, add_verifier_report
from variational.cli.run import add_plan, add_run, add_serve
from variational.cli.store import add_export, add_show, add_store_commands

__all__ = ["REPO", "CliError", "build_parser", "main"]


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


COMMANDS = (
    add_run,
    add_plan,
    add_serve,
    add_store_commands,
    add_models,
    add_verifier_report,
    add_data,
    add_export,
    add_show,
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
