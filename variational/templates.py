"""Prompt templates and parsing, defined once (method.md §4).

pi_theta: the Bespoke-Stratos/Sky-T1 system prompt; the assistant turn is prefilled with
`<|begin_of_thought|>\n\n` and the target is `{think}<|end_of_thought|>\n\n<|begin_of_solution|>{solution}<|end_of_solution|>`.
q_phi (PA/PB): the hinted posterior; the reference solution sits in `<|begin_of_solution|>...` at the start of
the assistant turn, before the thought (paper App. G). The separator whitespace is not published; we use the
same `\n\n` the Bespoke rows use between sections.
"""

from __future__ import annotations

from typing import Any, Literal

PosteriorTemplate = Literal["PA", "PB"]

BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
BEGIN_EXPLANATION, END_EXPLANATION = "<|begin_of_explanation|>", "<|end_of_explanation|>"
# The think span ends at the first `<|end_of`: this accepts PA and PB outputs alike (method.md §1).
END_OF = "<|end_of"
ANSWER_STOP = END_SOLUTION
SEP = "\n\n"

PI_SYSTEM = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long "
    "thinking process before providing the final precise and accurate solutions. This requires "
    "engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, "
    "reflection, backtracing, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution. In the Thought section, "
    "detail your reasoning process using the specified format: <|begin_of_thought|> {thought with "
    "steps separated with '\\n\\n'} <|end_of_thought|> Each step should include detailed considerations "
    "such as analisying questions, summarizing relevant findings, brainstorming new ideas, verifying "
    "the accuracy of the current steps, refining any errors, and revisiting previous steps. In the "
    "Solution section, based on various attempts, explorations, and reflections from the Thought "
    "section, systematically present the final solution that you deem correct. The solution should "
    "remain a logical, accurate, concise expression style and detail necessary step needed to reach "
    "the conclusion, formatted as follows: <|begin_of_solution|> {final formatted, precise, and clear "
    "solution} <|end_of_solution|> Now, try to solve the following question through the above "
    "guidelines:"
)

PA_SYSTEM = (
    "Your role as an assistant involves providing precise and accurate solutions before providing "
    "detailed explanations with your full work showing your systematic thinking process leading to "
    "each solution. Your explanations should show how you engaged in a comprehensive cycle of "
    "analysis, summarizing, exploration, reassessment, reflection, backtracing, and iteration to "
    "develop well-considered thinking process. Please structure your response into two main sections: "
    "Solution and Explanation. In the Solution section, present your well-thought solution that "
    "accurately answers the question. The solution should remain a logical, accurate, concise "
    "expression style and detail necessary step needed to reach the conclusion, formatted as follows: "
    "<|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|>. In the "
    "Explanation section, comprehensively detail your reasoning process using the specified format: "
    "<|begin_of_explanation|> {explanation with steps separated with '\\n\\n'} <|end_of_explanation|> "
    "Each step should show detailed considerations leading to your solutions such as analisying "
    "questions, summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the "
    "current steps, refining any errors, and revisiting previous steps."
)

PB_SYSTEM = (
    "Your role as an assistant involves reconstructing the internal reasoning process that connects a "
    "provided question to its correct answer. Your task is to methodically reverse-engineer the "
    "logical steps, demonstrating a full cycle of analysis, summarization, idea generation, "
    "verification, error correction, and iterative refinement. Please structure your response into "
    "two distinct parts: Solution and Thought. In the Solution section, present the given correct "
    "answer in a precise and clear format: <|begin_of_solution|> {provided correct solution} "
    "<|end_of_solution|>. In the Thought section, articulate the step-by-step cognitive journey that "
    "leads to the solution. Use the specified format: <|begin_of_thought|> {detailed thought process "
    "with steps separated by '\\n\\n'} <|end_of_thought|>. Each step should reflect analytical "
    "breakdowns, synthesis of key points, generation of logical pathways, validation of each step's "
    "accuracy, refinement of any missteps, and reassessment of previous conclusions. The focus is "
    "solely on depicting the internal, structured thinking that arrives at the provided solution."
)


