"""Bad specs: each must raise SpecError at an exact line and column, with a clear message.

Every error prints as `file:line:col: error: message`, then the offending line,
a caret under the column, and a hint. The table below pins the position and a
piece of the message (and, where it matters, of the hint) for each kind of
mistake; a Hypothesis property then checks that no malformed text makes the
compiler fail with anything but SpecError.
"""
from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optdsl.errors import SpecError
from optdsl.pipeline import compile_source

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.opt"))
FILENAME = "bad.opt"

# Line 1 header, line 2 hypers, line 3 state: the first statement is on line 4.
H = "optimizer Bad\nhyper lr = 1e-3 in [0, inf), b1 = 0.9 in [0, 1)\nstate m\n"
M = "m = lerp(m, g, 1 - b1)\n"  # line 4 in most cases: a valid first statement
LONG = "m = lerp(m, g, 1 - b1 * 2 * 3 * 4 * 5 * 6 * 7 * 8 * 9 * 10 * 11 * 12)"

# (id, spec text, line, column, a piece of the message, a piece of the hint or None)
CASES = [
    # ---- syntax ----
    ("missing-operand", H + M + "p -= lr *\n", 5, 10, "expected an expression after the operator", "finish"),
    ("missing-operand-eof", H + M + "p -= lr * m -", 5, 13, "expected an expression after the operator", None),
    ("missing-rhs", H + M + "p -=\np -= g\n", 5, 5, "expected an expression after the operator", None),
    ("unclosed-paren", H + M + "p -= lr * (m + g\n", 5, 11, "unclosed parenthesis", "')'"),
    ("unclosed-paren-runs-on", H + "m = lerp(m, g, 1 - b1\np -= lr * m\n", 4, 9, "unclosed parenthesis",
     "read as part of it"),
    ("chained-comparison", H + M + "mask = g < m < lr\np -= lr * mask\n", 5, 14, "comparisons do not chain",
     "(a < b) * (b < c)"),
    ("chained-equality", H + M + "mask = g == m != lr\np -= lr * mask\n", 5, 15, "comparisons do not chain",
     None),
    ("two-statements", H + "m = lerp(m, g, 1 - b1) p -= lr * m\n", 4, 24, "two statements run together",
     "newline or ';'"),
    ("two-statements-long-line", H + LONG + " p -= lr * m\n", 4, len(LONG) + 2, "two statements run together",
     None),
    ("two-declarations", "optimizer Bad\nhyper a = 1 b = 2\np -= a * b * g\n", 2, 13,
     "two statements run together", None),
    ("bad-character", H + M + "p -= lr $ m\n", 5, 9, "unexpected character '$'", None),
    ("bad-character-tab", H + M + "\tp -= lr @ m\n", 5, 10, "'@' is not an operator of optdsl", "mm(a, b)"),
    ("missing-header", "hyper lr = 1\np -= lr * g\n", 1, 1, "a spec starts with 'optimizer NAME'",
     "optimizer MyName"),
    ("missing-header-after-comment", "# a comment\n\nstate m\nm = g\np -= m\n", 3, 1,
     "a spec starts with 'optimizer NAME'", None),
    ("hyper-without-default", "optimizer Bad\nhyper lr\np -= g\n", 2, 9, "a hyperparameter needs a default value",
     "hyper NAME = NUMBER"),
    ("hyper-default-not-number", "optimizer Bad\nhyper lr = b\np -= g\n", 2, 12,
     "a hyperparameter default must be a number", None),
    ("range-missing-comma", "optimizer Bad\nhyper lr = 1 in [0 1]\np -= lr * g\n", 2, 20, "malformed range",
     "[lo, hi]"),
    ("range-one-bound", "optimizer Bad\nhyper lr = 1 in [0]\np -= lr * g\n", 2, 19, "malformed range", None),
    ("range-name-bound", "optimizer Bad\nhyper lr = 1 in [a, 1]\np -= lr * g\n", 2, 18, "malformed range", None),
    ("range-unclosed", "optimizer Bad\nhyper lr = 1 in [0, 1\np -= lr * g\n", 2, 17, "unclosed range bracket",
     "close the range"),
    ("string-outside-header", H + M + 'p -= lr * "m"\n', 5, 11, "a string is allowed only after 'optimizer NAME'",
     "remove the quotes"),
    ("unterminated-string", 'optimizer Bad "Adam-like\np -= g\n', 1, 15, "unterminated string", "close the string"),
    ("malformed-statement", H + M + "p m\n", 5, 3, "malformed statement", None),
    # ---- names ----
    ("unknown-name", H + "m = lerp(m, g, 1 - bta1)\np -= lr * m\n", 4, 20, "unknown name 'bta1'",
     "did you mean 'b1'?"),
    ("unknown-name-no-suggestion", H + M + "p -= lr * zzzzzz\n", 5, 11, "unknown name 'zzzzzz'", "declare it"),
    ("unknown-function", H + M + "p -= lr * sqr(m)\n", 5, 11, "unknown function 'sqr'", "did you mean 'sqrt'?"),
    ("wrong-arity", H + "m = lerp(m, g)\np -= lr * m\n", 4, 5, "lerp() takes 3 arguments, got 2", "lerp(x, y, z)"),
    ("wrong-arity-unary", H + M + "p -= lr * sqrt(m, g)\n", 5, 11, "sqrt() takes 1 argument, got 2", None),
    ("function-without-call", H + M + "p -= lr * sqrt * m\n", 5, 11, "'sqrt' is a function; call it as sqrt(...)",
     "sqrt(x)"),
    # ---- assignments ----
    ("assign-hyper", H + M + "lr = 2 * lr\np -= lr * m\n", 5, 1, "cannot assign the hyperparameter 'lr'",
     "read-only"),
    ("assign-t", H + M + "t = 2\np -= lr * m\n", 5, 1, "cannot assign the built-in 't'", None),
    ("assign-loss", H + M + "loss += 1\np -= lr * m\n", 5, 1, "cannot assign the built-in 'loss'", None),
    ("assign-function", H + M + "sqrt = m\np -= lr * sqrt\n", 5, 1, "cannot assign 'sqrt': it is a function",
     None),
    ("assign-keyword", H + M + "lambda = m\np -= lr * m\n", 5, 1, "'lambda' is reserved", None),
    ("read-before-assign", H + M + "p -= lr * u\nu = m\n", 5, 11, "local 'u' is read before it is assigned",
     "state u"),
    ("read-self-before-assign", H + M + "u = u + m\np -= lr * u\n", 5, 5, "local 'u' is read before it is assigned",
     None),
    ("aug-assign-unassigned", H + M + "x += 1\np -= lr * x * m\n", 5, 1, "'x' is updated with '+=' before it is "
     "assigned", "assign 'x = ...' first"),
    ("p-never-assigned", H + M, 1, 11, "'Bad' never assigns p", "p -= lr * g"),
    # ---- declarations ----
    ("hyper-twice", "optimizer Bad\nhyper lr = 1\nhyper lr = 2\np -= lr * g\n", 3, 7,
     "'lr' is declared twice (already a hyper)", None),
    ("hyper-and-state", "optimizer Bad\nhyper lr = 1\nstate lr\np -= lr * g\n", 3, 7,
     "'lr' is declared twice (already a hyper)", None),
    ("state-twice-one-line", "optimizer Bad\nstate m, m\nm = g\np -= m\n", 2, 10,
     "'m' is declared twice (already a state)", None),
    ("default-outside-range", "optimizer Bad\nhyper lr = 2 in [0, 1]\np -= lr * g\n", 2, 7,
     "the default 2.0 of 'lr' is outside its range [0.0, 1.0]", "widen the range"),
    ("default-on-open-end", "optimizer Bad\nhyper eps = 0 in (0, inf)\np -= g / (1 + eps)\n", 2, 7,
     "is outside its range", None),
    ("empty-range", "optimizer Bad\nhyper lr = 1 in (1, 0)\np -= lr * g\n", 2, 17, "the range (1.0, 0.0) of 'lr' is "
     "empty", "lower bound first"),
    ("empty-range-point", "optimizer Bad\nhyper lr = 0 in (0, 0)\np -= lr * g\n", 2, 17, "of 'lr' is empty",
     "[a, a]"),
    ("state-init-from-g", "optimizer Bad\nstate m = g\nm = lerp(m, g, 0.1)\np -= m\n", 2, 11,
     "a state's initial value cannot use 'g'", "p, hyperparameters and numbers"),
    ("state-init-from-t", "optimizer Bad\nstate m = 2 * t\nm = lerp(m, g, 0.1)\np -= m\n", 2, 15,
     "a state's initial value cannot use 't'", None),
    ("state-init-from-state", "optimizer Bad\nstate m, v = m\nm = g\nv = g\np -= m * v\n", 2, 14,
     "a state's initial value cannot use 'm'", None),
    ("state-never-used", "optimizer Bad\nstate m, v\nm = g\np -= m\n", 2, 10, "state 'v' is declared but never used",
     "remove it"),
    ("declaration-after-statement", "optimizer Bad\np -= g\nhyper lr = 1\n", 3, 7,
     "'hyper' declaration after the first statement", "above the first statement"),
    ("state-after-statement", "optimizer Bad\nhyper lr = 1\np -= lr * g\nstate m\n", 4, 7,
     "'state' declaration after the first statement", None),
    ("hyper-named-like-function", "optimizer Bad\nhyper sqrt = 1\np -= sqrt * g\n", 2, 7,
     "'sqrt' is a function and cannot be declared as a hyper", "sqrt_"),
    ("state-named-like-function", "optimizer Bad\nstate exp\nexp = g\np -= g\n", 2, 7,
     "'exp' is a function and cannot be declared as a state", None),
    ("hyper-python-keyword", "optimizer Bad\nhyper lambda = 1\np -= lambda * g\n", 2, 7,
     "'lambda' is reserved and cannot be a hyper name", "lambda_"),
    ("state-builtin", "optimizer Bad\nstate g\np -= g\n", 2, 7, "'g' is a built-in name", None),
    ("matrix-of-scalars", "optimizer Bad\nhyper lr = 1\np -= mm(lr, 0.5) * g\n", 3, 6,
     "mm() of scalars: matrix work takes tensors", "multiply scalars with '*'"),
    ("hyper-kernel-name", "optimizer Bad\nhyper acc1 = 1\np -= acc1 * g\n", 2, 7,
     "'acc1' is reserved and cannot be a hyper name", "acc1_"),  # a fused kernel's accumulator
    ("class-name-keyword", "optimizer class\np -= g\n", 1, 11, "'class' cannot be a class name", None),
    # ---- checks ----
    ("division-by-literal-zero", "optimizer Bad\np -= g / 0\n", 2, 10, "division by zero", "not zero"),
    ("division-by-zero-expression", "optimizer Bad\nhyper lr = 1\np -= lr * g / (1 - 1)\n", 3, 16,
     "division by zero", None),
    # red-team (issue 12, item 5): SymPy's Mod(x, 0) raised ZeroDivisionError, shown as "a bug in optdsl"
    ("remainder-by-zero", H + M + "p -= lr * (m % 0)\n", 5, 12, "a remainder by zero", "x % 0"),
    ("remainder-by-folded-zero", H + M + "p -= lr * (t % (b1 - b1))\n", 5, 12, "a remainder by zero", None),
    ("name-too-long", H + M + "p -= lr * " + "q" * 101 + "\n", 5, 11, "a name of 101 characters", "shorten"),
    ("class-name-too-long", "optimizer " + "A" * 5000 + "\np -= g\n", 1, 11, "at most 100", None),
    ("every-zero-rounds", H + M + "every 0 {\np -= lr * m\n}\n", 5, 1, "a remainder by zero", None),
]


