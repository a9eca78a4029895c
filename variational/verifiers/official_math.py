"""The official harness's math grader (grader="official" in `check_answers`): SkyThought's `math_equal` on
answers read by `extract_answer` / `strip_answer_string` (variational/verifiers/official_answer.py),
reimplemented from the behaviour of SkyThought 0d190f1 skythought/evals/util/math_parsing_util.py, which
the variational-reasoning fork (its verify_parallel.py and eval handlers) uses unchanged (method.md §10).

In: one model output, one gold and how the gold is written (`gold_form`). Out: (the prediction as read, the
gold as read, correct) per pair (`check_official_pair`); `OfficialMathPool` runs pairs in worker processes
with a hard deadline (variational/verifiers/procpool.py), as the official code runs each pair in a child
process under a timeout. The two official callers read golds differently:
  - "answer" (eval: MathTaskHandler.check_correctness): gold `strip_answer_string(answer)`, prediction
    `strip_answer_string(extract_answer(output))` (stripped twice);
  - "solution" (rollouts: verify_parallel.py `_check_numina_correctness`; MathEqualScorer): gold
    `extract_answer(solution)` with its "he answer is" / last-number fallbacks, prediction `extract_answer`.
Symbolic parsing: the official `parse_latex` always fails there (latex2sympy2 pins antlr 4.7.2, sympy's LaTeX
parser needs 4.11), so it is skipped; `parse_expr` runs in a restricted namespace (it evals its input: see
`_sympy_expr`); the official `latex2sympy2` is emulated on latex2sympy2_extended, the one in our venv
(variational/verifiers/official_latex.py; agreement measured in bench/RESULTS.md, "official math grader").
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Literal

from variational.verifiers.official_answer import extract_answer, strip_answer_string
from variational.verifiers.official_latex import latex_to_sympy
from variational.verifiers.procpool import DeadlinePool, Outcome

GoldForm = Literal["answer", "solution"]
GOLD_FORMS: tuple[GoldForm, ...] = ("answer", "solution")
CHOICES = ("A", "B", "C", "D", "E")
REL_TOL = 1e-4  # numeric_equal: math.isclose(reference, prediction, rel_tol=1e-4)
MAX_EXTRACTED = 2_000


# ================================================================ one pair
def read_prediction(text: str, gold_form: GoldForm) -> str:
    """The model output as the official caller reads it (see the module docstring)."""
    pred = extract_answer(text)
    return strip_answer_string(pred) if gold_form == "answer" else pred


def read_gold(gold: str, gold_form: GoldForm) -> str:
    """A gold as the official caller reads it: a bare answer is only stripped, a solution is read like a
    model output (its last \\boxed{}, else "he answer is", else its last number)."""
    return strip_answer_string(gold) if gold_form == "answer" else extract_answer(gold)


def check_official_pair(text: str | None, gold: str, gold_form: GoldForm = "answer") -> tuple[str, str, bool]:
    """(prediction as read, gold as read, official verdict) of one output against one gold; workers call it.
    A missing output reads as "" (the official code would crash on None; "" keeps the verdict defined)."""
    pred, ref = read_prediction(text or "", gold_form), read_gold(gold, gold_form)
    return pred[:MAX_EXTRACTED], ref[:MAX_EXTRACTED], math_equal(pred, ref)


# ================================================================ math_equal
def math_equal(prediction: str, reference: str) -> bool:
    """SkyThought `math_equal(prediction, reference)` with its defaults (include_percentage, is_close), the
    first rule that decides wins:
    1. equal strings, case and outer spaces aside ("" equals "": an empty prediction matches an empty gold);
    2. a gold letter A-E equal to the prediction's last standalone letter (`choice_answer_clean`);
    3. both numbers (commas dropped, "x%" = x/100): equal within REL_TOL to gold, gold/100 or gold*100,
       and when both are numbers this decides (no symbolic check);
    4. an empty prediction is wrong;
    5. brackets: the same string once brackets are dropped; tuples/intervals equal part by part;
       pmatrix equal cell by cell;
    6. equations: both "l = r" compared as l - (r) up to sign, or a short "x = v" on one side only compared
       by its value;
    7. `symbolic_equal`."""
    if prediction.strip().lower() == reference.strip().lower():
        return True
    if reference in CHOICES and choice_answer_clean(prediction) == reference:
        return True
    pred_num, ref_num = parse_digits(prediction), parse_digits(reference)
    if pred_num is not None and ref_num is not None:
        return any(_numeric_equal(pred_num, r) for r in (ref_num / 100, ref_num, ref_num * 100))
    if not prediction:
        return False
    prediction, reference = prediction.strip(), reference.strip()
    if "pmatrix" in prediction and "pmatrix" not in reference:
        reference = str_to_pmatrix(reference)
    if _equal_without_brackets(prediction, reference):
        return True
    if _equal_by_parts(prediction, reference) or _equal_matrices(prediction, reference):
        return True
    if _equal_equations(prediction, reference):
        return True
    return symbolic_equal(prediction, reference)


def choice_answer_clean(pred: str) -> str:
    """SkyThought `choice_answer_clean`: the last standalone A-E of the upper-cased answer, else the answer
    itself without its outer dots / slashes / colon."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", pred.upper())
    pred = letters[-1] if letters else pred.strip().strip(".")
    return pred.rstrip(".").rstrip("/")


