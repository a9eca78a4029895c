"""The official math grader's LaTeX parser, latex2sympy2 1.9.1, emulated on latex2sympy2_extended (the one in
our venv: latex2sympy2 pins antlr4 4.7.2, math-verify needs 4.13, and one process cannot hold both).

In: an answer string as `official_math.symbolic_equal` hands it over. Out: what latex2sympy2 1.9.1 would
return (a sympy object, or a list for a top-level list), or an exception where it fails. The two parsers
grew apart; each rule below is a measured difference that moved official verdicts (bench/RESULTS.md,
"official math grader"), reproduced from the behaviour of latex2sympy2 1.9.1 (probed outside the repo):
  - it reads the longest leading expression and ignores what follows ("5.<|end_of_solution|>" -> 5);
  - a top-level "a, b" / "a; b" list, bare or in [ ] or { }, is a Python list; "(a, b)" fails (no tuples,
    intervals or sets);
  - "x = v" with a single symbol on the left is v; other equations are solved for each symbol;
  - decimals are exact rationals (1.3 -> 13/10); "2\\frac{1}{2}" is a product, not a mixed number;
  - only its own commands lex, the longest known one first ("\\pit" is \\pi t); a command with no known
    start (\\boxed, \\cup, \\pm ...) fails the parse;
  - \\dfrac and \\tfrac are \\frac, and \\displaystyle, \\quad, \\qquad, ~ and \\, are spaces.
"""

from __future__ import annotations

import functools
import re
from typing import Any

MAX_PREFIX_TRIES = 12  # leading-expression search: cut points tried, longest first (a guard on long text)

# the commands latex2sympy2 1.9.1's lexer reads as one token (probed: every command in shared/data plus its
# grammar's literals); any other command fails its parse or is read as different tokens
_OFFICIAL_COMMAND_NAMES = """Delta Diamond Gamma Lambda Leftrightarrow Longrightarrow Omega Phi Pi Psi Rightarrow Sigma Theta Upsilon
    Xi acute alpha angle begin end arccos arccosh arccot arccsc arcosh arcsec arcsin arcsinh arctan arctanh arsinh
    artanh bar beta binom blacksquare bm boldsymbol breve cdot ceil check chi choose clubsuit cos cosh cot csc
    dbinom ddot delta det diamondsuit div dot ell emptyset epsilon equiv eta exp floor frac gamma gcd ge geq
    geqslant grave hat hbar heartsuit in infty int iota kappa lambda lbrace lbrack lceil lcm le left leq
    leqslant lfloor lgroup lim llcorner ln log longrightarrow lrcorner lvert mathbb mathbf mathbin mathcal
    mathclap mathclose mathellipsis mathfrak mathinner mathit mathnormal mathop mathopen mathord mathpunct
    mathrel mathring mathrlap mathrm mathscr mathsf mathsterling mathtt max measuredangle mho min mleft mod
    mright mu nabla ne neq nu omega omicron operatorname over overline overrightarrow partial phi pi prime
    prod psi rbrace rbrack rceil rfloor rgroup rho right rightarrow rvert sec sigma sin sinh spadesuit sqrt
    square sum surd tan tanh tau tbinom text textit theta tilde times to triangle ulcorner upsilon urcorner
    varepsilon varnothing varphi varpi varrho varsigma vartheta vec vert widecheck widetilde xi zeta"""
OFFICIAL_COMMANDS = frozenset(_OFFICIAL_COMMAND_NAMES.split())
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_SPACES = re.compile(r"\\displaystyle|\\qquad|\\quad|~|\\,")
# a number followed by a fraction or another number: latex2sympy2 multiplies, the extended one reads a mixed
# number and adds ("2\frac{1}{2}" -> 1 there, 5/2 here)
_MIXED_NUMBER = re.compile(r"(\d)(?=\\frac)|(\d)\s+(?=\d)")
# where latex2sympy2 stops reading: a token no expression continues with ("<", ">" and "|" do continue one,
# so "4=0<|end_of_solution|>" fails there)
_JUNK_START = re.compile(r"[.)\]};:?!,]")
# "E" is only the exponent mark of a number there (1.5E3): an E that opens a term fails the parse, one after
# a letter or digit ends the expression ("2E" -> 2)
_OPENING_E = re.compile(r"(?<![A-Za-z\d])E")
_CLOSING_E = re.compile(r"(?<=[A-Za-z\d])E(?![+-]?\d)")


