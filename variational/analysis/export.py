"""`variational export`: a finished stage of a run -> a folder the Hub, `datasets` and trainers load.

In:  a data root and run (run.json and the manifests, read through variational/pipeline/store.py), the stage
     and round to export, a format for `train` (variational/analysis/formats.py), and the flow's DAG as
     `Step`s (the CLI traces flows.recipe.dag: this layer may not import flows) for the card's lineage.
Out: DIR/README.md (the card, variational/analysis/cards.py) and
     - a table stage: DIR/data/train-0000i-of-0000n.parquet, so `datasets.load_dataset(DIR, split="train")`
       loads it (`train` in the chosen format, every other table as the pipeline stores it);
     - a model stage (pi_theta0, q_phi, pi_theta): the Hugging Face model folder (weights, tokenizer, chat
       template, generation config).
     DIR is built under a temp name beside it and renamed, so it is whole or absent.
`push` uploads DIR with huggingface_hub (create_repo, then upload_folder).
Before anything is read, the exported stage's files are hash-checked against its manifest: a damaged table
is never published (`variational verify-store` sets it aside; rerun the flow).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from variational import registry
from variational.analysis import cards
from variational.analysis.formats import FORMATS, format_train
from variational.analysis.metrics import summarize, summary_markdown
from variational.analysis.report import origin_label, source_group, weight_stats
from variational.pipeline.store import DamagedStage, StageRecord, StageStore, read_files, recorded_stages

FILE_BYTES = 256 << 20  # in memory per data file: the Hub's viewer and `datasets` stream files this size well
ROW_GROUP_BYTES = 64 << 20
REPO = Path(__file__).resolve().parents[2]


class ExportError(ValueError):
    """A request the run cannot satisfy (no such stage, an unfinished one, a format for a non-train table)."""


@dataclass(frozen=True)
class Step:
    """One stage call of the flow's DAG (flows.recipe.dag), as the card's lineage needs it."""

    stage: str
    round: int
    fingerprint: str  # what this checkout computes for it with the run's config
    inputs: tuple[str, ...] = ()  # upstream keys `stage@round`
    fields: tuple[str, ...] = ()  # config fields in its fingerprint
    uses: tuple[str, ...] = ()  # config fields it reads unfingerprinted (a model stage: its training section)

    @property
    def key(self) -> str:
        return f"{self.stage}@{self.round}"


@dataclass
class Exported:
    """What `export` wrote."""

    path: Path
    repo_type: str  # "dataset" or "model": what a push creates
    rows: int
    files: list[str] = field(default_factory=list)
    left_out: int = 0  # train rows the format cannot carry (named in the card)


# ---------------------------------------------------------------- reading the run
def find_record(records: list[StageRecord], run: str, stage: str, round_: int | None) -> StageRecord:
    """The run.json record of `stage` (its latest round unless `round_`), finished and intact."""
    mine = [r for r in records if r.stage == stage and (round_ is None or r.round == round_)]
    if not mine:
        have = sorted({f"{r.stage}@{r.round}" for r in records})
        which = f"{stage} round {round_}" if round_ is not None else stage
        raise ExportError(f"run {run!r} has no {which}; its stages: {', '.join(have)}")
    record = max(mine, key=lambda r: r.round)
    if not record.complete:
        raise ExportError(
            f"{stage} round {record.round} of run {run!r} is unfinished (no manifest in {record.folder}); "
            "rerun the flow to finish it"
        )
    return record


def check_intact(data_root: Path, run: str, record: StageRecord) -> dict:
    """The stage's manifest, after every file it lists matched its size and sha256 (no damaged data leaves)."""
    store = StageStore(data_root, run, record.stage, record.entry["fingerprint"])
    if bad := store.problems(deep=True):
        raise DamagedStage(
            f"{record.stage} of run {run!r} does not match its manifest ({'; '.join(bad)}): run "
            f"`variational verify-store {run}` to set it aside, then rerun the flow"
        )
    return store.manifest()


def _latest(records: list[StageRecord], stage: str, round_: int | None = None) -> StageRecord | None:
    mine = [r for r in records if r.stage == stage and r.complete and (round_ is None or r.round == round_)]
    return max(mine, key=lambda r: r.round) if mine else None


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def chain_of(steps: list[Step], key: str) -> list[Step]:
    """The step `key` first, then every step it was computed from, in the DAG's order."""
    by_key = {s.key: s for s in steps}
    if key not in by_key:
        return []
    seen, todo = {key}, [key]
    while todo:
        for upstream in by_key[todo.pop()].inputs:
            if upstream not in seen and upstream in by_key:
                seen.add(upstream)
                todo.append(upstream)
    return [by_key[key]] + [s for s in steps if s.key in seen and s.key != key]