def parse_digits(s: str) -> float | None:
    """SkyThought `parse_digits`: float() of the string without commas (so "1e3", "inf", "1_000" count),
    or of "x%" / "x\\%" as x/100; None when it is not a number."""
    s = s.replace(",", "")
    try:
        return float(s)
    except ValueError:
        pass
    if s.endswith("%"):
        s = s[:-1].removesuffix("\\")
        try:
            return float(s) / 100
        except ValueError:
            pass
    return None


def _numeric_equal(prediction: float, reference: float) -> bool:
    return math.isclose(reference, prediction, rel_tol=REL_TOL)


def str_to_pmatrix(s: str) -> str:
    """SkyThought `str_to_pmatrix`: each "{a,b,...}" group of a gold becomes a one-row pmatrix (commas turned
    into single backslashes, as the official code does)."""
    groups = re.findall(r"\{.*,.*\}", s.strip())
    return ", ".join("\\begin{pmatrix}" + g.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for g in groups)


def _equal_without_brackets(prediction: str, reference: str) -> bool:
    """Equal once ( ) { } are removed (and [ ] at the ends, when the prediction is bracketed and the gold
    does not open with the other kind of bracket)."""
    pred, ref = prediction, reference
    if (prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("(")) or (
        prediction.startswith("(") and prediction.endswith(")") and not reference.startswith("[")
    ):
        pred, ref = pred.strip("[]()"), ref.strip("[]()")
    for bracket in "{}()":
        pred, ref = pred.replace(bracket, ""), ref.replace(bracket, "")
    return pred.lower() == ref.lower()


_BRACKETED = re.compile(r"(\(|\[).+(\)|\])")  # re.match: opens with a bracket, closes one somewhere later


def _equal_by_parts(prediction: str, reference: str) -> bool:
    """Tuples "(a, b)" / "[a, b]" on both sides: first and last characters dropped, equal comma part by part."""
    if not (_BRACKETED.match(prediction) and _BRACKETED.match(reference)):
        return False
    pred_parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
    return len(pred_parts) == len(ref_parts) and all(map(math_equal, pred_parts, ref_parts))


_MATRIX_OPEN = ("\\begin{pmatrix}", "\\begin{bmatrix}")
_MATRIX_CLOSE = ("\\end{pmatrix}", "\\end{bmatrix}")


