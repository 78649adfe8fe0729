"""Hints say what to write instead (issue 12, item 8): operators and words of other languages,
functions optdsl lacks, and never a declaration's keyword or a block's '{' inside an expression."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optdsl.errors import SpecError
from optdsl.pipeline import compile_source

HEAD = "optimizer X\nhyper lr = 0.1, b = 0.5\nstate m\n"


def error_of(body: str) -> SpecError:
    with pytest.raises(SpecError) as err:
        compile_source(HEAD + body + "\n", "h.opt")
    return err.value


@pytest.mark.parametrize("body, what, column, instead", [
    ("p -= g and m", "and", 8, "(a > 0) * (b > 0)"),
    ("p -= (g > 0) and (m > 0)", "and", 14, "(a > 0) * (b > 0)"),
    ("p -= g && m", "&&", 8, "(a > 0) * (b > 0)"),
    ("p -= g or m", "or", 8, "max(a > 0, b > 0)"),
    ("p -= g || m", "||", 8, "max(a > 0, b > 0)"),
    ("p -= g * not m", "not", 10, "1 - (a > 0)"),
    ("p -= not g", "not", 6, "1 - (a > 0)"),
    ("p -= g * (m ! 0)", "!", 13, "1 - c"),
    ("p -= lr * g if m > 0 else 0", "if", 13, "where(c, a, b)"),
    ("p -= g @ m", "@", 8, "mm(a, b)"),
    ("p -= g // 2", "//", 8, "a / b"),
    ("p -= g * m.sum()", ".", 11, "sum(x)"),
])
def test_foreign_operators_say_what_to_write(body, what, column, instead):
    err = error_of(body)
    assert err.message == f"syntax error: '{what}' is not an operator of optdsl", str(err)
    assert (err.line, err.column) == (4, column), str(err)
    assert instead in err.hint, str(err)


@pytest.mark.parametrize("body, instead", [
    ("p -= tan(g) * m", "sin(x) / cos(x)"), ("p -= atan(g) * m", "atan2(x, 1)"),
    ("p -= relu(g) * m", "max(x, 0)"), ("p -= pow(g, 2) * m", "x^y"), ("p -= clip(g, 0, 1) * m", "clamp(x, lo, hi)"),
    ("p -= ln(m)", "log(x)"),
])
def test_functions_of_other_libraries_say_what_to_write(body, instead):
    err = error_of(body)
    assert err.message.startswith("unknown function") and instead in err.hint, str(err)
    assert "did you mean" not in err.hint  # tan is not tanh, atan not atan2


def test_a_near_miss_still_gets_did_you_mean():
    assert error_of("p -= sqrtt(g)").hint == "did you mean 'sqrt'?"
    assert error_of("p -= lerpp(g, m, b)").hint == "did you mean 'lerp'?"


def test_a_decimal_point_is_not_a_method_call():
    compile_source(HEAD + "p -= g * .5 + 1.5 * m\n", "h.opt")


KEYWORDS_OF_DECLARATIONS = ["eager", "only", "'as'", "'in'", "'{'", "':'"]
PIECES = ["g", "m", "lr", "2", "(", ")", "+", "*", "^", ",", "$", "sqrt(", "max(", "==", "1e-3", "eager", "in", "as"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=8))
def test_hints_inside_an_expression_offer_no_declaration_keywords(pieces):
    try:
        compile_source(HEAD + "p -= g * " + " ".join(pieces) + "\n", "h.opt")
    except SpecError as err:
        if err.line == 4:
            assert not any(k in err.hint for k in KEYWORDS_OF_DECLARATIONS), str(err)


def test_a_declaration_line_still_offers_its_own_keywords():
    state = error_of("state v = 1 $").hint
    assert "eager" in state and "'{'" not in state and "']'" not in state and "only" not in state, state
    hyper = error_of("hyper c = 1 $").hint
    assert "'in'" in hyper and "only" in hyper and "eager" not in hyper and "']'" not in hyper, hyper
    ranged = error_of("hyper c = 1 in [0, 1 $").hint
    assert "eager" not in ranged and "{" not in ranged, ranged


def test_percent_is_the_remainder_now():
    compile_source(HEAD + "p -= (g % 2) * m\n", "h.opt")