def _compile_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_source(text, FILENAME)
    return info.value


@pytest.mark.parametrize("text, line, column, message, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_spec(text, line, column, message, hint):
    err = _compile_error(text)
    shown = str(err)
    assert (err.line, err.column) == (line, column), shown
    assert message in err.message, shown
    assert err.hint.strip(), shown
    if hint is not None:
        assert hint in err.hint, shown
    # file:line:col, the offending line, a caret under the column, a hint line
    assert shown.startswith(f"{FILENAME}:{line}:{column}: error: "), shown
    src = text.splitlines()[line - 1].expandtabs(1)
    out = shown.split("\n")
    at = next(i for i, s in enumerate(out) if s.endswith(src) and s.strip() == src.strip())
    caret = out[at + 1]
    assert set(caret.strip()) == {"^"}, shown
    assert caret.index("^") == out[at].index(src) + column - 1, shown
    assert out[-1].strip().startswith("hint: ") and len(out[-1].strip()) > len("hint: "), shown


def test_case_ids_are_distinct_and_many():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) >= 25
    assert len({c[1] for c in CASES}) == len(CASES)  # distinct spec texts


def test_parse_error_has_filename_and_no_lark_types():
    err = _compile_error("optimizer Bad\np -= (g\n")
    assert type(err) is SpecError and err.filename == FILENAME
    assert "lark" not in str(err).lower() and "Token(" not in str(err)


