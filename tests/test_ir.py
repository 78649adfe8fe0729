"""The IR printout (snapshots) and the parser's reading of the core language."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from optdsl import ast
from optdsl.ir import format_expr
from optdsl.lower import lower, lower_rules
from optdsl.parse import parse

SPECS = Path(__file__).resolve().parent.parent / "specs"


def ir_text(text: str) -> str:
    return str(lower(parse(text))[0])


# ---- IR snapshots ----
ADAMW_IR = """\
optimizer AdamW
  hyper lr = 0.001 in [0, inf)
  hyper b1 = 0.9 in [0, 1)
  hyper b2 = 0.999 in [0, 1)
  hyper eps = 1e-08 in (0, inf)
  hyper wd = 0.01 in [0, inf) as weight_decay
  hyper amsgrad = False
  hyper betas = (b1, b2)
  state m = 0 as exp_avg
  state v = 0 as exp_avg_sq
  in p·0, g·0, m·0, v·0, t
  m·1 = lerp(m·0, g·0, 1 - b1)
  v·1 = lerp(v·0, g·0^2, 1 - b2)
  p·1 = p·0 - lr * wd * p·0
  p·2 = p·1 - lr * (m·1 / (1 - b1^t)) / (sqrt(v·1 / (1 - b2^t)) + eps)
  out p = p·2, m = m·1, v = v·1"""

LION_IR = """\
optimizer Lion
  hyper lr = 0.0001 in [0, inf)
  hyper b1 = 0.9 in [0, 1]
  hyper b2 = 0.99 in [0, 1]
  hyper wd = 0 in [0, inf) as weight_decay
  hyper betas = (b1, b2)
  state m = 0 as exp_avg
  in p·0, g·0, m·0, t
  p·1 = p·0 - lr * wd * p·0
  p·2 = p·1 - lr * sign(lerp(m·0, g·0, 1 - b1))
  m·1 = lerp(m·0, g·0, 1 - b2)
  out p = p·2, m = m·1"""


def test_adamw_ir():
    """AdamW's first rule (amsgrad=False; the second is AMSGrad's)."""
    (cond, program), _ = lower_rules(parse((SPECS / "adamw.opt").read_text(encoding="utf-8")))[0]
    assert format_expr(cond) == "amsgrad == 0" and str(program) == ADAMW_IR


def test_lion_ir():
    assert ir_text((SPECS / "lion.opt").read_text(encoding="utf-8")) == LION_IR


def test_ir_of_locals_scalars_state_inits_and_loss():
    text = """optimizer Toy "a toy"
hyper lr = 0.5 in (0, 1], b1 = 0.9
state v2 = lr * p, m
bc = 1 - b1^t
g *= loss
m = lerp(m, g, 1 - b1)
m /= bc
v2 += -m^2
p -= lr * where(m * g > 0, m, 0) / (1 + v2)
"""
    assert ir_text(text) == """\
optimizer Toy
  hyper lr = 0.5 in (0, 1]
  hyper b1 = 0.9 in (-inf, inf)
  state v2 = lr * p·0
  state m = 0
  in p·0, g·0, v2·0, m·0, t, loss
  bc·1 = 1 - b1^t    # scalar
  g·1 = g·0 * loss
  m·1 = lerp(m·0, g·1, 1 - b1)
  m·2 = m·1 / bc·1
  v2·1 = v2·0 + -m·2^2
  p·1 = p·0 - lr * where(m·2 * g·1 > 0, m·2, 0) / (1 + v2·1)
  out p = p·1, v2 = v2·1, m = m·2"""


# a loop kept as a loop (matrix work, counted by k) that swaps two carried values each round
SPIN = (Path(__file__).resolve().parent / "specs" / "lang" / "spin.opt").read_text()

# A `repeat` counted by a hyperparameter with matrix work in its body is kept as a loop, in the
# loop-carried form (optdsl/ir.py): the body once, between a `loop` per carried value (x and y:
# assigned in the body, visible before it) and a `loop_end` per carried value; s, a local of the
# body alone, is not visible after it.
SPIN_IR = """\
optimizer Spin
  hyper k = 3 in (-inf, 10)
  in p·0, g·0, t
  x·1 = g·0
  y·1 = 0.5 * g·0
  x·2 = loop(0, 0, k, x·1)
  y·2 = loop(0, 1, k, y·1)
    s·1 = x·2
    x·3 = 0.5 * y·2 + 0.1 * mm(mm(x·2, T(y·2)), x·2)
    y·3 = s·1
  x·4 = loop_end(x·2, x·3)
  y·4 = loop_end(y·2, y·3)
  p·1 = p·0 - 0.01 * (x·4 + y·4)
  out p = p·1"""


def test_kept_loop_ir():
    assert ir_text(SPIN) == SPIN_IR
    # element-wise work alone is unrolled (each round guarded), as before
    unrolled = ir_text(SPIN.replace("mm(mm(x, T(y)), x)", "x * y").replace("(-inf, 10)", "[0, 4]"))
    assert "loop" not in unrolled and "where(k >= 2, " in unrolled


def test_every_spec_lowers_to_ssa():
    from optdsl.lower import lower_rules
    for path in sorted(SPECS.glob("*.opt")):
        rules, _ = lower_rules(parse(path.read_text(encoding="utf-8")))  # one program per rule by shape
        for _, program in rules:
            outs = [eq.out for eq in program.eqns]
            assert len(outs) == len(set(outs)), path  # each name is defined once
            assert not set(outs) & set(program.inputs), path
            assert dict(program.outputs)["p"] in outs, path


# ---- parser: expressions ----
def show(e: ast.Expr) -> str:
    """Fully parenthesised, so the tree's shape is visible."""
    if isinstance(e, ast.Num):
        return repr(e.value)
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Neg):
        return f"(-{show(e.operand)})"
    if isinstance(e, ast.BinOp):
        return f"({show(e.left)} {e.op} {show(e.right)})"
    return f"{e.func}({', '.join(show(a) for a in e.args)})"


