"""variational/analysis/sql.py + sql/*.sql over a real ingested run (the embedded mini set) and small literal
downstream tables written through the store, as the stages write them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tasks.ingest import ingest, load_raw
from variational.analysis import sql as sqlview
from variational.pipeline.runs import record_stage, run_stages
from variational.pipeline.store import StageStore

RUN = "sqltest"


def write_stage(root: Path, stage: str, df: pl.DataFrame, round_: int = 1, fp: str | None = None) -> dict:
    store = StageStore(root, RUN, stage, fp or f"{stage}-r{round_}")
    store.write_shard(0, df)
    manifest = store.finish(round_=round_)
    record_stage(root, RUN, manifest, computed=True)
    return manifest


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run holding `problems` from the real ingest of the embedded set; other tables are added per test."""
    root = tmp_path_factory.mktemp("data")
    problems, _rejects = ingest(load_raw("embedded:mini_stratos"))
    write_stage(root, "ingest", problems)
    return root


@pytest.fixture
def full_run(root: Path, tmp_path: Path) -> Path:
    """A copy of the ingested run plus posterior_samples, verdicts and weights for prompts 0 and 1."""
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    problems = sqlview.run_sql(dst, RUN, "SELECT prompt_idx, gold FROM problems WHERE prompt_idx < 2")
    g0, g1 = problems["gold"][0][0], problems["gold"][1][0]  # "16" (arith/0) and "71" (a gsm8k item)
    write_stage(
        dst,
        "posterior_samples",
        pl.DataFrame(
            {
                "prompt_idx": [0, 0, 1, 1],
                "sample_idx": [0, 1, 0, 1],
                "think": [
                    f"The answer is {g0}. Now let me justify it with a long explanation of the steps.",  # early
                    f"Adding the two counts step by step and checking the sum gives {g0}.",  # late
                    f"There are {g1}6 stickers in a box, so we need to take some away and count again.",  # no token
                    "",
                ],
            }
        ),
    )
    write_stage(
        dst,
        "verdicts",
        pl.DataFrame(
            {
                "prompt_idx": [0, 0, 0, 0, 1, 1],
                "sample_idx": [0, 0, 1, 1, 0, 0],
                "rollout_idx": [0, 1, 0, 1, 0, 1],
                "correct": [True, True, True, False, False, False],
                "status": ["ok", "ok", "ok", "wrong", "no_answer", "wrong"],
            }
        ),
    )
    write_stage(
        dst,
        "weights",
        pl.DataFrame(
            {
                "prompt_idx": [0, 0, 1, 1],
                "sample_idx": [0, 1, 0, 1],
                "estimator": ["acc"] * 4,
                "eligible": [True, True, False, False],
                "log_rho": [-0.1, -0.9, None, None],
                "rho_tilde": [0.75, 0.25, None, None],
                "selected": [True, False, False, False],
            }
        ),
    )
    return dst


def test_problems_view_counts_the_ingested_rows(root: Path) -> None:
    manifest = run_stages(root, RUN)["ingest"]["1"]
    df = sqlview.run_sql(root, RUN, "SELECT count(*) AS n, count(DISTINCT prompt_idx) AS k FROM problems")
    assert df.row(0) == (manifest["rows"], manifest["rows"]) and manifest["rows"] >= 64  # no reject rows
    by_source = sqlview.run_sql(
        root, RUN, "SELECT split_part(source, '/', 1) AS s, count(*) AS n FROM problems GROUP BY 1 ORDER BY 1"
    )
    assert by_source["s"].to_list() == ["arith", "gsm8k", "ruc"]


def test_saved_queries_that_need_absent_tables_fail_clearly_and_the_rest_run(root: Path) -> None:
    rows = sqlview.run_sql(root, RUN, "per_stage_rows")
    assert rows.select("stage", "table_name", "status", "manifest_rows", "parquet_rows").row(0) == (
        "ingest",
        "problems",
        "complete",
        66,
        66,
    )
    with pytest.raises(
        ValueError, match="(?s)verdicts.*has the tables \\['problems', 'run_stages', 'shard_stats'\\]"
    ):
        sqlview.run_sql(root, RUN, "accuracy_by_source")


