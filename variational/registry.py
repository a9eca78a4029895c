"""The one list of names a run can use: stages, estimators, selection modes, question weightings.

Config validation reads these (variational/config.py), the stage modules implement them (tasks/), and a
structure test checks that both sides name the same things. One name per stage everywhere: the stage's
Prefect task, its folder under the run, its run.json entry and its SQL view (design.md).
"""

from __future__ import annotations

# In DAG order. Table stages write Parquet; model stages also hold a Hugging Face folder (model/).
STAGES = (
    "problems",  # tasks/ingest.py
    "contamination",  # tasks/decontaminate.py: n-gram overlaps of the problems with the benchmarks
    "clean_problems",  # tasks/decontaminate.py (data.decontaminate: drop): problems minus the contaminated
    "base_model",  # tasks/base_model.py (no table: the resolved base model folder)
    "pi_theta0",  # tasks/finetune.py: SFT of the base model on the pi_theta template
    "prior_samples",  # tasks/sample_prior.py (forward_kl q_phi, EM rounds > 1)
    "prior_verdicts",  # tasks/verify.py
    "q_phi",  # tasks/finetune.py: the hinted posterior
    "posterior_samples",  # tasks/sample_posterior.py
    "logps",  # tasks/score.py
    "rollouts",  # tasks/rollouts.py
    "verdicts",  # tasks/verify.py
    "weights",  # tasks/weights.py
    "train",  # tasks/select.py
    "pi_theta",  # tasks/finetune.py: the final weighted SFT
    "eval",  # tasks/evaluate.py
)
MODEL_STAGES = ("base_model", "pi_theta0", "q_phi", "pi_theta")

# Stage names of earlier releases -> today's; SQL keeps the old table names as views (they were tables).
OLD_STAGE_NAMES = {
    "ingest": "problems",
    "finetune_pi_theta0": "pi_theta0",
    "finetune_q_phi": "q_phi",
    "sample_prior": "prior_samples",
    "verify_prior": "prior_verdicts",
    "sample_posterior": "posterior_samples",
    "score": "logps",
    "answer_rollouts": "rollouts",
    "verify": "verdicts",
    "select": "train",
    "final_sft": "pi_theta",
    "evaluate": "eval",
}

ESTIMATORS = ("acc", "gml", "likelihood")  # tasks/weights.py ESTIMATOR_RULES
SELECTION_MODES = ("17k-mix", "all-k")  # tasks/select.py SELECTORS
QUESTION_WEIGHTINGS = ("none", "rft", "grpo", "mle")  # tasks/weights.py QUESTION_WEIGHTS
POSTERIOR_TEMPLATES = ("PA", "PB")  # variational/templates.py
POSTERIOR_OBJECTIVES = ("hinted_sft", "forward_kl")
# verify.sandbox: auto = the strongest jail here, never none (variational/verifiers/sandbox.py resolve_mode)
CODE_SANDBOXES = ("auto", "root", "userns", "none")
# math graders of check_answers (variational/verifiers/answers.py): math-verify with our rules, or the
# official harness's verdict (SkyThought math_equal, variational/verifiers/official_math.py)
GRADERS = ("strict", "official")
PARITY_MODES = ("strict", "official")  # variational/parity.py: the config's one switch `parity`
DECONTAMINATE_MODES = ("off", "flag", "drop")  # tasks/decontaminate.py, flows/recipe.py
# Benchmark sets shipped in full for decontamination (variational/data/decontamination.py REFERENCE_FILES)
REFERENCE_SETS = (
    "aime24", "aime25", "amc23", "math500", "olympiadbench", "minerva", "gsm8k", "mmlu_pro", "heldout-tiny",
)  # fmt: skip