def test_error_in_later_statement_gets_the_same_message_as_in_the_first():
    first = _compile_error("optimizer Bad\np -= g *\n")
    later = _compile_error("optimizer Bad\nhyper lr = 1\nstate m\nm = g\nx = g\np -= lr * m *\n")
    assert first.message == later.message == "syntax error: expected an expression after the operator"


# ---------------------------------------------------------------------------------------------
# Property: malformed text raises SpecError (or compiles); nothing else ever escapes.
# ---------------------------------------------------------------------------------------------
VOCAB = ["optimizer", "hyper", "state", "in", "inf", "-inf", "p", "g", "t", "loss", "m", "v", "lr", "b1", "eps",
         "X", "=", "+=", "-=", "*=", "/=", "+", "-", "*", "/", "^", "**", "<", "<=", ">", ">=", "==", "!=",
         "(", ")", "[", "]", ",", ";", "\n", "\r\n", "# note\n", '"doc"', '"a;b#c"', '"', "0", "1", "2", ".5",
         "1e-8", "1e400", "3.", "sqrt", "rsqrt", "log", "log1p", "exp", "abs", "sign", "lerp", "where", "min",
         "max", "clamp", "atan2", "norm", "sum", "mean", "rms", "amax", "square", "lambda", "class", "sqr",
         " ", "\t", "$", "@", "é", "\x00", "\\"]