def test_accuracy_by_source(full_run: Path) -> None:
    df = sqlview.run_sql(full_run, RUN, "accuracy_by_source")
    cols = [
        "source",
        "kind",
        "problems",
        "traces",
        "rollouts",
        "accuracy",
        "traces_any_correct",
        "no_answer_rate",
    ]
    assert df.select(cols).rows() == [
        ("arith", "math", 1, 2, 4, 0.75, 1.0, 0.0),
        ("gsm8k", "math", 1, 1, 2, 0.0, 0.0, 0.5),
    ]


def test_weight_distribution(full_run: Path) -> None:
    df = sqlview.run_sql(full_run, RUN, "sql/weight_distribution.sql")
    q0, q1 = df.to_dicts()
    assert (q0["n_eligible"], q0["max_rho_tilde"], q0["selected_sample"]) == (2, 0.75, 0)
    assert q0["effective_sample_size"] == pytest.approx(1 / (0.75**2 + 0.25**2), abs=1e-3)
    assert (q1["n_eligible"], q1["effective_sample_size"], q1["selected_sample"]) == (0, None, None)


def test_hint_leakage_finds_only_the_early_whole_token_answer(full_run: Path) -> None:
    df = sqlview.run_sql(full_run, RUN, "hint_leakage")
    assert df.select("prompt_idx", "sample_idx").rows() == [(0, 0)]
    assert df["leaked"][0].to_list() == ["16"] and df["first_hit_frac"][0] < 0.25
    assert df["traces_with_gold"][0] == 3  # the empty think is not a trace


def test_rounds_are_unioned_with_a_round_column(full_run: Path) -> None:
    frame = pl.DataFrame({"prompt_idx": [0], "sample_idx": [0], "think": ["x"]})
    write_stage(full_run, "posterior_samples", frame, round_=2)
    df = sqlview.run_sql(
        full_run, RUN, "SELECT round, count(*) AS n FROM posterior_samples GROUP BY round ORDER BY round"
    )
    assert df.rows() == [(1, 4), (2, 1)]


def test_stage_names_map_to_table_views(full_run: Path) -> None:
    write_stage(full_run, "evaluate", pl.DataFrame({"benchmark": ["amc23"], "correct": [True]}))
    assert sqlview.run_sql(full_run, RUN, "SELECT count(*) FROM eval").item() == 1