def chat(system: str, user: str, assistant_prefix: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{assistant_prefix}"
    )


def pi_prompt(question: str) -> str:
    """The pi_theta prompt; it ends with `<|begin_of_thought|>` and two real newlines."""
    return chat(PI_SYSTEM, question, BEGIN_THOUGHT + SEP)


def pi_response(think: str, solution: str) -> str:
    return f"{think}{END_THOUGHT}{SEP}{BEGIN_SOLUTION}{solution}{END_SOLUTION}"


# The official evaluation frame (method.md §10; the fork's skythought/evals/models/model_configs.yaml), used
# in `parity: official`. The trained models get the Sky-T1 system prompt as that YAML spells it: its escapes
# leave '\\n\\n' (two backslashes) where the training prompt has '\n\n', and the assistant turn is
# prefilled with `<begin_of_thought>` WITHOUT pipes (method.md §8.11), through the model's own chat template
# (`continue_final_message`). The base model (Qwen/Qwen3-4B-Base there) gets `qwen_cot` and no prefill.
OFFICIAL_EVAL_SYSTEM = PI_SYSTEM.replace("'\\n\\n'", "'\\\\n\\\\n'")
OFFICIAL_EVAL_PREFILL = "<begin_of_thought>" + SEP
QWEN_COT_SYSTEM = "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step."


def chat_template_prompt(tokenizer: Any, system: str, user: str, prefill: str | None) -> str:
    """system + user through the tokenizer's own chat template (what vLLM's `LLM.chat` renders): with a
    `prefill` the assistant turn is continued from it (`continue_final_message`), else the template's
    generation prompt opens it. A tokenizer without a chat template raises ValueError naming the fix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template: the official eval frame "
            "applies the model's own; add one to its tokenizer_config.json or use parity: strict"
        )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if prefill is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": prefill})
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


# User-message texts: Bespoke-Stratos rows (shared/data/SOURCES.md §10) and the evaluation harness
# (SkyThought 0d190f1, skythought/evals/tasks/*.yaml) share them. The harness joins instruction and
# question with one space; Bespoke's code rows have no space after the prefix.
MATH_INSTRUCTION = "Return your final response within \\boxed{}."
GPQA_INSTRUCTION = (
    "Return your final response within \\boxed{} and only include the letter choice (A, B, C, or D) "
    "as your final response."
)
CODE_STDIN_PREFIX = (
    "Generate an executable Python function generated from the given prompt. The function should take "
    "stdin as input and print the output. Simply call the function after the definition."
)
CODE_CALL_PREFIX = (
    "Generate an executable Python function generated from the given prompt. Return the function body "
    "without invoking it at the final solution."
)
CHOICE_LETTERS = "ABCDEFGHIJKLMNOP"


def math_question(problem: str, question_first: bool = False) -> str:
    """The harness's math prompt (MATH500, AIME, AMC, OlympiadBench), as Bespoke's numina rows start.
    `question_first`: the fork's AIME25 prompt, the question then the instruction without its final period."""
    if question_first:
        return f"{problem}\n{MATH_INSTRUCTION.removesuffix('.')}"
    return f"{MATH_INSTRUCTION} {problem}"


def mmlu_pro_question(question: str, options: list[str]) -> str:
    """MMLU-Pro as the harness asks it: the boxed instruction, the question, `Answer Choices: (A) .. (B) ..`."""
    listed = " ".join(f"({CHOICE_LETTERS[i]}) {str(o).strip()}" for i, o in enumerate(options))
    return f"{MATH_INSTRUCTION} {question}\nAnswer Choices: {listed}"


