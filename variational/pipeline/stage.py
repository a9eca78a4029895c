"""The stage API that tasks/ modules import: a `Stage` declaration and what its functions receive.

A stage is a declaration (name, inputs, the config fields it reads, the modules whose code changes its rows)
plus pure functions: `core` (the whole table at once), `plan` + `shard` (sharded work with an engine),
`examples` + `train` (a model stage) or `resolve` (a model found, not made). Everything else (fingerprint,
lock, reuse, shards, store, manifest, run.json, Prefect) is the runner's (variational/pipeline/runner.py).

Config. A stage sees the run config through a view that allows only its declared `fields` (fingerprinted)
and `uses` (read but not fingerprinted: engine memory knobs, worker counts). Reading any other field
raises, so a stage cannot depend on a setting its fingerprint ignores.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import polars as pl

from variational.config import RunConfig
from variational.pipeline.modelfiles import model_folder
from variational.pipeline.orchestration import logger
from variational.pipeline.storage import is_url
from variational.pipeline.store import read_stage

__all__ = ["Engine", "Inputs", "Output", "Ref", "Stage", "logger"]

Ref = dict[str, Any]  # what a stage task returns: its manifest (paths relative to the data root)


@dataclass
class Output:
    """What a core may return instead of a bare frame: side tables written beside the shards (never read
    as the stage's table) and extra manifest fields."""

    table: pl.DataFrame
    side: dict[str, pl.DataFrame] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage. Exactly one of `core`, `plan` + `shard`, `examples` + `train`, `resolve` is its work."""

    name: str
    inputs: tuple[str, ...] = ()  # upstream stages it may take (absent optional ones are skipped)
    fields: tuple[str, ...] = ()  # dotted config paths that change its rows: in the fingerprint
    uses: tuple[str, ...] = ()  # dotted config paths it reads that do not change its rows
    code: tuple[str, ...] = ()  # other modules whose code changes its rows (its own module always counts)
    core: Callable[[Inputs], pl.DataFrame | Output] | None = None
    plan: Callable[[Inputs], pl.DataFrame] | None = None  # the work items, one row per request
    shard: Callable[[Inputs, Engine, pl.DataFrame], pl.DataFrame] | None = None
    shard_size: str | int = 1  # a dotted config path (in `uses` or `fields`) or a number of items
    engine: Callable[[Inputs], Any] | None = None  # opens what shards share (an object with close())
    examples: Callable[[Inputs], pl.DataFrame] | None = None
    train: Callable[[Inputs, pl.DataFrame, Path], dict] | None = None  # -> extra manifest fields
    resolve: Callable[[Inputs], str] | None = None
    identity: Callable[[Inputs], dict] | None = None  # more fingerprint parts (data content, model ids)
    summary: Callable[[Inputs, pl.DataFrame], str] | None = None  # markdown for the artifact
    side: Callable[[Inputs, pl.DataFrame], dict[str, pl.DataFrame]] | None = None  # from the whole table
    per_round: bool = True
    needs_gpu: bool = False  # the executor reserves engine.tensor_parallel_size GPUs per worker
    verify_inputs: bool = False  # hash-check the upstream files before reading (training, selection)

    @property
    def module(self) -> str:
        work = self.core or self.plan or self.examples or self.resolve
        return work.__module__ if work else __name__

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module whose code changes this stage's rows: its own, then the declared ones."""
        return (self.module, *self.code)


class ConfigView:
    """Attribute access to the run config limited to declared paths (and everything below them)."""

    def __init__(self, obj: Any, allowed: set[str], prefix: str = ""):
        self._obj, self._allowed, self._prefix = obj, allowed, prefix

    def __getattr__(self, name: str) -> Any:
        path = f"{self._prefix}{name}"
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            return getattr(self._obj, name)  # this field or one inside it: no more checks needed
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(getattr(self._obj, name), self._allowed, path + ".")
        raise AttributeError(
            f"config field {path!r} is not declared by this stage; add it to the Stage's fields "
            "(changes the rows) or uses (does not)"
        )


class Inputs:
    """What a stage's functions get: the (limited) config, the round, and its upstream tables and models."""

    def __init__(self, stage: Stage, conf: RunConfig, refs: dict[str, Ref], round_: int):
        self.stage, self.round, self.refs = stage, round_, refs
        self.run_config = conf  # the whole config: for the runner, never for a stage's functions
        allowed = set(stage.fields) | set(stage.uses) | {"data_root", "name"}
        # typed as the schema for readers and checkers; at run time a view that refuses undeclared fields
        self.conf: RunConfig = cast(RunConfig, ConfigView(conf, allowed))
        self.data_root: Path | str = conf.data_root if is_url(conf.data_root) else Path(conf.data_root)

    def has(self, name: str) -> bool:
        return name in self.refs

    def table(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        return read_stage(self.data_root, self.refs[name], columns)

    def model_dir(self, name: str) -> str:
        """The local folder of an upstream model (on object storage: this machine's cached copy)."""
        return model_folder(self.data_root, self.refs[name])

    def model_id(self, name: str) -> str:
        ref = self.refs[name]
        return ref.get("fingerprint") or str(ref["model_dir"])


class Engine:
    """Opens the stage's engine on first use, so a fully resumed stage starts none; close() is idempotent.

    The engine object may expose `counters()` (cumulative tokens_in, tokens_out, start_s, device: see
    variational/pipeline/shardstats.py); the runner reads them around each shard for its stats record."""

    def __init__(self, open_: Callable[[Inputs], Any] | None, inputs: Inputs):
        self._open, self._inputs, self._engine = open_, inputs, None
        self.open_s = 0.0  # seconds spent opening the engine (its start, when it reports none itself)

    def get(self) -> Any:
        if self._engine is None:
            if self._open is None:
                raise RuntimeError(f"stage {self._inputs.stage.name!r} declares no engine")
            t0 = time.perf_counter()
            self._engine = self._open(self._inputs)
            self.open_s += time.perf_counter() - t0
        return self._engine

    def counters(self) -> dict[str, Any]:
        """What the engine has done since it opened: its own counters() and `open_s`; {} while closed."""
        if self._engine is None:
            return {}
        own = getattr(self._engine, "counters", None)
        return {"open_s": self.open_s, **(own() if callable(own) else {})}

    def close(self) -> None:
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.close()
            self._engine = None