SPEC_TEXTS = [p.read_text(encoding="utf-8") for p in SPECS]


def _assert_only_spec_errors(text: str) -> None:
    try:
        compiled = compile_source(text, "fuzz.opt")
    except SpecError as err:
        shown = str(err)
        assert shown.startswith("fuzz.opt"), shown
        assert "hint: " in shown or not err.hint
        return
    compile(compiled.python, "generated.py", "exec")  # what compiles is valid Python


@st.composite
def mutated_spec(draw):
    chars = list(draw(st.sampled_from(SPEC_TEXTS)))
    for _ in range(draw(st.integers(1, 6))):
        if not chars:
            break
        i = draw(st.integers(0, len(chars) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace"]))
        if op == "delete":
            del chars[i]
        elif op == "duplicate":
            chars.insert(i, chars[i])
        elif op == "swap":
            j = draw(st.integers(0, len(chars) - 1))
            chars[i], chars[j] = chars[j], chars[i]
        elif op == "insert":
            chars.insert(i, draw(st.sampled_from(VOCAB)))
        else:
            chars[i] = draw(st.sampled_from(VOCAB))
    return "".join(chars)


token_soup = st.lists(st.sampled_from(VOCAB), max_size=40).map(" ".join)
headed_soup = token_soup.map(lambda s: "optimizer X\n" + s)
printable = st.text(alphabet=string.printable, max_size=80)
malformed = st.one_of(token_soup, headed_soup, printable, mutated_spec())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed)
def test_malformed_text_raises_only_spec_error(text):
    _assert_only_spec_errors(text)


def test_every_single_character_deletion_of_a_spec():
    """Exhaustive for one spec: delete each character in turn."""
    text = (Path(__file__).resolve().parent.parent / "specs" / "adamw.opt").read_text(encoding="utf-8")
    rng = random.Random(0)
    positions = sorted(rng.sample(range(len(text)), 120))
    for i in positions:
        _assert_only_spec_errors(text[:i] + text[i + 1:])


@pytest.mark.parametrize("text", [
    "", "\n\n", "# only a comment\n", "optimizer", "optimizer X", 'optimizer X "', "optimizer X\np -= g\n\x00",
    "optimizer X\np -= g *", "optimizer X\np -= ((((g", "optimizer X\np -= g)))", "optimizer X\nhyper a = 1 in [",
    "optimizer X\np -= g * inf", "optimizer X\np -= g * 1e400", "optimizer X\np -= g * (inf - inf)",
    "optimizer X\np -= g * log(0)", "optimizer X\np -= g * sqrt(-1)", "optimizer X\np = 0",
    "optimizer X\np -= lerp(g, 1, 0)", "optimizer X\nhyper b = 0.5\np = lerp(b, g, 2)",
    "optimizer X\np -= g * min(sum(1), -1)", "optimizer X\np -= g * 1e308^2", "optimizer X\np -= g^inf",
    "optimizer X\np -= g", "optimizer X\np -= g * loss",
])
def test_edge_texts(text):
    _assert_only_spec_errors(text)


def test_matrix_work_with_one_scalar_operand_is_a_spec_error():
    """Found by tests/test_fuzz.py: mm(col_mean(r), eps1) compiled and torch.matmul refused a 0-dim operand."""
    err = _compile_error("optimizer Bad\nhyper eps = 1\nstate m\nm = g\np -= mm(m, eps) * g\n")
    assert (err.line, err.column) == (5, 12) and "mm() of a scalar" in err.message, str(err)