def test_moved_data_root_still_opens(full_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.move(full_run, moved)  # run.json keeps the old absolute paths
    assert sqlview.run_sql(moved, RUN, "SELECT count(*) FROM weights").item() == 4


def test_list_runs_reports_status_and_rows(full_run: Path) -> None:
    (full_run / RUN / "logps" / "deadbeef").mkdir(parents=True)  # a stage that crashed before finishing
    [(run, stages)] = sqlview.list_runs(full_run)
    status = {(s["stage"], s["status"]) for s in stages}
    assert run == RUN
    assert {("ingest", "complete"), ("verdicts", "complete"), ("logps", "incomplete (0 shards)")} <= status
    text = sqlview.format_runs([(run, stages)])
    assert "ingest" in text and "66 rows" in text


def test_resolve_query_and_saved_queries(tmp_path: Path) -> None:
    saved = sqlview.saved_queries()
    assert {"accuracy_by_source", "weight_distribution", "hint_leakage", "per_stage_rows"} <= set(saved)
    assert all(desc for desc in saved.values()), (
        "every saved query starts with a comment saying what it answers"
    )
    assert sqlview.resolve_query("SELECT 1") == "SELECT 1"
    assert sqlview.resolve_query("hint_leakage").startswith("-- Hint leakage")
    f = tmp_path / "mine.sql"
    f.write_text("SELECT 2")
    assert sqlview.resolve_query(str(f)) == "SELECT 2"
    with pytest.raises(FileNotFoundError, match="saved queries"):
        sqlview.resolve_query("nope.sql")


# ---------------------------------------------------------------- read-only: every attack of issue 11 item 6
@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_stage(root, "verify", pl.DataFrame({"prompt_idx": [0, 1], "correct": [True, False]}))
    return root


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("attack", "refusal"),
    [
        ("COPY (SELECT 1 AS prompt_idx) TO '{stage}/part-00001.parquet'", "COPY statements are refused"),
        ("COPY verdicts TO '{stage}/../../stolen.csv'", "COPY statements are refused"),
        ("SELECT 1; COPY verdicts TO '{stage}/x.parquet'", "COPY statements are refused"),
        ("ATTACH '{stage}/evil.db' AS evil", "ATTACH statements are refused"),
        ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
        ("EXPORT DATABASE '{stage}/dump'", "EXPORT statements are refused"),
        ("INSTALL httpfs", "LOAD statements are refused"),
        ("LOAD httpfs", "LOAD statements are refused"),
        ("SET enable_external_access = true", "SET statements are refused"),
        ("EXPLAIN ANALYZE COPY verdicts TO '{stage}/x.csv'", "EXPLAIN statements are refused"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
        ("SELECT * FROM read_text('{stage}/../../../../../../etc/hostname')", "Permission Error"),
        ("SELECT * FROM glob('/*')", "Permission Error"),
        ("SELECT * FROM query('COPY verdicts TO ''{stage}/x.csv''')", "single SELECT"),
    ],
)
def test_sql_cannot_write_or_read_outside_the_run(small_run: Path, attack: str, refusal: str) -> None:
    stage = small_run / RUN / "verify" / "verify-r1"
    before = files_under(small_run.parent)
    with pytest.raises(sqlview.SqlError, match=refusal) as err:
        sqlview.run_sql(small_run, RUN, attack.format(stage=stage))
    assert "\n" not in str(err.value)
    assert files_under(small_run.parent) == before  # nothing written, anywhere under the test folder
    assert sqlview.run_sql(small_run, RUN, "SELECT count(*) FROM verdicts").item() == 2


def test_the_run_itself_stays_readable(small_run: Path) -> None:
    stage = small_run / RUN / "verify" / "verify-r1"
    described = sqlview.run_sql(small_run, RUN, "DESCRIBE verdicts")
    assert described["column_name"].to_list() == ["prompt_idx", "correct"]
    manifest = sqlview.run_sql(small_run, RUN, f"SELECT rows FROM read_json('{stage}/manifest.json')")
    assert manifest.item() == 2
    with pytest.raises(sqlview.SqlError, match="Permission Error"):  # `run` must not open `run2`
        sqlview.run_sql(small_run, RUN, f"SELECT * FROM read_json('{small_run / (RUN + '2')}/x.json')")


def test_connection_lock_holds_without_the_statement_check(small_run: Path) -> None:
    """`connect` (also used by the report) is locked on its own: the configuration cannot be undone."""
    con = sqlview.connect(small_run, RUN)
    for statement in (
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "SET allowed_directories = ['/']",
    ):
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute(statement)
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        con.execute("LOAD httpfs")
    assert con.execute("SELECT count(*) FROM verdicts").fetchone() == (2,)


def test_invalid_sql_is_one_line(small_run: Path) -> None:
    with pytest.raises(sqlview.SqlError, match="syntax error") as err:
        sqlview.run_sql(small_run, RUN, "SELEC prompt_idx FROM verdicts")
    assert "\n" not in str(err.value)
    with pytest.raises(sqlview.SqlError, match="(?s)nope.*has the tables") as err:
        sqlview.run_sql(small_run, RUN, "SELECT * FROM nope")
    assert "\n" not in str(err.value)


def test_a_damaged_shard_leaves_the_other_tables_queryable(small_run: Path) -> None:
    write_stage(small_run, "weights", pl.DataFrame({"prompt_idx": [0], "selected": [True]}))
    shard = small_run / RUN / "weights" / "weights-r1" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:20])  # truncated
    assert sqlview.run_sql(small_run, RUN, "SELECT count(*) FROM verdicts").item() == 2
    status = sqlview.run_sql(small_run, RUN, "SELECT status FROM run_stages WHERE stage = 'weights'").item()
    assert status.startswith("unreadable")
    with pytest.raises(sqlview.SqlError, match="weights"):
        sqlview.run_sql(small_run, RUN, "SELECT * FROM weights")


