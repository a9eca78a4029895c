r"""The parity switch: config `parity: strict | official`, and the one list of every way our pipeline departs
from the official one (sail-sg/variational-reasoning@21bc48a, its SkyThought fork @6454fea, SkyThought
0d190f1; method.md §8-§10).

`strict` (the default) is the corrected recipe; `official` reproduces the official semantics wherever they
differ. The list at the end of this docstring gives them, item by item: what each mode does and which stage
asks (kept in the docstring so that editing its prose recomputes no stage; README "Differences from the
official code" says the same for users, tests/test_parity.py checks every item is there). A stage that
changes asks one helper below for its resolved setting and declares `parity` in its `fields`, so its
fingerprint follows the switch: switching it recomputes rollouts, verdicts, weights and eval (and train and
pi_theta below them) and reuses problems, base_model, pi_theta0, q_phi, posterior_samples and logps
(tests/test_parity.py checks this on `flows.recipe.dag`). Evaluation grades every sample both ways whatever
the switch (the `*_official` columns of `eval`); the switch picks the prompts the models are asked with.
`verify.code_official_quirks: true` alone turns on the official code VERDICT rule in a strict run (crashes,
timeouts and compile errors pass); `parity: official` implies it and adds the official time limits.

The differences (item: the stage that asks. strict | official):
- math grader: verdicts, eval. math-verify with our rules: the solution section, its last `\boxed` first
  (verifiers/math_rules.py) | SkyThought's extract_answer -> strip_answer_string -> math_equal, 5 s
  (verifiers/official_math.py).
- gold answers of rollouts: verdicts. The source's ground truth, else the reference solution's last `\boxed`
  (`problems.gold`), read by math-verify | the same golds read by the official grader's own rules (with its
  fallbacks: "the answer is", the last number).
- code time limits: verdicts. `verify.code_timeout_s` per test (10 s), `verify.code_problem_timeout_s` for
  all tests of a problem (60 s) | 4 s per test, 11 s per problem, then wrong.
- code verdicts: verdicts. A crash, timeout or compile error is wrong (`verify.code_official_quirks: true`:
  they pass) | they pass (np.all over 1/0/-1/-2), with the `def code()` wrapping and letters-only fences.
- rollout seeds: rollouts. n=M per trace, one seed per trace: M independent answers | M copies of the prompt
  sharing one seed (one per sample index k, as the official split k): near-identical answers.
- traces whose thought never closed: rollouts. No rollouts (no answer position): accuracy null, never
  eligible for acc | rollouts after the whole response + `<|end_of`, like every other trace.
- 28k think cap: weights. On the whole think span (`posterior_samples.think_len`) | on the shorter of the two
  scored think spans (π_θ0's and q_φ's, each cut by scoring's 32k context cap).
- eval prompt frame: eval. The π_θ template for every model (Sky-T1 system prompt, `<|begin_of_thought|>`
  prefill) | the model's own chat template: the Sky-T1 prompt as the harness's YAML spells it (its
  '\\n\\n', two backslashes), the prefill `<begin_of_thought>\n\n` (no pipes, continue_final_message);
  the base model: the qwen_cot system prompt and no prefill.
- AIME25 prompt: eval. Instruction first, like every math set | question first:
  `{problem}\nReturn your final response within \boxed{}`.
- LiveCodeBench prompt: eval. The starter code after a functional question (the function name is known) |
  no starter code.
- GPQA option order: eval. Drawn per question from (`shuffle_seed`, Record ID) | `random.seed(41)`, then one
  shuffle per row in file order (the harness's global seed).
- multiple-choice readers: eval, both columns whatever the parity. The solution section: its last `\boxed`
  letter, last "answer is (X)", last standalone letter | GPQA: the last standalone A-D of the upper-cased
  response; MMLU-Pro: the first "answer is (X)", else the first "Answer: X" line, else the last
  standalone A-J; never `\boxed`.
- LiveCodeBench grading: eval, both columns whatever the parity. APPS rules (lines, words, floats), called by
  `func_name`, `verify.code_timeout_s` per test | the whole output stripped equal; the function named by the
  word before the first `(`, looked up in the module (a `class Solution` answer fails), `==` on its value;
  (6+1)·n_tests+5 s for the suite (verifiers/lcb_check.py).
- unparsable gold in eval: eval, both columns whatever the parity. The problem is left out of avg@k
  (`n_skipped`) | counted wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from variational import registry

# the official APPS/TACO checker: 4 s per test (testing util), the problem's process joined with timeout 10 + 1
OFFICIAL_CODE_TEST_S, OFFICIAL_CODE_PROBLEM_S = 4.0, 11.0
OFFICIAL_GPQA_SEED = 41  # skythought evaluate --seed default, set globally before the prompts are built
# benchmarks the fork asks question-first (its aime25.yaml), by the names of the paper's table
OFFICIAL_QUESTION_FIRST = ("aime25",)


def official(conf: Any) -> bool:
    """Does this run reproduce the official semantics? (`conf` may be a stage's config view: it must
    declare `parity`.)"""
    return conf.parity == "official"


@dataclass(frozen=True)
class VerifyRules:
    """How the verdicts stage judges: the math grader, the code time limits, the official code verdicts."""

    grader: Literal[registry.GRADERS]
    code_timeout_s: float
    code_problem_timeout_s: float
    code_quirks: bool
    # how the golds are given to the math grader: "answer" (problems.gold as they are) or "solution"
    # (whole solutions, read as verify_parallel.py reads the ground truth and the reference solution)
    gold_form: Literal["answer", "solution"] = "answer"


def verify_rules(conf: Any) -> VerifyRules:
    """Reads parity and verify.{code_timeout_s, code_problem_timeout_s, code_official_quirks}."""
    if official(conf):
        return VerifyRules("official", OFFICIAL_CODE_TEST_S, OFFICIAL_CODE_PROBLEM_S, True, "solution")
    v = conf.verify
    return VerifyRules("strict", v.code_timeout_s, v.code_problem_timeout_s, v.code_official_quirks)


@dataclass(frozen=True)
class RolloutRules:
    """Which traces get answer rollouts and how the M rollouts of a trace are seeded."""

    unclosed_traces: bool  # traces whose thought never closed get rollouts too
    shared_seed: bool  # M requests with one seed (official) instead of n=M with one request


def rollout_rules(conf: Any) -> RolloutRules:
    return RolloutRules(unclosed_traces=official(conf), shared_seed=official(conf))


def think_cap_on_scored_length(conf: Any) -> bool:
    """Does the weights stage's 28k think cap apply to the scored (context-capped) think length?"""
    return official(conf)


@dataclass(frozen=True)
class EvalPrompts:
    """How the eval stage asks: the frame around the harness's user message, and the benchmark prompts."""

    frame: Literal["pi_template", "chat_template"]
    question_first: tuple[str, ...]  # benchmark names asked question-first
    starter_code: bool  # LiveCodeBench functional problems show their starter code
    gpqa_order: Literal["per_question", "harness"]


STRICT_PROMPTS = EvalPrompts("pi_template", (), starter_code=True, gpqa_order="per_question")
OFFICIAL_PROMPTS = EvalPrompts(
    "chat_template", OFFICIAL_QUESTION_FIRST, starter_code=False, gpqa_order="harness"
)


def eval_prompts(conf: Any) -> EvalPrompts:
    return OFFICIAL_PROMPTS if official(conf) else STRICT_PROMPTS