def expr(source: str) -> str:
    spec = parse(f"optimizer X\nx = {source}\np -= x\n")
    return show(spec.body[0].value)


@pytest.mark.parametrize("source, tree", [
    ("-a^b", "(-(a ^ b))"),
    ("a^-b", "(a ^ (-b))"),
    ("a^b^c", "(a ^ (b ^ c))"),
    ("a^-b^c", "(a ^ (-(b ^ c)))"),
    ("-a^-b", "(-(a ^ (-b)))"),
    ("--a", "(-(-a))"),
    ("a - -b", "(a - (-b))"),
    ("-a * b", "((-a) * b)"),
    ("u * g > 0", "((u * g) > 0.0)"),
    ("a + b < c - d", "((a + b) < (c - d))"),
    ("a - b - c", "((a - b) - c)"),
    ("a / b / c", "((a / b) / c)"),
    ("a / b * c", "((a / b) * c)"),
    ("a + b * c", "(a + (b * c))"),
    ("(a + b) * c", "((a + b) * c)"),
    ("a * b ^ 2", "(a * (b ^ 2.0))"),
    ("sqrt(a)^2", "(sqrt(a) ^ 2.0)"),
    ("f(a, b + c, -d)", "f(a, (b + c), (-d))"),
    ("(a < b) * (b < c)", "((a < b) * (b < c))"),
    ("a <= b", "(a <= b)"), ("a >= b", "(a >= b)"), ("a == b", "(a == b)"), ("a != b", "(a != b)"),
    ("a > b", "(a > b)"), ("a < b", "(a < b)"),
])
def test_precedence(source, tree):
    assert expr(source) == tree


@pytest.mark.parametrize("caret, stars", [("a^b", "a**b"), ("a^b^c", "a**b**c"), ("-a^-b", "-a**-b"),
                                          ("a * b^2", "a * b**2"), ("a^b^c", "a ** b ^ c")])
def test_double_star_is_caret(caret, stars):
    assert expr(caret) == expr(stars)


@pytest.mark.parametrize("source, value", [
    ("3", 3.0), ("0.9", 0.9), (".5", 0.5), ("1e-8", 1e-8), ("1E+3", 1000.0), ("2.5e2", 250.0), ("3.", 3.0),
    ("inf", math.inf), ("0", 0.0),
])
def test_numbers(source, value):
    spec = parse(f"optimizer X\nx = {source}\np -= x * g\n")
    num = spec.body[0].value
    assert isinstance(num, ast.Num) and num.value == value


def test_negative_number_in_an_expression_is_a_negation():
    assert expr("-1e-8") == "(-1e-08)"
    assert expr("-inf") == "(-inf)"


# ---- parser: declarations ----
def test_hyper_and_range_forms():
    spec = parse("optimizer X\nhyper a = 1 in [0, 1], b = .5 in (0, 1), c = 2 in [1, inf), d = -1 in (-inf, 0]\n"
                 "hyper e = inf in [0, inf], f = 3\np -= (a + b + c + d + e + f) * g\n")
    got = {h.name: (h.default, None if h.range is None else (h.range.lo, h.range.hi, h.range.lo_closed,
                                                                h.range.hi_closed)) for h in spec.hypers}
    assert got == {
        "a": (1.0, (0.0, 1.0, True, True)),
        "b": (0.5, (0.0, 1.0, False, False)),
        "c": (2.0, (1.0, math.inf, True, False)),
        "d": (-1.0, (-math.inf, 0.0, False, True)),
        "e": (math.inf, (0.0, math.inf, True, True)),
        "f": (3.0, None),
    }