# ---------------------------------------------------------------- issue 17: what a run records is not trusted
def _set_recorded_path(root: Path, stage: str, path: str) -> None:
    run_json = root / RUN / "run.json"
    current = json.loads(run_json.read_text())
    current["stages"][stage]["1"]["path"] = path
    run_json.write_text(json.dumps(current))


def test_a_run_json_path_outside_the_root_opens_nothing_there(small_run: Path) -> None:
    """Old code: run.json's stage path `/etc` became an allowed directory: /etc/passwd was readable."""
    write_stage(small_run, "weights", pl.DataFrame({"prompt_idx": [0], "selected": [True]}))
    _set_recorded_path(small_run, "verify", "/etc")
    with pytest.raises(sqlview.SqlError, match="Permission Error"):
        sqlview.run_sql(small_run, RUN, "SELECT * FROM read_csv('/etc/passwd')")
    status = sqlview.run_sql(small_run, RUN, "SELECT status FROM run_stages WHERE stage = 'verify'").item()
    assert "run.json: stage 'verify' round 1: path '/etc' is outside the data root" in status
    assert sqlview.run_sql(small_run, RUN, "SELECT count(*) FROM weights").item() == 1
    with pytest.raises(sqlview.SqlError, match="verdicts is unreadable: .*outside the data root") as err:
        sqlview.run_sql(small_run, RUN, "SELECT * FROM verdicts")
    assert "\n" not in str(err.value)


def test_a_truncated_manifest_hides_only_its_own_table(small_run: Path) -> None:
    """Old code: json.loads of the manifest raised while building the views: no table was queryable."""
    write_stage(small_run, "weights", pl.DataFrame({"prompt_idx": [0], "selected": [True]}))
    manifest = small_run / RUN / "weights" / "weights-r1" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    assert sqlview.run_sql(small_run, RUN, "SELECT count(*) FROM verdicts").item() == 2
    status = sqlview.run_sql(small_run, RUN, "SELECT status FROM run_stages WHERE stage = 'weights'").item()
    assert (
        status.startswith("unreadable: ") and "weights-r1/manifest.json is damaged (not valid JSON" in status
    )
    with pytest.raises(sqlview.SqlError, match="weights is unreadable: .*manifest.json is damaged") as err:
        sqlview.run_sql(small_run, RUN, "SELECT * FROM weights")
    assert "\n" not in str(err.value)
    runs = dict(sqlview.list_runs(small_run))[RUN]
    assert {r["stage"]: r["status"] for r in runs} == {"verify": "complete", "weights": "unreadable"}


def test_a_shard_symlinked_outside_is_not_read(small_run: Path, tmp_path: Path) -> None:
    """Old code: the listed shard, a symlink to a Parquet file outside the run, was read."""
    outside = tmp_path / "secret.parquet"
    pl.DataFrame({"prompt_idx": [42], "correct": [True]}).write_parquet(outside)
    shard = small_run / RUN / "verify" / "verify-r1" / "part-00000.parquet"
    shard.unlink()
    shard.symlink_to(outside)
    status = sqlview.run_sql(small_run, RUN, "SELECT status FROM run_stages WHERE stage = 'verify'").item()
    assert "entry 'part-00000.parquet' is refused" in status and "symbolic link" in status
    with pytest.raises(sqlview.SqlError, match="verdicts is unreadable"):
        sqlview.run_sql(small_run, RUN, "SELECT * FROM verdicts")