def lineage(
    records: list[StageRecord], steps: list[Step] | None, record: StageRecord, config: dict[str, Any]
) -> tuple[list[cards.Lineage], str, dict[str, Any]]:
    """(the card's lineage rows, a note, the config fields the chain's fingerprints hash)."""
    recorded = {(r.stage, r.round): r for r in records}

    def item(stage: str, round_: int, current: str | None) -> cards.Lineage:
        rec = recorded.get((stage, round_))
        entry = rec.entry if rec else {}
        return cards.Lineage(
            stage, round_, entry.get("fingerprint"), entry.get("rows"), entry.get("computed"), current
        )

    chain = chain_of(steps or [], f"{record.stage}@{record.round}")
    if chain:
        fields: dict[str, Any] = {}
        for step in chain:
            for name in step.fields:
                fields |= cards.flatten(_get(config, name), name)
        return [item(s.stage, s.round, s.fingerprint) for s in chain], "", fields
    why = "could not be traced" if steps is None else f"has no {record.stage} round {record.round}"
    note = f"The flow's DAG for this run's config {why}: every stage the run recorded is listed."
    rest = [r for r in records if r is not record]
    return [item(r.stage, r.round, None) for r in [record, *rest]], note, {}


def git_commit() -> tuple[str | None, bool]:
    """(HEAD commit of the checkout this code runs from, whether it has uncommitted changes) or (None, False)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if head.returncode != 0:
        return None, False
    return head.stdout.strip(), bool(status.stdout.strip())


def code_info(manifest: dict) -> dict[str, Any]:
    libraries = dict(manifest.get("libraries") or {})
    version = "?"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = importlib.metadata.version("variational")
    commit, dirty = git_commit()
    made_by = libraries.pop("variational", "?")
    return {"made_by": made_by, "libraries": libraries, "version": version, "commit": commit, "dirty": dirty}


def eval_markdown(records: list[StageRecord]) -> str | None:
    """The models side by side (metrics.summary_markdown) from the eval stage's summary side table."""
    record = _latest(records, "eval")
    if record is None:
        return None
    summary_files = [p for p in record.sides if p.stem == "summary"]
    if summary_files:
        summary = read_files(summary_files, "eval")
    else:
        summary = summarize(
            read_files(
                record.parts, "eval", ["model", "benchmark", "problem_id", "sample", "correct", "status"]
            )
        )
    return summary_markdown(summary)


def weights_table(records: list[StageRecord], round_: int) -> pl.DataFrame | None:
    record = _latest(records, "weights", round_) or _latest(records, "weights")
    if record is None:
        return None
    columns = ["prompt_idx", "sample_idx", "estimator", "eligible", "rho_tilde", "selected"]
    return weight_stats(read_files(record.parts, "weights", columns))[0]


def train_tables(train: pl.DataFrame, sources: pl.DataFrame | None) -> dict[str, pl.DataFrame]:
    """Rows and weight sums by origin and by source (the source's prefix: numina, apps, ...)."""
    origins = train.group_by("origin").agg(rows=pl.len(), weight_sum=pl.col("weight").sum()).sort("origin")
    origins = origins.with_columns(origin=pl.Series([origin_label(o) for o in origins["origin"]]))
    with_source = train.select("prompt_idx", "weight")
    if sources is not None:
        with_source = with_source.join(sources.unique("prompt_idx"), on="prompt_idx", how="left")
    else:
        with_source = with_source.with_columns(source=pl.lit(None, pl.String))
    by_source = (
        with_source.group_by(source_group())
        .agg(rows=pl.len(), weight_sum=pl.col("weight").sum())
        .sort("source")
    )
    return {"origins": origins, "sources": by_source}