def test_state_forms():
    spec = parse("optimizer X\nhyper a = 1\nstate m, slow = p, acc = a * 2\nm = g\nslow = p\nacc += g\n"
                 "p -= m + slow + acc\n")
    assert [s.name for s in spec.states] == ["m", "slow", "acc"]
    assert spec.states[0].init is None
    assert show(spec.states[1].init) == "p"
    assert show(spec.states[2].init) == "(a * 2.0)"


def test_declarations_in_any_order_after_the_header():
    a = parse("optimizer X\nstate m\nhyper lr = 1\nstate v\nhyper b = 2\nm = g\nv = g\np -= lr * b * m * v\n")
    b = parse("optimizer X\nhyper lr = 1\nhyper b = 2\nstate m, v\nm = g\nv = g\np -= lr * b * m * v\n")
    assert [h.name for h in a.hypers] == [h.name for h in b.hypers] == ["lr", "b"]
    assert [s.name for s in a.states] == [s.name for s in b.states] == ["m", "v"]
    assert ir_text_of(a) == ir_text_of(b)


def ir_text_of(spec: ast.Spec) -> str:
    return str(lower(spec)[0])


def test_header_name_and_docstring():
    spec = parse('optimizer MyOpt "Adam; but # not a comment"\np -= g\n')
    assert spec.name == "MyOpt" and spec.doc == "Adam; but # not a comment"
    assert parse("optimizer MyOpt\np -= g\n").doc == ""


def test_statement_forms():
    spec = parse("optimizer X\nstate m\nm = g\nm += g\nm -= g\nm *= 2\nm /= 2\np -= m\n")
    assert [(a.target, a.op) for a in spec.body] == [("m", "="), ("m", "+="), ("m", "-="), ("m", "*="),
                                                     ("m", "/="), ("p", "-=")]


# ---- parser: lexical ----
REFERENCE = "optimizer X\nhyper lr = 1e-3 in [0, inf)\nstate m\nm = lerp(m, g, 0.1)\np -= lr * m\n"


@pytest.mark.parametrize("variant", [
    "optimizer X; hyper lr = 1e-3 in [0, inf); state m; m = lerp(m, g, 0.1); p -= lr * m",
    "optimizer X;;\n;hyper lr = 1e-3 in [0, inf)\nstate m\nm = lerp(m, g, 0.1); p -= lr * m;\n",
    "# leading comment\n\n\noptimizer X  # the name\nhyper lr = 1e-3 in [0, inf) # a range\n# between\n"
    "state m\n\nm = lerp(m, g, 0.1)  # momentum\np -= lr * m # update",
    "optimizer X\nhyper lr = 1e-3 in [0,\n    inf)\nstate m\nm = lerp(\n  m,\n  g,  # comment inside\n  0.1\n)\n"
    "p -= lr * (\n  m\n)\n",
    "optimizer X\r\nhyper lr = 1e-3 in [0, inf)\r\nstate m\r\nm = lerp(m, g, 0.1)\r\np -= lr * m\r\n",
    "  optimizer X\n\thyper lr = 1e-3 in [0, inf)\n  state m\n    m = lerp(m, g, 0.1)\np -= lr  *  m",
    "optimizer X\nhyper lr = 1e-3 in [ 0 , inf )\nstate m\nm=lerp(m,g,0.1)\np-=lr*m\n",
])
def test_layout_does_not_change_the_meaning(variant):
    assert ir_text(variant) == ir_text(REFERENCE)


def test_continuation_in_nested_parentheses():
    spec = parse("optimizer X\np -= (g +\n (g *\n  2)\n)\n")
    assert show(spec.body[0].value) == "(g + (g * 2.0))"


def test_spans_are_line_and_column():
    spec = parse("optimizer X\nhyper lr = 1\n\np -= lr *   sqrt(g)\n")
    stmt = spec.body[0]
    assert (stmt.span.line, stmt.span.column) == (4, 1)
    assert (stmt.target_span.line, stmt.target_span.column) == (4, 1)
    call = stmt.value.right
    assert isinstance(call, ast.Call)
    assert (call.span.line, call.span.column, call.span.end_column) == (4, 13, 20)
    assert (call.func_span.column, call.func_span.end_column) == (13, 17)
    assert (spec.hypers[0].span.line, spec.hypers[0].span.column) == (2, 7)