def _equal_matrices(prediction: str, reference: str) -> bool:
    """Both pmatrix/bmatrix: the same rows (split on \\\\), each the same cells (split on &), cell by cell."""
    if not all(s.startswith(_MATRIX_OPEN) and s.endswith(_MATRIX_CLOSE) for s in (prediction, reference)):
        return False

    def rows(s: str) -> list[str]:
        body = s[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
        return [line.strip() for line in body.split("\\\\") if line.strip()]

    pred_rows, ref_rows = rows(prediction), rows(reference)
    if len(pred_rows) != len(ref_rows):
        return False
    for pred_row, ref_row in zip(pred_rows, ref_rows, strict=True):
        pred_cells, ref_cells = pred_row.split("&"), ref_row.split("&")
        if len(pred_cells) != len(ref_cells) or not all(map(math_equal, pred_cells, ref_cells)):
            return False
    return True


def _equal_equations(prediction: str, reference: str) -> bool:
    """Both one "=": l - (r) symbolically equal up to sign. Else a one-"=" side with a left part of at most
    2 characters ("x = 3") against a side without "=": its right part against the other."""
    if prediction.count("=") == 1 and reference.count("=") == 1:
        pred, ref = (_as_difference(side) for side in (prediction, reference))
        return symbolic_equal(pred, ref) or symbolic_equal(f"-({pred})", ref)
    if prediction.count("=") == 1 and len(prediction.split("=")[0].strip()) <= 2 and "=" not in reference:
        return math_equal(prediction.split("=")[1], reference)
    if reference.count("=") == 1 and len(reference.split("=")[0].strip()) <= 2 and "=" not in prediction:
        return math_equal(prediction, reference.split("=")[1])
    return False


def _as_difference(equation: str) -> str:
    left, right = equation.split("=")
    return f"{left.strip()} - ({right.strip()})"


# ================================================================ symbolic_equal
def symbolic_equal(a: str, b: str) -> bool:
    """SkyThought `symbolic_equal`: both sides parsed (`_to_sympy`; a side that does not parse stays a
    string), then equal when any holds: same str() or ==; .equals() or simplify(a - b) == 0; equations with
    the same |lhs - rhs|; numerically equal (N, REL_TOL); matrices equal once rounded to 3 decimals.
    A side left a string can only match by str(): every other official check raises on it."""
    x, y = _to_sympy(a), _to_sympy(b)
    if _attempt(lambda: str(x) == str(y)):
        return True
    if isinstance(x, str) or isinstance(y, str):
        return False
    checks = (
        lambda: x == y,
        lambda: x.equals(y) or _simplify(x - y) == 0,
        lambda: abs(x.lhs - x.rhs).equals(abs(y.lhs - y.rhs)),
        lambda: _numeric_equal(float(_evalf(x)), float(_evalf(y))),
        lambda: x.shape == y.shape and _round3(x).equals(_round3(y)),
    )
    return any(_attempt(check) for check in checks)


def _attempt(check: Any) -> bool:
    """One official check inside its try/except: an exception (or a None from .equals) is a no."""
    try:
        return bool(check())
    except Exception:
        return False


def _simplify(expr: Any) -> Any:
    from sympy import simplify

    return simplify(expr)


def _evalf(expr: Any) -> Any:
    from sympy import N

    return N(expr)


def _round3(matrix: Any) -> Any:
    return matrix.applyfunc(lambda v: round(v, 3))


def _to_sympy(s: str) -> Any:
    """The official `_parse`: `parse_expr`, then `latex2sympy`, each on the string with "\\\\" turned into
    "\\" first and then as it is; the first that returns wins; the string itself when none does."""
    for parse in (_sympy_expr, latex_to_sympy):
        for candidate in (s.replace("\\\\", "\\"), s):
            try:
                return parse(candidate)
            except Exception:  # RecursionError, TokenError, SyntaxError, TypeError... all mean "not this one"
                continue
    return s


# parse_expr evals its input (Python code). The official code runs it with sympy's full namespace and the
# builtins; here a string that could reach anything beyond arithmetic (a dunder, a quote, attribute access)
# is refused, and the namespace holds only sympy's mathematical objects and a few pure builtins. No real
# answer contains those tokens, so the verdicts do not move (measured: bench/RESULTS.md).
_UNSAFE = re.compile(r"__|['\"`]|\.\s*[A-Za-z_]|\\")
# the builtin FUNCTIONS parse_expr's default namespace adds (types like int are not among them), less those
# that make strings, touch objects or run code; min / max are sympy's Min / Max there too
_SAFE_BUILTINS = ("abs", "all", "any", "divmod", "len", "pow", "round", "sorted", "sum")
_PLAIN_MATH_FUNCTIONS = ("sqrt", "cbrt", "root", "real_root", "gcd", "lcm", "N")


def _sympy_expr(s: str) -> Any:
    from sympy.parsing.sympy_parser import parse_expr

    if _UNSAFE.search(s):
        raise ValueError("not parsed: could run code")
    return parse_expr(s, global_dict=dict(_safe_namespace()))


@functools.cache
def _safe_namespace() -> dict[str, Any]:
    """sympy's public names that are mathematical objects (instances or subclasses of Basic, matrix classes,
    a few plain functions) plus pure builtins; no printer, parser, sympify, plotting or I/O."""
    import builtins

    import sympy

    def is_math(name: str, obj: Any) -> bool:
        if isinstance(obj, sympy.Basic) or name in _PLAIN_MATH_FUNCTIONS:
            return True
        return isinstance(obj, type) and issubclass(obj, (sympy.Basic, sympy.MatrixBase))

    namespace = {n: getattr(sympy, n) for n in sympy.__all__ if is_math(n, getattr(sympy, n))}
    namespace |= {n: getattr(builtins, n) for n in _SAFE_BUILTINS} | {"min": sympy.Min, "max": sympy.Max}
    namespace["__builtins__"] = {}  # eval() would add the real ones
    return namespace


# ================================================================ rows
def row_verdicts(golds_per_row: list[int], outcomes: list[Outcome]) -> list[tuple]:
    """The pairs' outcomes (row by row, one per gold, in order) -> (extracted, correct, status, elapsed_ms)
    per row: correct when ANY gold matched (verify_parallel.py ORs source ground truth and reference answer).
    Statuses, first that applies: ok; gold_unparsable (no gold, or all read as ""); timeout; error;
    no_answer (the output reads as ""); wrong. All but ok are counted wrong officially."""
    verdicts, start = [], 0
    for n in golds_per_row:
        pairs, start = outcomes[start : start + n], start + n
        done = [o.value for o in pairs if o.status == "ok"]
        pred = done[0][0] if done else None
        elapsed = sum(o.elapsed_ms for o in pairs)
        statuses = {o.status for o in pairs}
        if any(correct for _, _, correct in done):
            status = "ok"
        elif not pairs or (len(done) == n and not any(gold for _, gold, _ in done)):
            status = "gold_unparsable"
        elif statuses & {"timeout", "error"}:
            status = "timeout" if "timeout" in statuses else "error"
        else:
            status = "no_answer" if not pred else "wrong"
        verdicts.append((pred or None, status == "ok", status, elapsed))  # "" read: no answer extracted
    return verdicts


# ================================================================ workers
def _warmup() -> None:
    """Worker start: import sympy and the LaTeX parser, build the parse namespace, before the first pair."""
    _to_sympy("\\frac{1}{2}")
    _to_sympy("x+1")


class OfficialMathPool(DeadlinePool):
    """Workers running `check_official_pair` with a hard per-pair deadline (variational/verifiers/procpool.py);
    share one across calls: `with OfficialMathPool(4) as pool: check_answers(df, pool=pool, grader="official")`."""

    def __init__(self, workers: int = 0, memory_mb: int = 4096):
        preload = ["sympy", "latex2sympy2_extended.latex2sympy2", "word2number.w2n"]
        # fresh_after_timeout: officially each pair runs in a new child process; a pair interrupted inside
        # sympy or the LaTeX parser can leave their global state (caches, evaluate flags) half-updated
        super().__init__(
            check_official_pair,
            workers,
            warmup=_warmup,
            preload=preload,
            memory_mb=memory_mb,
            fresh_after_timeout=True,
        )
