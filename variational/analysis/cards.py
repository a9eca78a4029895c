"""Hub cards for an export: the dataset card and the model card (README.md with YAML front matter).

In:  `CardFacts`, everything variational/analysis/export.py read from the run (config, lineage, code version,
     counts, the weight and eval summaries).
Out: the README.md text. The front matter is what the Hub and `datasets` read (`configs` / `data_files`,
     license, task and size categories; for a model: base_model, library, pipeline tag); the body says what
     the recipe did, with which settings, from which stages (fingerprints), and how to cite it.

Licences are those of the source data (variational/data/LICENSES.md, shared/data/SOURCES.md, the Hub cards):
a dataset or base model this module does not know gets `other` and a line asking the user to set it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import yaml

from variational import templates
from variational.analysis.formats import PREFILL

# Hub licence ids of the data sets a run can start from (the generated traces inherit them)
DATA_LICENSES: dict[str, list[str]] = {
    "bespokelabs/Bespoke-Stratos-17k": ["apache-2.0"],  # the Hub card's `license: apache-2.0`
    # arith/ and ruc/ rows written for this project (Apache-2.0), gsm8k/ rows from GSM8K (MIT): LICENSES.md
    "embedded:mini_stratos": ["apache-2.0", "mit"],
}
# base models: Hub id and licence (Qwen3 and SmolLM2 are released under Apache-2.0)
BASE_MODELS: dict[str, tuple[str, str]] = {
    "Qwen/Qwen3-4B-Base": ("Qwen/Qwen3-4B-Base", "apache-2.0"),
    "embedded:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
PAPER_BIBTEX = """@inproceedings{zhou2025variationalreasoninglanguagemodels,
  title     = {Variational Reasoning for Language Models},
  author    = {Xiangxin Zhou and Zichen Liu and Haonan Wang and Chao Du and Min Lin and Chongxuan Li and Liang Wang and Tianyu Pang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  note      = {arXiv:2509.22637}
}"""
BESPOKE_BIBTEX = """@misc{bespoke_stratos,
  author       = {Bespoke Labs},
  title        = {Bespoke-Stratos: The unreasonable effectiveness of reasoning distillation},
  howpublished = {https://www.bespokelabs.ai/blog/bespoke-stratos-the-unreasonable-effectiveness-of-reasoning-distillation},
  year         = {2025}
}"""
ESTIMATOR_TEXT = {
    "acc": "ρ = accuracy of the M π_θ0 answers × exp(Δ), Δ = per-token mean of log π_θ0(z|x) − log q_φ(z|x,y′) "
    "(Eq. 8); eligible when the accuracy is > 0 (ruc questions fall back to gml); the answer is the first "
    "correct π_θ0 rollout",
    "gml": "log ρ = per-token mean log π_θ0(reference answer | x, z) + Δ; the answer is the reference solution",
    "likelihood": "log ρ = log π_θ0(reference answer | x, z) + Δ; the answer is the reference solution",
}
MODE_TEXT = {
    "17k-mix": "every original trace (origin −2, weight 1) plus, per question, the trace of highest ρ "
    "(origin k = its sample_idx, weight 1), or the original again when no trace was eligible (origin −1)",
    "all-k": "every eligible trace, weight ρ̃ (normalised over the question's traces) × the question weight",
}
MODEL_TEXT = {
    "pi_theta0": "π_θ0, the initial reasoning model: SFT of the base model on the reference traces (π_θ template)",
    "q_phi": "q_φ, the variational posterior: SFT of the base model on the hinted template (the reference "
    "solution is in the prompt, before the thought it learns to write)",
    "pi_theta": "π_θ, the final reasoning model: weighted SFT of the base model on the `train` table",
}
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


@dataclass
class Lineage:
    """One stage an export comes from: what run.json recorded and what this checkout computes for it."""

    stage: str
    round: int
    fingerprint: str | None  # recorded in run.json (None: no table, e.g. base_model)
    rows: int | None = None
    computed: bool | None = None  # computed by the last flow run (False: reused)
    current: str | None = None  # the fingerprint this checkout's DAG gives it (None: unknown)


@dataclass
class CardFacts:
    run: str
    stage: str
    round: int
    config: dict[str, Any]
    rows: int
    columns: dict[str, str]
    fmt: str | None = None  # the train format; None for other stages and models
    lineage: list[Lineage] = field(default_factory=list)
    lineage_note: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # config fields the chain's fingerprints hash
    code: dict[str, Any] = field(default_factory=dict)  # version, commit, dirty, libraries
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # origins, sources, weights
    eval_markdown: str | None = None
    left_out: pl.DataFrame | None = None
    training: dict[str, Any] | None = None  # a model's manifest metrics


# ---------------------------------------------------------------- small pieces
def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_BUCKETS if n < limit), "n>1M")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"`{text}`".replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pl.DataFrame) -> str:
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * df.width + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.iter_rows())


def front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def data_licenses(config: dict[str, Any]) -> list[str]:
    return DATA_LICENSES.get(config.get("data", {}).get("dataset", ""), ["other"])


def hub_datasets(config: dict[str, Any]) -> list[str]:
    """The Hub ids among the run's data sets (local files and embedded sets have none)."""
    data = config.get("data", {})
    names = [data.get("dataset"), data.get("source_dataset")]
    names += [aux.get("dataset") for aux in (data.get("aux") or {}).values()]
    return [n for n in dict.fromkeys(names) if n and "/" in n and not n.startswith(("/", ".", "embedded:"))]


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{"data": {"limit": 8}} -> {"data.limit": 8}: one table row per leaf."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= flatten(inner, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix: value}


# ---------------------------------------------------------------- sections
def recipe_section(cfg: dict[str, Any]) -> str:
    """What the recipe did, with this run's settings (method.md §1-§2)."""
    data, base = cfg.get("data", {}), cfg.get("base_model")
    estimator, mode = cfg.get("weights", {}).get("estimator"), cfg.get("select", {}).get("mode")
    limit, seed = data.get("limit"), data.get("subset_seed")
    rows = (
        "every row"
        if not limit
        else f"the first {limit} rows" + (f" after a shuffle (seed {seed})" if seed is not None else "")
    )
    steps = [
        f"**problems**: `{data.get('dataset')}` ({rows}), "
        "questions with their reference thought and solution, gold answers or code tests.",
        f"**pi_theta0** and **q_phi**: two SFTs of the base model `{base}`: π_θ0 on the reference traces, q_φ on "
        f"the hinted posterior template {cfg.get('posterior_template')} (objective `{cfg.get('posterior_objective')}`).",
        f"**posterior_samples**: K={cfg.get('K')} traces per question from q_φ, which sees the reference "
        "solution as a hint y′.",
        "**logps**: per-token log π_θ0(think|x), log π_θ0(answer|x, think) and log q_φ(think|x, y′) on the same "
        "token ids.",
        f"**rollouts**, **verdicts**: M={cfg.get('M')} π_θ0 answers per trace, checked by math-verify (math) or "
        "the sandboxed tests (code).",
        f"**weights**: estimator `{estimator}`: {ESTIMATOR_TEXT.get(estimator, 'see tasks/weights.py')}.",
        f"**train**: selection `{mode}`: {MODE_TEXT.get(mode, 'see tasks/select.py')}.",
        f"**pi_theta**: weighted SFT of `{base}` on `train` (Dr. SFT normaliser), then **eval**."
        + (f" EM rounds: {cfg.get('rounds')} (Algorithm 1)." if cfg.get("rounds", 1) > 1 else ""),
    ]
    intro = (
        "The pipeline of *Variational Reasoning for Language Models* (Zhou et al., ICLR 2026) treats the "
        "thought as a latent variable: a posterior q_φ that sees the answer proposes thoughts, importance "
        "weights rank them, and the best become SFT data.\n\n"
    )
    return intro + "".join(f"{i}. {s}\n" for i, s in enumerate(steps, 1))


def lineage_section(facts: CardFacts) -> str:
    if not facts.lineage:
        return "_No stage records were found for this export._\n"
    rows = [
        "| stage | round | fingerprint | rows | last flow run | this checkout |",
        "|---|---|---|---|---|---|",
    ]
    for item in facts.lineage:
        fp = f"`{item.fingerprint}`" if item.fingerprint else "— (not in run.json)"
        run = "—" if item.computed is None else "computed" if item.computed else "reused"
        if item.current is None:
            now = "—"
        elif item.fingerprint is None or item.current == item.fingerprint:
            now = "same" if item.fingerprint else f"`{item.current}`"
        else:
            now = f"differs (`{item.current}`)"
        rows.append(
            f"| {item.stage} | {item.round} | {fp} | {item.rows if item.rows is not None else '—'} "
            f"| {run} | {now} |"
        )
    note = f"\n{facts.lineage_note}\n" if facts.lineage_note else ""
    return (
        "The exported stage first, then every stage it was computed from. A fingerprint hashes the stage's "
        "code, the config fields it reads and its inputs' fingerprints: it names the folder "
        f'`<data_root>/{facts.run}/<stage>/<fingerprint>/` the data came from. "this checkout" says whether '
        'the code that wrote this card would compute the same stage ("differs": the code or the config '
        "schema changed since).\n\n" + "\n".join(rows) + "\n" + note
    )


def code_section(code: dict[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in (code.get("libraries") or {}).items())
    commit = code.get("commit")
    where = (
        f" at git commit `{commit}`" + (" (with uncommitted changes)" if code.get("dirty") else "")
        if commit
        else ""
    )
    return (
        f"- made by: variational {code.get('made_by', '?')} (the stage's manifest); libraries: {libs or '—'}\n"
        f"- exported by: variational {code.get('version', '?')}{where}\n"
    )


def config_section(facts: CardFacts) -> str:
    chain = ""
    if facts.fields:
        rows = "".join(f"| `{k}` | {_cell(v)} |\n" for k, v in facts.fields.items())
        chain = (
            "<details><summary>Every config field the stages above read (they enter the fingerprints)"
            f"</summary>\n\n| field | value |\n|---|---|\n{rows}\n</details>\n\n"
        )
    # where the data sat on the machine that made it says nothing about the data, and may name a user
    shown = facts.config | ({"data_root": "<data_root>"} if "data_root" in facts.config else {})
    full = yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=100)
    return (
        chain
        + f"<details><summary>The run's config (run.json)</summary>\n\n```yaml\n{full}```\n\n</details>\n"
    )


def settings_table(cfg: dict[str, Any]) -> str:
    keys = (
        "base_model",
        "data.dataset",
        "data.limit",
        "K",
        "M",
        "posterior_template",
        "posterior_objective",
        "rounds",
        "weights.estimator",
        "weights.question_weighting",
        "select.mode",
    )
    flat = flatten(cfg, "")
    return "| setting | value |\n|---|---|\n" + "".join(f"| `{k}` | {_cell(flat.get(k))} |\n" for k in keys)


def citation_section() -> str:
    return (
        "The method (please cite it when you use this data or model):\n\n```bibtex\n"
        + PAPER_BIBTEX
        + "\n```\n\n"
        "The source set of the recipe, Bespoke-Stratos-17k:\n\n```bibtex\n" + BESPOKE_BIBTEX + "\n```\n"
    )


def license_section(cfg: dict[str, Any], licences: list[str]) -> str:
    dataset = cfg.get("data", {}).get("dataset")
    if licences == ["other"]:
        return (
            f"The licence of the source data `{dataset}` is not known to variational: set `license:` in the "
            "front matter before publishing.\n"
        )
    return (
        f"`{', '.join(licences)}`: the licence(s) of the source data `{dataset}` (variational/data/LICENSES.md "
        "for the shipped sets). The generated thoughts come from models fine-tuned from "
        f"`{cfg.get('base_model')}`; check its licence too.\n"
    )


def format_section(facts: CardFacts) -> str:
    """Columns, and for `train` how the rows map onto the text the final SFT trained on (formats.py)."""
    columns = "".join(f"| `{name}` | {dtype} |\n" for name, dtype in facts.columns.items())
    table = f"| column | type |\n|---|---|\n{columns}"
    if facts.fmt is None:
        return f"The `{facts.stage}` table exported as the pipeline stores it.\n\n{table}"
    rule = {
        "messages": "`messages` is [system, user, assistant]; the assistant turn is the thought/solution text.",
        "bespoke": "The Bespoke-Stratos-17k schema: `system` and `conversations` [{from: user}, {from: assistant}]; "
        "`variational data check DIR` and a run with `data.dataset: DIR` read it as is.",
        "prompt_completion": "TRL's conversational prompt-completion format: `prompt` = [system, user], "
        "`completion` = [assistant]. TRL's loss covers the whole completion, so it also trains the prefill "
        "`<|begin_of_thought|>\\n\\n` and the end of turn, which the recipe's SFT did not.",
    }[facts.fmt]
    exact = (
        f"The π_θ prompt ends with the assistant prefill `{PREFILL!r}`, which opens every assistant turn here. "
        "With a ChatML template that copies content verbatim (SmolLM2's, tested; Qwen2.5's), "
        "`tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)` is exactly "
        "the text the final SFT trained on (prompt + response); the loss covered the part after "
        "`apply_chat_template(messages[:2], add_generation_prompt=True) + prefill`. A full rendering adds "
        "`<|im_end|>\\n`, which was never trained: the model ends its answer with `<|end_of_solution|>`. "
        "A template that rewrites assistant content (Qwen3's inserts `<think>` tags) does not reproduce it.\n"
    )
    provenance = (
        "Provenance columns: `weight` (the SFT weight), `origin` (−2 original trace, −1 the original again as "
        "fallback, k ≥ 0 the chosen posterior sample), `source` (the problem's source), `prompt_idx` (the "
        "question's row in the source data), `sample_idx` (= origin for a chosen trace, else null).\n"
    )
    left = ""
    if facts.left_out is not None and facts.left_out.height:
        left = (
            f"\n{facts.left_out.height} row(s) of the table are not in this export: the Bespoke schema cannot "
            "carry them unchanged (export `--format messages` keeps every row):\n\n"
            + markdown_table(facts.left_out)
        )
    return f"{rule}\n\n{exact}\n{provenance}\n{table}{left}"


def _summary_sections(facts: CardFacts) -> list[tuple[str, str]]:
    out = []
    if (origins := facts.tables.get("origins")) is not None:
        out.append(("Rows by origin", markdown_table(origins)))
    if (sources := facts.tables.get("sources")) is not None:
        out.append(("Rows by source", markdown_table(sources)))
    if (weights := facts.tables.get("weights")) is not None:
        out.append(
            (
                "Importance weights",
                "ESS = 1/Σρ̃² over a question's eligible traces (1: one trace carries all the weight, K: "
                f"uniform).\n\n{markdown_table(weights)}",
            )
        )
    out.append(("Evaluation", facts.eval_markdown or "_No finished `eval` stage in this run._\n"))
    return out


def dataset_card(facts: CardFacts) -> str:
    licences = data_licenses(facts.config)
    meta: dict[str, Any] = {
        "license": licences[0] if len(licences) == 1 else licences,
        "language": ["en"],
        "pretty_name": f"variational {facts.run}: {facts.stage}" + (f" ({facts.fmt})" if facts.fmt else ""),
        "size_categories": [size_category(facts.rows)],
        "task_categories": ["text-generation"],
        "tags": ["reasoning", "chain-of-thought", "synthetic", "variational-reasoning"],
    }
    if sources := hub_datasets(facts.config):
        meta["source_datasets"] = sources
    meta["configs"] = [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    what = (
        f"The `{facts.stage}` table (round {facts.round}) of the run `{facts.run}`"
        + (", the final SFT data," if facts.stage == "train" else "")
        + f" made by the `variational` pipeline, a production implementation of the paper's recipe "
        f"(official code: https://github.com/sail-sg/variational-reasoning): {facts.rows} rows.\n"
    )
    sections = [
        ("What the recipe did", recipe_section(facts.config) + "\n" + settings_table(facts.config)),
        ("Format", format_section(facts)),
        *_summary_sections(facts),
        ("Where it comes from", lineage_section(facts)),
        ("Code version", code_section(facts.code)),
        ("Config", config_section(facts)),
        ("License", license_section(facts.config, licences)),
        ("Citation", citation_section()),
    ]
    body = "".join(f"\n## {title}\n\n{text.rstrip()}\n" for title, text in sections)
    return front_matter(meta) + f"\n# {meta['pretty_name']}\n\n{what}{body}"


def prompting_section(stage: str, cfg: dict[str, Any]) -> str:
    if stage == "q_phi":
        template = cfg.get("posterior_template", "PB")
        example = templates.posterior_prompt("{question}", "{reference solution}", template)
        stop = templates.posterior_stop(template)
    else:
        example, stop = templates.pi_prompt("{question}"), templates.END_SOLUTION
    return (
        "The model was trained on exactly this prompt (the assistant turn is prefilled); it writes the rest "
        f"and ends with `{stop}` (a stop string, not a token: pass `stop_strings=[{stop!r}]` to "
        f"transformers' `generate`, `stop=[{stop!r}]` to vLLM).\n\n```text\n{example}\n```\n"
    )


def training_section(facts: CardFacts, section: str | None) -> str:
    m = facts.training or {}
    keys = ("examples", "steps", "tokens", "response_tokens", "truncated", "final_loss", "wall_time_s")
    metrics = "| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {_cell(m.get(k))} |\n" for k in keys if k in m
    )
    hyper = ""
    if section and isinstance(facts.config.get(section), dict):
        rows = "".join(f"| `{k}` | {_cell(v)} |\n" for k, v in facts.config[section].items())
        hyper = f"Hyperparameters (config section `{section}`):\n\n| field | value |\n|---|---|\n{rows}\n"
    data = f"{facts.rows} training examples (the stage's table; its inputs are listed under *Where it comes from*).\n\n"
    return data + hyper + metrics


def model_card(facts: CardFacts, section: str | None) -> str:
    """The card of an exported model stage (pi_theta0, q_phi, pi_theta); `section`: its training config."""
    base = facts.config.get("base_model", "")
    hub_id, licence = BASE_MODELS.get(
        base, (base if "/" in base and not base.startswith("/") else None, "other")
    )
    meta: dict[str, Any] = {
        "license": licence,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
    }
    if hub_id:
        meta["base_model"] = hub_id
    if datasets := hub_datasets(facts.config):
        meta["datasets"] = datasets
    meta["tags"] = ["reasoning", "chain-of-thought", "variational-reasoning", facts.stage]
    title = f"variational {facts.run}: {facts.stage}"
    what = f"{MODEL_TEXT.get(facts.stage, facts.stage)}; round {facts.round} of the run `{facts.run}`, base model `{base}`.\n"
    sections = [
        ("How to prompt it", prompting_section(facts.stage, facts.config)),
        ("Training", training_section(facts, section)),
        ("Evaluation", facts.eval_markdown or "_No finished `eval` stage in this run._\n"),
        ("What the recipe did", recipe_section(facts.config) + "\n" + settings_table(facts.config)),
        ("Where it comes from", lineage_section(facts)),
        ("Code version", code_section(facts.code)),
        ("Config", config_section(facts)),
        (
            "License",
            f"`{licence}`: the base model's licence"
            + (
                ""
                if licence != "other"
                else f" is not known to variational for `{base}`: set `license:` before publishing"
            )
            + ".\n",
        ),
        ("Citation", citation_section()),
    ]
    body = "".join(f"\n## {t}\n\n{text.rstrip()}\n" for t, text in sections)
    return front_matter(meta) + f"\n# {title}\n\n{what}{body}"