# ---------------------------------------------------------------- limits: time, memory, rows, spill folder (issue 17)
ENDLESS = "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3"  # ~10^11 rows: hours here


def test_a_query_past_its_timeout_is_stopped(small_run: Path) -> None:
    with pytest.raises(sqlview.SqlError, match=r"ran past its time limit of 1 s") as err:
        sqlview.run_sql(small_run, RUN, ENDLESS, timeout_s=1)
    assert "\n" not in str(err.value)
    assert sqlview.run_sql(small_run, RUN, "SELECT count(*) FROM verdicts", timeout_s=60).item() == 2


def test_the_memory_limit_is_set_and_honoured(small_run: Path) -> None:
    setting = "SELECT current_setting('memory_limit') AS m"
    assert sqlview.run_sql(small_run, RUN, setting, memory=sqlview.parse_memory("64MiB")).item() == "64.0 MiB"
    default = sqlview.run_sql(small_run, RUN, setting).item()  # a quarter of RAM, not DuckDB's 80%
    gib = float(default.split()[0]) * (1 if default.endswith("GiB") else 1 / 1024)
    assert gib * 2**30 == pytest.approx(sqlview.default_memory(), rel=0.02)  # printed to 0.1 GiB
    one_big_string = "SELECT length(string_agg(i::VARCHAR, ',')) FROM range(100000000) t(i)"  # ~900 MB
    with pytest.raises(sqlview.SqlError, match=r"Out of Memory.*raise it with --memory") as err:
        sqlview.run_sql(small_run, RUN, one_big_string, memory=sqlview.parse_memory("64MB"))
    assert "\n" not in str(err.value)


def test_parse_memory() -> None:
    assert sqlview.parse_memory("4GB") == 4 * 10**9 and sqlview.parse_memory("512 MiB") == 512 * 2**20
    assert sqlview.parse_memory("1.5gb") == 1_500_000_000
    for bad in ("4", "lots", "4XB", "-1GB", "100KB"):
        with pytest.raises(sqlview.SqlError, match="give a size of at least 1MB"):
            sqlview.parse_memory(bad)


def test_max_rows_computes_only_the_rows_it_returns(small_run: Path) -> None:
    """10^12 rows of 1 KB: built whole, the frame would not fit in any memory limit nor finish in a day."""
    huge = "SELECT i, repeat('x', 1000) AS pad FROM range(1000000000000) t(i)"
    df = sqlview.run_sql(small_run, RUN, huge, max_rows=5, timeout_s=60, memory=sqlview.parse_memory("256MB"))
    assert df["i"].to_list() == [0, 1, 2, 3, 4, 5]  # max_rows + 1: the caller sees there is more
    assert sqlview.run_sql(small_run, RUN, "SELECT * FROM verdicts", max_rows=5).height == 2
    assert sqlview.run_sql(small_run, RUN, "DESCRIBE verdicts", max_rows=1).height == 2
    assert sqlview.run_sql(small_run, RUN, "SELECT 1 AS a; SELECT 2 AS b", max_rows=5).rows() == [(2,)]


def test_the_working_directory_tmp_is_not_readable(
    small_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB's default temp directory is `.tmp` of the working directory, and queries may read it."""
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.csv").write_text("token\nhunter2\n")
    monkeypatch.chdir(cwd)
    for path in (".tmp/secret.csv", str(cwd / ".tmp" / "secret.csv")):
        with pytest.raises(sqlview.SqlError, match="Permission Error"):
            sqlview.run_sql(small_run, RUN, f"SELECT * FROM read_csv('{path}')")
    spill = sqlview.run_sql(small_run, RUN, "SELECT current_setting('temp_directory')").item()
    assert Path(spill).stat().st_mode & 0o077 == 0 and not Path(spill).is_relative_to(cwd)