# ---------------------------------------------------------------- writing
def plain_type(dtype: pa.DataType) -> pa.DataType:
    """polars writes Arrow's large (64-bit offset) strings and lists; `datasets` then types the columns
    LargeList / large_string. The plain types give the usual `List` / `string` features (and what TRL and the
    Hub's viewer expect). Each row group is converted on its own, so 32-bit offsets always suffice."""
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype) or pa.types.is_list_view(dtype):
        return pa.list_(plain_type(dtype.value_type))
    if pa.types.is_struct(dtype):
        return pa.struct([pa.field(f.name, plain_type(f.type), f.nullable) for f in dtype])
    return dtype


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    """One data file, zstd, row groups of about ROW_GROUP_BYTES in memory."""
    per_row = max(1, df.estimated_size() // max(1, df.height))
    group = max(1, ROW_GROUP_BYTES // per_row)
    writer = None
    try:
        for start in range(0, max(df.height, 1), group):
            table = df.slice(start, group).to_arrow()
            table = table.cast(pa.schema([pa.field(f.name, plain_type(f.type)) for f in table.schema]))
            writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def write_data_files(
    frames: list[Callable[[], pl.DataFrame]], out: Path, log: Callable[[str], None]
) -> list[str]:
    """data/train-0000i-of-0000n.parquet, one per frame (each produced when written: one shard in memory)."""
    names = []
    (out / "data").mkdir(parents=True, exist_ok=True)
    for i, make in enumerate(frames):
        df = make()
        name = f"data/train-{i:05d}-of-{len(frames):05d}.parquet"
        write_parquet(df, out / name)
        log(f"  {name}: {df.height} rows")
        names.append(name)
    return names


def split_frame(df: pl.DataFrame) -> list[Callable[[], pl.DataFrame]]:
    """A frame in pieces of about FILE_BYTES in memory."""
    pieces = max(1, math.ceil(df.estimated_size() / FILE_BYTES))
    size = math.ceil(df.height / pieces) if df.height else 0
    return [lambda i=i: df.slice(i * size, size) for i in range(pieces)]


def unified_shards(record: StageRecord) -> list[Callable[[], pl.DataFrame]]:
    """The stage's shards, one frame each, cast to one schema (the store reads shards `vertical_relaxed`:
    a column all-null in one shard may be typed differently there)."""
    schemas = [pl.read_parquet_schema(p) for p in record.parts]
    schema = pl.concat([pl.DataFrame(schema=s) for s in schemas], how="vertical_relaxed").schema
    return [
        lambda p=p: read_files([p], record.stage).select(pl.col(c).cast(t) for c, t in schema.items())
        for p in record.parts
    ]


@contextlib.contextmanager
def building(out: Path):
    """A temp folder beside `out`, renamed to `out` when the block finishes; removed when it fails."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- export
@dataclass
class Request:
    """What to export: the run, the stage (and round: default its latest), the format of `train`."""

    data_root: Path
    run: str
    stage: str = "train"
    round: int | None = None
    fmt: str | None = None  # train only; default messages
    steps: list[Step] | None = None  # the flow's DAG (None: could not be traced)


def _facts(
    req: Request, records: list[StageRecord], record: StageRecord, manifest: dict, config: dict
) -> cards.CardFacts:
    chain, note, fields = lineage(records, req.steps, record, config)
    return cards.CardFacts(
        run=req.run,
        stage=record.stage,
        round=record.round,
        config=config,
        rows=int(manifest.get("rows") or 0),
        columns=dict(manifest.get("schema") or {}),
        lineage=chain,
        lineage_note=note,
        fields=fields,
        code=code_info(manifest),
        eval_markdown=eval_markdown(records),
    )


def _train(
    req: Request,
    records: list[StageRecord],
    record: StageRecord,
    facts: cards.CardFacts,
    out: Path,
    log: Callable[[str], None],
) -> Exported:
    fmt = req.fmt or "messages"
    train = read_files(record.parts, "train")
    problems = _latest(records, "problems")
    sources = read_files(problems.parts, "problems", ["prompt_idx", "source"]) if problems else None
    rows, left_out = format_train(train, sources, fmt)
    files = write_data_files(split_frame(rows), out, log)
    facts.fmt, facts.rows, facts.left_out = fmt, rows.height, left_out
    facts.columns = {name: str(dtype) for name, dtype in rows.schema.items()}
    facts.tables = train_tables(train, sources)
    if (weights := weights_table(records, record.round)) is not None:
        facts.tables["weights"] = weights
    (out / "README.md").write_text(cards.dataset_card(facts))
    return Exported(out, "dataset", rows.height, [*files, "README.md"], left_out.height)


def _table(
    records: list[StageRecord],
    record: StageRecord,
    facts: cards.CardFacts,
    out: Path,
    log: Callable[[str], None],
) -> Exported:
    files = write_data_files(unified_shards(record), out, log)
    if (
        any(item.stage == "weights" for item in facts.lineage)
        and (weights := weights_table(records, record.round)) is not None
    ):
        facts.tables["weights"] = weights
    (out / "README.md").write_text(cards.dataset_card(facts))
    return Exported(out, "dataset", facts.rows, [*files, "README.md"])


def copy_model(model_dir: Path, out: Path, log: Callable[[str], None]) -> list[str]:
    """The model folder's files (weights, tokenizer, chat template, generation config) into `out`; a missing
    generation config is derived from the model config, as transformers' save_pretrained would write it."""
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{model_dir} holds no config.json: the stage's model folder is incomplete; rerun the flow"
        )
    names = []
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        log(f"  {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
        shutil.copy2(path, out / path.name)
        names.append(path.name)
    if "generation_config.json" not in names:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
        names.append("generation_config.json")
    return names


def _model(
    req: Request,
    record: StageRecord,
    manifest: dict,
    facts: cards.CardFacts,
    out: Path,
    log: Callable[[str], None],
) -> Exported:
    files = copy_model(record.folder / "model", out, log)
    facts.training = manifest.get("metrics") or {}
    step = next((s for s in req.steps or [] if s.stage == record.stage and s.round == record.round), None)
    section = step.uses[0] if step and step.uses else None
    (out / "README.md").write_text(cards.model_card(facts, section))
    return Exported(out, "model", facts.rows, [*files, "README.md"])


def export(req: Request, out: Path, log: Callable[[str], None] = lambda _: None) -> Exported:
    """Write the export of `req` to the folder `out` (absent or empty): data files or model + README.md."""
    if req.stage not in registry.STAGES or req.stage == "base_model":
        stages = [s for s in registry.STAGES if s != "base_model"]
        raise ExportError(f"cannot export stage {req.stage!r}; choose from {', '.join(stages)}")
    if req.fmt is not None and req.stage != "train":
        how = "a model folder" if req.stage in registry.MODEL_STAGES else "it is stored"
        raise ExportError(f"--format applies to the train table; {req.stage} is exported as {how}")
    if req.fmt is not None and req.fmt not in FORMATS:
        raise ExportError(f"unknown --format {req.fmt!r}; choose from {', '.join(FORMATS)}")
    records = recorded_stages(req.data_root, req.run)
    record = find_record(records, req.run, req.stage, req.round)
    manifest = check_intact(req.data_root, req.run, record)
    config = json.loads((req.data_root / req.run / "run.json").read_text()).get("config") or {}
    facts = _facts(req, records, record, manifest, config)
    log(f"exporting {record.stage} round {record.round} of run {req.run!r} to {out}")
    with building(out) as tmp:
        if record.stage in registry.MODEL_STAGES:
            done = _model(req, record, manifest, facts, tmp, log)
        elif record.stage == "train":
            done = _train(req, records, record, facts, tmp, log)
        else:
            done = _table(records, record, facts, tmp, log)
    done.path = out
    return done


# ---------------------------------------------------------------- push
def hub_token(repo_id: str) -> str:
    """huggingface_hub's token (HF_TOKEN, or the login `hf auth login` saved); ExportError when there is none."""
    from huggingface_hub import get_token

    if token := get_token():
        return token
    raise ExportError(f"no Hugging Face token to push {repo_id}: set HF_TOKEN or run `hf auth login`")


def push(folder: Path, repo_id: str, repo_type: str, *, private: bool = False) -> str:
    """Upload `folder` to the Hub repo `repo_id` (created when absent); returns the commit URL. HF_ENDPOINT,
    read at call time, points at another Hub (huggingface_hub reads it once, at import). A refusal or a
    network error becomes one ExportError line."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as transport  # huggingface_hub >= 2's HTTP client
    except ImportError:
        import httpx as transport
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=hub_token(repo_id))
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        message = f"variational export ({folder.name})"
        info = api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type=repo_type, commit_message=message
        )
    except (HfHubHTTPError, transport.HTTPError, OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ExportError(
            f"push to {repo_id} failed ({type(err).__name__}: {reason}); the export is in {folder}"
        ) from None
    return info.commit_url