def gpqa_question(question: str, options: list[str]) -> str:
    """GPQA-Diamond as the harness asks it: letter-only instruction, the question, `A) .., B) ..`."""
    listed = ", ".join(f"{CHOICE_LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"{GPQA_INSTRUCTION} {question}\n{listed}"


def code_question(question: str, starter_code: str = "", call_based: bool = False) -> str:
    """A LiveCodeBench prompt: the harness's stdin / call prefix, the question, then the starter code
    (the harness omits it; strict mode keeps it, as Bespoke's code rows do, so the function name is known;
    `parity: official` passes none)."""
    prefix = CODE_CALL_PREFIX if call_based else CODE_STDIN_PREFIX
    starter = f"\n{starter_code}" if starter_code else ""
    return f"{prefix} {question}{starter}"


def _posterior_tags(template: PosteriorTemplate) -> tuple[str, str, str]:
    if template == "PB":
        return PB_SYSTEM, BEGIN_THOUGHT, END_THOUGHT
    if template == "PA":
        return PA_SYSTEM, BEGIN_EXPLANATION, END_EXPLANATION
    raise ValueError(f"unknown posterior template {template!r}; use 'PA' or 'PB'")


def posterior_prompt(question: str, solution: str, template: PosteriorTemplate) -> str:
    """q_phi(z | x, y'): the hint y' (reference solution) is prefilled before the thought."""
    system, begin, _ = _posterior_tags(template)
    return chat(system, question, f"{BEGIN_SOLUTION}{solution}{END_SOLUTION}{SEP}{begin}{SEP}")


def posterior_response(think: str, template: PosteriorTemplate) -> str:
    """The q_phi SFT target: the thought closed by its end tag."""
    return think + _posterior_tags(template)[2]


def posterior_stop(template: PosteriorTemplate) -> str:
    return _posterior_tags(template)[2]


def cut_think(response: str) -> tuple[str, bool]:
    """Think span = text before the first `<|end_of`; the flag says whether the tag was there at all."""
    i = response.find(END_OF)
    return (response, False) if i < 0 else (response[:i], True)


def rollout_prompt(question: str, think: str) -> str:
    """pi_theta0 continues from prompt + think + `<|end_of` and should write `_thought|>...<|end_of_solution|>`."""
    return pi_prompt(question) + think + END_OF


def reference_answer(solution: str) -> str:
    """The continuation after `<|end_of` that carries the reference solution (the GML answer, method.md §1)."""
    return f"{END_THOUGHT[len(END_OF) :]}{SEP}{BEGIN_SOLUTION}{solution}{END_SOLUTION}"


def split_stratos(assistant: str) -> tuple[str, str]:
    """A Bespoke-Stratos assistant text -> (think, solution), the inverse of `pi_response` after the prefill.

    Raises ValueError naming the missing or misordered tag."""
    positions = [assistant.find(tag) for tag in (BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION)]
    names = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
    for pos, name in zip(positions, names, strict=True):
        if pos < 0:
            raise ValueError(f"missing {name}")
    if positions != sorted(positions):
        raise ValueError("tags out of order")
    think = assistant[positions[0] + len(BEGIN_THOUGHT) : positions[1]]
    think = think.removeprefix(SEP)  # the prompt already ends with the two newlines
    solution = assistant[positions[2] + len(BEGIN_SOLUTION) : positions[3]]
    return think, solution


def parse_pi_response(response: str) -> tuple[str, str | None]:
    """A pi_theta completion (after the prompt) -> (think, solution or None when unfinished)."""
    think, _ = cut_think(response)
    return think, extract_solution(response)


def extract_solution(text: str) -> str | None:
    start = text.rfind(BEGIN_SOLUTION)
    if start < 0:
        return None
    body = text[start + len(BEGIN_SOLUTION) :]
    end = body.find(END_SOLUTION)
    return body if end < 0 else body[:end]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None when absent or unclosed."""
    for marker in ("\\boxed", "\\fbox"):
        start = text.rfind(marker)
        if start < 0:
            continue
        i = start + len(marker)
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth, j = 0, i
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None
    return None