def latex_to_sympy(s: str) -> Any:
    """latex2sympy2 1.9.1's reading of `s` (see the module docstring); raises where it would fail."""
    s = _SPACES.sub(" ", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    s = _as_official_tokens(s)
    without_commands = _COMMAND.sub(lambda m: " " * len(m.group(0)), s)
    if _OPENING_E.search(without_commands):
        raise ValueError("latex2sympy2 reads E only as an exponent mark")
    if closing := _CLOSING_E.search(without_commands):
        s = s[: closing.start()]
    s = _MIXED_NUMBER.sub(lambda m: (m.group(1) or m.group(2)) + "\\cdot ", s)
    if (items := _top_level_list(s)) is not None:  # junk after the list ends its last item
        return [*map(_relation, items[:-1]), _leading_relation(items[-1])]
    return _leading_relation(s)


def _as_official_tokens(s: str) -> str:
    """Commands as latex2sympy2's lexer splits them: the longest known leading command, the rest as letters
    ("\\pit" -> "\\pi t", "\\cotx" -> "\\cot x"). A command with no known start is a lexer error: it fails
    the parse unless the parse has already stopped at a token before it ("0)\\cup{1}" reads 0)."""
    out, last = [], 0
    for m in _COMMAND.finditer(s):
        name = m.group(1)
        known = next((name[:end] for end in range(len(name), 0, -1) if name[:end] in OFFICIAL_COMMANDS), None)
        if known is None:
            if not _JUNK_START.search(s, 0, m.start()):
                raise ValueError(f"latex2sympy2 does not read \\{name}")
            return "".join(out) + s[last : m.start()]
        out += [s[last : m.start()], f"\\{known}", f" {name[len(known) :]}" if known != name else ""]
        last = m.end()
    return "".join(out) + s[last:]


def _top_level_list(s: str) -> list[str] | None:
    """The items of a top-level "a, b, ..." or "a; b; ..." list (bare, or inside [ ] / { } / \\{ \\}), or
    None. Commas inside brackets do not split; "1,000" is a number, not a list."""
    body = s.strip()
    for opening, closing in (("\\{", "\\}"), ("{", "}"), ("[", "]"), ("\\left[", "\\right]")):
        if (
            body.startswith(opening)
            and body.endswith(closing)
            and _balanced(body[len(opening) : -len(closing)])
        ):
            body = body[len(opening) : -len(closing)]
            break
    for separator in (",", ";"):
        items = _split_top_level(body, separator)
        if len(items) > 1 and not (separator == "," and re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", body)):
            return items
    return None


def _split_top_level(s: str, separator: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == separator and depth == 0:
            items.append(s[start:i])
            start = i + 1
    return [*items, s[start:]]


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _leading_relation(s: str) -> Any:
    """The whole string, else its longest leading part that parses (cut where junk can start)."""
    try:
        return _relation(s)
    except Exception:
        pass
    cuts = [m.start() for m in _JUNK_START.finditer(s) if m.start() > 0][::-1][:MAX_PREFIX_TRIES]
    for cut in cuts:
        try:
            return _relation(s[:cut])
        except Exception:
            continue
    raise ValueError("latex2sympy2 reads no leading expression")


def _relation(s: str) -> Any:
    """One relation or expression, converted the way latex2sympy2 1.9.1 returns it."""
    import sympy

    expr = _extended(s)
    if isinstance(expr, sympy.Eq) and not isinstance(expr, bool):
        return _assignment(expr)
    if isinstance(expr, _UNSUPPORTED_TYPES()):
        raise ValueError(f"latex2sympy2 has no {type(expr).__name__}")
    return _exact_decimals(expr)


def _assignment(eq: Any) -> Any:
    """latex2sympy2's "=": with a single symbol on the left, the right side; otherwise the equation solved
    for each of its symbols, as a list of Eq(symbol, value)."""
    import sympy

    lhs, rhs = _exact_decimals(eq.lhs), _exact_decimals(eq.rhs)
    if isinstance(rhs, _UNSUPPORTED_TYPES()):  # "x \in [1, 2]" and the like
        raise ValueError(f"latex2sympy2 has no {type(rhs).__name__}")
    if lhs.is_Symbol:
        return rhs
    equation = lhs - rhs
    return [
        sympy.Eq(symbol, value, evaluate=False)
        for symbol in equation.atoms(sympy.Symbol)
        for value in sympy.solve(equation, symbol)
    ]


def _exact_decimals(expr: Any) -> Any:
    """Floats as the exact rationals latex2sympy2 makes of decimal literals (1.3 -> 13/10)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return expr
    floats = expr.atoms(sympy.Float)
    return expr.xreplace({f: sympy.Rational(str(f)) for f in floats}) if floats else expr


@functools.cache
def _UNSUPPORTED_TYPES() -> tuple[type, ...]:  # noqa: N802 (a constant built lazily: sympy loads in workers)
    import sympy

    return (sympy.Set, sympy.Tuple, sympy.And, sympy.Or, tuple)


def _extended(s: str) -> Any:
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, latex2sympy

    # latex2sympy2 keeps the case of symbols and applies none of the extended parser's normalisations
    config = ConversionConfig(lowercase_symbols=False)
    return latex2sympy(s, normalization_config=None, conversion_config=config)
