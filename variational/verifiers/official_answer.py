"""How the official harness READS a math answer: SkyThought's `extract_answer` and `strip_answer_string`
(SkyThought 0d190f1, skythought/evals/util/math_parsing_util.py; the variational-reasoning fork's copy and
its verify_parallel.py use the same two functions), reimplemented from their behaviour (method.md §10).

In: a model output or a gold (a bare answer, or a whole reference solution). Out: the answer string that
`official_math.math_equal` compares. Every function names the official rule it reproduces, quirks included
(the last-number fallback, the removal of every "and", "inf" turning into "\\infty" inside words): the point
is the official verdict, not a better one. Pure string work; `word2number` is the library the official code
uses to turn number words into digits.
"""

from __future__ import annotations

import re

from word2number import w2n

_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")  # extract_answer's fallback pattern, commas removed first
_MINERVA_OPEN, _MINERVA_CLOSE = "final answer is $", "$. I hope"


# ================================================================ extract_answer
def extract_answer(text: str) -> str:
    """SkyThought `extract_answer(pred_str)`, use_last_number=True: the first rule that applies wins.

    1. Minerva's few-shot form "final answer is $X$. I hope" -> X.
    2. "boxed" anywhere (the thought included) -> the text after the LAST "boxed": its brace group, or up
       to the next "$" when no brace follows; nothing after it -> "" at once (not tidied or stripped).
    3. "he answer is" -> everything after its last occurrence; 4. "final answer is" -> likewise.
    5. "答案是" -> after its first occurrence, up to a blank line.
    6. Otherwise the last number (`-?\\d*\\.?\\d+` with commas removed), or "".
    Then `_tidy` and `strip_answer_string`."""
    text = text.replace("\u043a\u0438", "")  # the "ки" step tag of some PRM data
    if _MINERVA_OPEN in text and _MINERVA_CLOSE in text:
        pred = text.split(_MINERVA_OPEN, 1)[1].split(_MINERVA_CLOSE, 1)[0].strip()
    elif "boxed" in text:
        after = text.split("boxed")[-1]
        if not after:
            return ""
        pred = _brace_group(after) if after[0] == "{" else after.split("$")[0].strip()
    elif "he answer is" in text:
        pred = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        pred = text.split("final answer is")[-1].strip()
    elif "答案是" in text:
        pred = text.split("答案是")[1].strip().split("\n\n")[0].strip()
    else:
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    return strip_answer_string(_tidy(pred))


def _brace_group(after: str) -> str:
    """The content of the brace group `after` opens; an unclosed group runs to the end of the text."""
    depth, out = 1, []
    for c in after[1:]:
        depth += (c == "{") - (c == "}")
        if depth == 0:
            break
        out.append(c)
    return "".join(out)


def _tidy(pred: str) -> str:
    """extract_answer's last steps: join lines (a newline eats the spaces after it), then drop one leading
    ":" and one trailing "." and one trailing "/"."""
    pred = re.sub(r"\n\s*", "", pred)
    if pred.startswith(":"):
        pred = pred[1:]
    if pred.endswith("."):
        pred = pred[:-1]
    if pred.endswith("/"):
        pred = pred[:-1]
    return pred


# ================================================================ strip_answer_string
def strip_answer_string(s: str) -> str:
    """SkyThought `strip_answer_string`: the normalisation both sides get before `math_equal`; each step
    below is one official step, in the official order (a step depends on the ones before it)."""
    s = _latex_spelling(str(s).strip().replace("\n", "").rstrip(".").replace("\\!", ""))
    s = re.sub(r"\\text\{([a-zA-Z]+)\}", _text_number_word, s)
    s = _drop_units(s)
    for token in ("^{\\circ}", "^\\circ", "\\$", "$", "\\(", "\\)"):  # degrees, dollar signs, \( \)
        s = s.replace(token, "")
    s = convert_word_number(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for key in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(key, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    # (the official "strip one pair of brackets around an alphanumeric string" step never fires: a string
    # that starts with a bracket is never isalnum())
    s = _infinity(s).replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:  # the imaginary unit written j
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)  # 2.00x -> 2x, 5.0 -> 5
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(parts := s.split("=")) == 2 and len(parts[0]) <= 2:  # "k = 5" -> "5" (short left side only)
        s = parts[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s).replace(" ", "")
    s = _fix_a_slash_b(_fix_fracs(s))
    s = re.sub(r"\\(?=\-?\d+(\\|\)|,|\]|$))", "", s)  # a backslash before an integer
    s = re.sub(r"thgrade$", "", s)
    return _sort_integer_list(s)


def _latex_spelling(s: str) -> str:
    """Matrices as pmatrix, \\tfrac/\\dfrac as \\frac, \\neq/\\leq/\\geq short, \\left/\\right dropped,
    escaped braces plain."""
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    return s.replace("\\{", "{").replace("\\}", "}")


def convert_word_number(text: str) -> str:
    """SkyThought `convert_word_number`: word2number's reading of the WHOLE string when it finds number
    words in it ("two hundred" -> "200", "073" -> "73"), else the string unchanged."""
    try:
        return str(w2n.word_to_num(text))
    except Exception:  # word2number raises ValueError (and worse) on anything it cannot read
        return text


def _text_number_word(m: re.Match) -> str:
    """`\\text{Five}` -> "5"; any other `\\text{word}` stays as it is."""
    word = m.group(1).lower()
    number = convert_word_number(word)
    return m.group(0) if number == word else number


def _drop_units(s: str) -> str:
    """Squared "cm}^2" / "inches}^2" lose the square, then a trailing `\\text{...}` (from the FIRST \\text{ whose
    group can reach the end) is removed unless that leaves nothing."""
    s = re.sub(r"(cm|inches)\}\^2", r"\1}", s)
    without = re.sub(r"\\text{.*?}$", "", s).strip()
    return without if without and without != s else s


def _infinity(s: str) -> str:
    """Spelt "infinity" -> "\\infty"; without an \\infty, any "inf" becomes one (inside words too)."""
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    return s.replace("+\\inity", "\\infty")


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; a \\frac followed by fewer than two characters
    leaves the whole string unchanged."""
    head, *rest = s.split("\\frac")
    out = [head]
    for sub in rest:
        out.append("\\frac")
        if sub.startswith("{"):
            out.append(sub)
            continue
        if len(sub) < 2:
            return s
        a, b, tail = sub[0], sub[1], sub[2:]
        out.append(f"{{{a}}}{{{b}}}{tail}" if b != "{" else f"{{{a}}}{b}{tail}")
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """A slash "3/4" -> "\\frac{3}{4}" when both sides are integers (or contain "sqrt") written canonically."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = parts
    try:
        a_val = a if "sqrt" in a else int(a)
        b_val = b if "sqrt" in b else int(b)
    except ValueError:
        return s
    if s != f"{a_val}/{b_val}":  # "03/4", " 3/4" and the like stay as they are
        return s
    return f"\\frac{{{a_val}}}{{{b_val}}}"


def _sort_integer_list(s: str) -> str:
    """A bare comma-separated list of integers is sorted ("3,-1,2" -> "-1,2,3")."""
    if not re.fullmatch(r"(\s*-?\d+\s*,)*\s*-?\d+\s*", s):
        return s
    return ",".join(map(str, sorted(int(x) for x in s.split(","))))
