"""Domain checks: denominators that can be zero, sqrt/log of values that can be negative,
and the ranges of states proven by induction over steps."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from optdsl import check, ir
from optdsl.lower import lower, lower_rules
from optdsl.parse import parse
from optdsl.pipeline import compile_source
from optdsl.ranges import Interval

SPECS = Path(__file__).resolve().parent.parent / "specs"
CLEAN = ["adam", "adamw", "adamax", "amsgrad", "lion", "adam_atan2", "nsgda", "sgd", "adagrad", "lamb", "adanorm"]

ADAM_HEAD = """optimizer A
hyper lr = 1e-3 in [0, inf)
hyper b1 = 0.9 in [0, 1), b2 = 0.999 in [0, 1)
hyper eps = 1e-8 in (0, inf)
state m, v
m = lerp(m, g, 1 - b1)
v = lerp(v, g^2, 1 - b2)
"""  # the update is line 8


def warnings_of(text: str) -> list[str]:
    return [w.message for w in compile_source(text, "w.opt").warnings]


def domain_warnings(text: str) -> list[str]:
    """Only the SymPy/interval warnings, not the unused-name ones from lowering."""
    program, _ = lower(parse(text))
    return [w.message for w in check.check(program)]


def state_ranges(text: str, rule: int = 0) -> dict[str, Interval]:
    """The range each state is proven to stay in, at the start of any step (of a spec with rules:
    in its rule number `rule`)."""
    (_, program), *_ = lower_rules(parse(text))[0][rule:]
    ranges = check._Ranges(program)
    ranges.prove_states()
    return {s.name: ranges.env[ranges.symbols[ir.ssa_name(s.name, 0)]] for s in program.states}


# ---- the specs themselves ----
@pytest.mark.parametrize("path", sorted(SPECS.glob("*.opt")), ids=lambda p: p.stem)
def test_every_spec_compiles(path):
    compiled = compile_source(path.read_text(encoding="utf-8"), str(path))
    assert compiled.program.name and compiled.python
    compile(compiled.python, str(path), "exec")


@pytest.mark.parametrize("name", CLEAN)
def test_clean_specs_give_no_warnings(name):
    compiled = compile_source((SPECS / f"{name}.opt").read_text(encoding="utf-8"), f"{name}.opt")
    assert compiled.warnings == (), "\n".join(map(str, compiled.warnings))


# ---- denominators ----
def test_adam_without_eps_warns_about_its_denominator():
    text = ADAM_HEAD.replace("hyper eps = 1e-8 in (0, inf)\n", "") + "p -= lr * m / sqrt(v)\n"
    found = compile_source(text, "w.opt").warnings
    assert len(found) == 1, found
    w = found[0]
    assert "denominator 'sqrt(v)' can be zero" in w.message and "[0, inf)" in w.message
    assert (w.span.line, w.span.column) == (7, 15)  # points at sqrt(v)
    assert "eps" in w.hint
    assert str(w).startswith("w.opt:7:15: warning: denominator")
    assert "    p -= lr * m / sqrt(v)\n                  ^^^^^^^" in str(w)


def test_adam_with_positive_eps_does_not_warn():
    assert warnings_of(ADAM_HEAD + "p -= lr * m / (sqrt(v) + eps)\n") == []


def test_eps_that_may_be_zero_warns():
    text = ADAM_HEAD.replace("(0, inf)", "[0, inf)") + "p -= lr * m / (sqrt(v) + eps)\n"
    assert any("denominator 'sqrt(v) + eps' can be zero" in w for w in warnings_of(text))


def test_bias_correction_is_nonzero_for_beta_below_one():
    assert domain_warnings(ADAM_HEAD + "p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)\n") == []


def test_bias_correction_can_be_zero_for_beta_one():
    text = ADAM_HEAD.replace("b1 = 0.9 in [0, 1)", "b1 = 0.9 in [0, 1]")
    found = domain_warnings(text + "p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)\n")
    assert found == ["denominator '1 - b1^t' can be zero (it ranges over [0, 1])"]


def test_adamw_spec_with_closed_beta_range_warns():
    text = (SPECS / "adamw.opt").read_text(encoding="utf-8").replace("b1 = 0.9 in [0, 1)", "b1 = 0.9 in [0, 1]")
    assert any("'1 - b1^t'" in w for w in warnings_of(text))


def test_negative_power_is_a_denominator():
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * v^-1\n") == [
        "denominator 'v' can be zero (it ranges over [0, inf))"]
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * v^(-0.5)\n") == [
        "denominator 'v' can be zero (it ranges over [0, inf))"]
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * (v + eps)^-1\n") == []
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * (v + eps)**-0.5\n") == []


def test_a_where_guard_makes_its_branch_s_denominator_nonzero():
    # LAMB's trust ratio: w / r is only used where w * r > 0
    head = "optimizer A\nhyper lr = 0.1\n"
    assert domain_warnings(head + "w = norm(p)\nr = norm(g)\np -= lr * where(w * r > 0, w / r, 1) * g\n") == []
    assert domain_warnings(head + "r = norm(g)\np -= lr * where(r != 0, 1 / r, 0) * g\n") == []
    assert domain_warnings(head + "r = norm(g)\np -= lr * where(0 < r, 1 / r, 0) * g\n") == []
    # the guard must cover the denominator, on the branch it guards
    unguarded = "denominator 'r' can be zero (it ranges over [0, inf))"
    assert domain_warnings(head + "w = norm(p)\nr = norm(g)\np -= lr * where(w > 0, w / r, 1) * g\n") == [
        unguarded]
    assert domain_warnings(head + "r = norm(g)\np -= lr * where(r > 0, 0, 1 / r) * g\n") == [unguarded]
    assert domain_warnings(head + "r = norm(g)\np -= lr * where(r >= 0, 1 / r, 0) * g\n") == [unguarded]
    assert domain_warnings(head + "r = norm(g)\np -= lr * where(r > 0, 1 / (r * abs(g)), 0) * g\n") == [
        "denominator 'r * abs(g)' can be zero (it ranges over [0, inf))"]


def test_where_narrows_the_range_of_the_value_it_picks():
    # SMMF's normaliser: where(s > 0, s, 1) is never 0, where(s >= 0, s, 1) can be
    head = "optimizer A\nhyper lr = 0.1\ns = sum(abs(g))\n"
    assert domain_warnings(head + "p -= lr * g / where(s > 0, s, 1)\n") == []
    assert domain_warnings(head + "p -= lr * g / where(0 < s, s, 1)\n") == []
    assert domain_warnings(head + "p -= lr * g / where(s >= 0, s, 1)\n") == [
        "denominator 'where(s >= 0, s, 1)' can be zero (it ranges over [0, inf))"]
    assert domain_warnings(head + "p -= lr * g / where(s > 0, abs(g), 1)\n") != []


def test_division_by_a_gradient_warns():
    assert domain_warnings("optimizer A\np -= 1 / g\n") == ["denominator 'g' can be zero (it ranges over (-inf, inf))"]


def test_division_by_a_hyperparameter():
    assert domain_warnings("optimizer A\nhyper a = 1 in (0, inf)\np -= g / a\n") == []
    assert domain_warnings("optimizer A\nhyper a = 1 in [0, inf)\np -= g / a\n") != []
    assert domain_warnings("optimizer A\nhyper a = -1 in [-2, -1]\np -= g / a\n") == []


def test_step_count_is_at_least_one():
    assert domain_warnings("optimizer A\np -= g / t\n") == []
    assert domain_warnings("optimizer A\np -= g / (t - 1)\n") != []


# ---- sqrt, log and friends ----
def test_log_of_gradient_warns():
    found = domain_warnings("optimizer A\np -= log(g)\n")
    assert found == ["log() of 'g', which can be zero or negative (it ranges over (-inf, inf))"]


def test_log_of_second_moment_plus_eps_does_not_warn():
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * log(v + eps)\n") == []
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * log(v)\n") != []  # v may be 0


def test_sqrt_of_momentum_warns():
    found = domain_warnings(ADAM_HEAD + "p -= lr * sqrt(m) / (sqrt(v) + eps)\n")
    assert found == ["sqrt() of 'm', which can be negative (it ranges over (-inf, inf))"]


def test_sqrt_of_square_and_abs_do_not_warn():
    assert domain_warnings("optimizer A\np -= sqrt(g^2) + sqrt(abs(g)) + sqrt(square(g))\n") == []


def test_rsqrt_and_log1p():
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * rsqrt(v)\n") != []
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * rsqrt(v + eps)\n") == []
    assert domain_warnings(ADAM_HEAD + "p -= lr * m * log1p(v)\n") == []
    assert domain_warnings("optimizer A\np -= log1p(g)\n") != []


CENTERED = """optimizer C
hyper lr = 1e-2 in [0, inf), alpha = 0.99 in [0, 1], b = 0.9 in [0, 1], eps = 1e-8 in (0, inf), c = 1 in [0, 1]
state v, m
v = alpha * v + (1 - alpha) * g^2
m = lerp(m, g, 1 - alpha)
"""


@pytest.mark.parametrize("body, clean", [
    ("p -= lr * g / (sqrt(v - m^2) + eps)", True),       # centered RMSprop: v >= m^2, by Jensen
    ("p -= lr * g / (sqrt(v - c * m^2) + eps)", True),   # a factor in [0, 1] of m^2
    ("p -= lr * g / (sqrt(v - 2 * m^2) + eps)", False),  # twice m^2 can exceed v
    ("p -= lr * g / (sqrt(m^2 - v) + eps)", False),
])
def test_a_variance_of_matching_running_averages_is_nonnegative(body, clean):
    """v = lerp(v, x^2, w) and m = lerp(m, x, w), both from 0 with one w in [0, 1], keep v >= m^2
    (v' - m'^2 = (1 - w)(v - m^2) + w (1 - w)(m - x)^2): RMSprop(centered=True) checks clean."""
    assert (domain_warnings(CENTERED + body + "\n") == []) is clean


@pytest.mark.parametrize("change", [
    ("m = lerp(m, g, 1 - alpha)", "m = lerp(m, g, 1 - b)"),          # another weight
    ("m = lerp(m, g, 1 - alpha)", "m = lerp(m, 2 * g, 1 - alpha)"),  # another value
    ("state v, m", "state v, m = 1"),                                # m starts away from 0
    ("v = alpha", "v = alpha * v + g^2\nv = alpha"),                  # v assigned twice
    ("alpha = 0.99 in [0, 1]", "alpha = 0.99 in [0, 2]"),            # w may leave [0, 1]
])
def test_the_variance_proof_needs_every_condition(change):
    text = CENTERED.replace(*change) + "p -= lr * g / (sqrt(v - m^2) + eps)\n"
    assert any("sqrt()" in w for w in domain_warnings(text)), text


def test_fractional_power_of_a_signed_value_warns():
    assert domain_warnings("optimizer A\np -= g^0.5\n") == [
        "fractional power of 'g', which can be negative (it ranges over (-inf, inf))"]
    assert domain_warnings("optimizer A\np -= abs(g)^0.3 + g^2 + g^3\n") == []


def test_warning_names_the_spec_names_not_ssa_names():
    found = domain_warnings(ADAM_HEAD + "u = m\nu = u * 2\np -= lr / u\n")
    assert found == ["denominator 'u' can be zero (it ranges over (-inf, inf))"]


def test_local_computed_from_a_nonnegative_state():
    text = ADAM_HEAD + "d = sqrt(v) + eps\np -= lr * m / d\n"
    assert domain_warnings(text) == []


# ---- state ranges, by induction over steps ----
def test_adam_second_moment_stays_nonnegative():
    r = state_ranges((SPECS / "adam.opt").read_text(encoding="utf-8"))
    assert r["v"].nonnegative and r["v"].lo == 0
    assert r["m"] == Interval.full()  # momentum takes any sign


def test_adagrad_sum_stays_nonnegative():
    r = state_ranges((SPECS / "adagrad.opt").read_text(encoding="utf-8"))
    assert r["sum_sq"].nonnegative and r["sum_sq"].hi == math.inf


def test_amsgrad_max_stays_nonnegative():
    r = state_ranges((SPECS / "amsgrad.opt").read_text(encoding="utf-8"))
    assert r["v"].nonnegative and r["v_max"].nonnegative
    r = state_ranges((SPECS / "adam.opt").read_text(encoding="utf-8"), rule=1)  # Adam(amsgrad=True)
    assert r["v"].nonnegative and r["v_max"].nonnegative


def test_adamax_infinity_norm_stays_positive():
    r = state_ranges((SPECS / "adamax.opt").read_text(encoding="utf-8"))
    assert r["u"].nonnegative


def test_state_initialised_from_a_positive_hyper_stays_positive():
    text = ("optimizer A\nhyper a = 1 in (0, inf)\nstate s = a\n"
            "s += g^2\np -= g / sqrt(s)\n")
    r = state_ranges(text)
    assert r["s"].positive
    assert domain_warnings(text) == []


def test_state_initialised_from_p_has_any_sign():
    text = "optimizer A\nstate s = p\ns = lerp(s, p, 0.5)\np -= g * s\n"
    assert state_ranges(text)["s"] == Interval.full()


def test_decaying_state_range_is_sound():
    text = "optimizer A\nhyper a = 1 in [1, 2]\nstate s = a\ns *= 0.5\np -= g / s\n"
    r = state_ranges(text)
    assert r["s"].hi == 2  # the end that holds still is kept
    assert all(0.5**k * a in r["s"] for k in range(60) for a in (1, 1.5, 2))
    assert "can be zero" in " ".join(domain_warnings(text))  # 0.5^k a gets as close to 0 as we like


def test_growing_state_is_widened_to_infinity():
    r = state_ranges("optimizer A\nstate s = 1\ns += 1\np -= g * s\n")
    assert r["s"].lo == 1 and r["s"].hi == math.inf


# ---- no false warnings on standard optimizers, and the true ones stay (issue 12, item 8) ----
STANDARD = sorted((Path(__file__).resolve().parent / "specs" / "standard").glob("*.opt"))


@pytest.mark.parametrize("path", STANDARD, ids=lambda p: p.stem)
def test_standard_optimizers_give_no_warnings(path):
    compiled = compile_source(path.read_text(encoding="utf-8"), str(path))
    assert compiled.warnings == (), "\n".join(map(str, compiled.warnings))


def test_yogi_second_moment_stays_nonnegative_by_cases_of_its_sign():
    r = state_ranges((Path(__file__).resolve().parent / "specs" / "standard" / "yogi.opt").read_text())
    assert r["v"].nonnegative
    # a weight above 1 breaks it (v - 2 g^2 < 0 for g^2 < v < 2 g^2): the warning stays
    text = ADAM_HEAD.replace("v = lerp(v, g^2, 1 - b2)", "v = v - 2 * sign(v - g^2) * g^2") + \
        "p -= lr * m / (sqrt(v) + eps)\n"
    assert domain_warnings(text) == ["sqrt() of 'v', which can be negative (it ranges over (-inf, inf))"]


GUARD_HEAD = "optimizer A\nhyper lr = 0.1, eps = 1e-8 in (0, inf), c = 1 in [0, 1]\nw = norm(p)\nr = norm(g)\ns = sum(g)\n"


@pytest.mark.parametrize("update", [
    "p -= lr * g / where(s != 0, s, 1)",               # the denominator is a where whose branches are nonzero
    "p -= lr * g / where(0 != s, s, 1)",
    "p -= lr * g / where(s == 0, 1, s)",               # the second branch, where the condition fails
    "p -= lr * g * where((w > 0) * (r > 0), w / r, 1)",  # a product of comparisons
    "p -= lr * g * where((r > 0) * (w > 0), w / r, 1)",
    "p -= lr * g * where(min(w > 0, r > 0), w / r, 1)",
    "p -= lr * g * where(r > eps, w / r, 1)",          # a bound on 0's side of it
    "p -= lr * g * where(eps < r, w / r, 1)",
    "p -= lr * g * where(r > c, w / r, 1)",            # c >= 0, so r > 0
    "p -= lr * g * sqrt(where(s != 0, abs(s), 1)) / where(s != 0, abs(s), 1)",
])
def test_guards_that_make_a_denominator_nonzero(update):
    assert domain_warnings(GUARD_HEAD + update + "\n") == []


@pytest.mark.parametrize("update, den", [
    ("p -= lr * g / where(s != 1, s, 1)", "where(s != 1, s, 1)"),  # s can still be 0
    ("p -= lr * g / where(s == 0, s, 1)", "where(s == 0, s, 1)"),
    ("p -= lr * g * where((w > 0) + (r > 0), w / r, 1)", "r"),     # a sum: either may hold
    ("p -= lr * g * where((w > 0) * (r >= 0), w / r, 1)", "r"),
    ("p -= lr * g * where(r >= c, w / r, 1)", "r"),                # c may be 0, and r = 0 then
    ("p -= lr * g * where(r > -eps, w / r, 1)", "r"),
    ("p -= lr * g * where(w > 0, w / r, 1)", "r"),                 # the guard is about another value
])
def test_guards_that_do_not_make_a_denominator_nonzero_still_warn(update, den):
    found = domain_warnings(GUARD_HEAD + update + "\n")
    assert len(found) == 1 and found[0].startswith(f"denominator '{den}' can be zero"), found


def test_one_minus_a_product_of_factors_below_one():
    text = (Path(__file__).resolve().parent / "specs" / "standard" / "nadam_prod.opt").read_text()
    assert domain_warnings(text) == []
    r = state_ranges(text)
    assert r["mu_prod"].lo == 0 and r["mu_prod"].hi == 1  # starts at 1, then products of factors in [0, 1)
    # a factor that may reach 1 makes 1 - mu_prod * mu reach 0: warned
    assert domain_warnings(text.replace("b1 = 0.9 in [0, 1)", "b1 = 0.9 in [0, 2]")) != []


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.opt")), ids=lambda p: p.stem)
def test_shipped_specs_warn_only_where_known(path):
    """The warnings left on shipped specs are true, each named here: adalo's log1p(loss) (a loss
    of -1 or less gives NaN; the warning says a spec cannot declare the loss's range, and that a
    loss >= 0 is safe); adams' sqrt(vbar) as a denominator (gradients all 0 since the start give
    vbar = 0, and the authors' AdamS a ZeroDivisionError). Its vbar >= 0 is proven: a group
    reduction reads the per-parameter state v by v's proven range (>= 0). RMSprop's centered sqrt
    is proven: square_avg >= grad_avg^2 by Jensen (check._square_pairs), in exact arithmetic as
    every claim of the check. kron's probe V / q for its diagonal factors (q of vectors, dL and dR of
    matrices' diagonal sides; a rank-3-to-8 factor Q[a], diagonal or not as the parameter makes it, is solved
    against in rsolve_triu_axis, matrix work the check does not look into, as a triangular factor's solve):
    each is multiplied at each step by 1 - plr * (a^2 - b^2) / max|a^2 + b^2|,
    a factor in [1 - plr, 1 + plr], so it stays > 0 for precondition_lr < 1 and may reach 0 from 1 on
    (the reference divides alike)."""
    known = {"adalo": ["log1p() of 'loss', which can be -1 or less (it ranges over (-inf, inf)) when the loss is "
                       "negative: a spec cannot declare the loss's range; for a loss >= 0 it is safe"],
             "adams": ["denominator 'sqrt(vbar)' can be zero"],
             "kron": ["denominator 'dR' can be zero", "denominator 'dL' can be zero", "denominator 'dL' can be zero",
                      "denominator 'dR' can be zero", "denominator 'q' can be zero"]}
    # (group states are proven by the induction too: k >= 1, so 1 - b2^k > 0; d > 0 in Prodigy)
    found = warnings_of(path.read_text(encoding="utf-8"))
    expected = known.get(path.stem, [])
    assert len(found) == len(expected) and all(w.startswith(e) for w, e in zip(found, expected)), found


RADAM = (SPECS / "radam.opt").read_text(encoding="utf-8")


def test_radam_rectifier_is_nonzero_where_it_is_used():
    """rect is computed on its own line but used only where rho_t > 5; rho_t = rho_inf - (>= 0),
    so there rho_inf > 5 and (rho_inf - 4) * (rho_inf - 2) * rho_t > 0."""
    assert domain_warnings(RADAM) == []


@pytest.mark.parametrize("change", [
    ("where(rho_t > 5,", "where(rho_t > 3,"),            # rho_inf = 4 passes this guard
    ("where(rho_t > 5,", "where(rho_t < 5,"),
    ("p -= lr * m / (1 - b1^t) * adaptive", "p -= lr * m / (1 - b1^t) * adaptive * rect"),  # used unguarded
])
def test_radam_rectifier_warns_when_the_guard_does_not_cover_it(change):
    found = domain_warnings(RADAM.replace(*change))
    assert any(w.startswith("denominator '(rho_inf - 4) * (rho_inf - 2) * rho_t'") for w in found), found


def test_a_group_reduction_reads_a_state_by_its_proven_range():
    """mean(v) over the group of Adam's v (>= 0 by induction) is >= 0, so sqrt(vbar) is safe; a state
    that can be negative still warns."""
    head = ("optimizer S\nhyper lr = 0.1 in [0, inf), b2 = 0.9 in [0, 1)\nstate m, v\n"
            "group vbar = mean(b2 * v + (1 - b2) * g^2)\n")
    assert warnings_of(head + "v = b2 * v + (1 - b2) * g^2\nm = g\np -= lr * sqrt(vbar) * g * m\n") == []
    found = warnings_of(head.replace("mean(b2 * v", "mean(b2 * m") +
                        "v = b2 * v + (1 - b2) * g^2\nm = g - v\np -= lr * sqrt(vbar) * g * v\n")
    assert any("sqrt() of 'vbar'" in w for w in found), found


# ---- a refusal that can never apply (optdsl/ranks.py unreachable_refusals) ----
@pytest.mark.parametrize("rules, why", [
    ('rule ndim >= 0 {\n  p -= g\n}\nrule ndim == 1 refuse "no vectors"',
     "'rule ndim >= 0' above it takes every parameter it would refuse (rank 1)"),
    ('rule ndim >= 2 {\n  p -= g\n}\nrule ndim < 2 {\n  p -= g\n}\nrule ndim >= 0 refuse "none"',
     "'rule ndim < 2' and 'rule ndim >= 2' above it take every parameter it would refuse (rank 0, 1, 2, 3 or more)"),
    ('rule ndim == 1 or ndim >= 2 {\n  p -= g\n}\nrule ndim == 1 and numel > 3 refuse "long vectors"',
     "'rule ndim == 1 or ndim >= 2' above it takes every parameter it would refuse (rank 1)"),
    ('rule ndim >= 2 refuse "big"\nrule ndim == 2 refuse "matrices"',  # a refusal above takes them too
     "'rule ndim >= 2' above it takes every parameter it would refuse (rank 2)"),
    ('rule ndim < 0 refuse "never"', "its condition holds for no parameter"),
])
def test_a_refusal_after_rules_that_take_its_parameters_warns(rules, why):
    text = f"optimizer R\nhyper lr = 0.1\n{rules}\nrule {{\n  p -= lr * g\n}}\n"
    found = [w for w in compile_source(text, "r.opt").warnings if "never applies" in w.message]
    assert [w.message for w in found] == [f"this refusal never applies: {why}"]
    line = 3 + rules.count("\n")  # the refusal tested is the last line of `rules`
    assert (found[0].span.line, found[0].span.column) == (line, 1)
    assert str(found[0]).startswith(f"r.opt:{line}:1: warning: this refusal never applies")


@pytest.mark.parametrize("rules", [
    'rule ndim == 1 refuse "no vectors"\nrule ndim >= 0 {\n  p -= g\n}',   # the refusal first
    'rule ndim >= 2 {\n  p -= g\n}\nrule ndim == 1 refuse "no vectors"',   # vectors reach it
    'rule ndim >= 2 and nrows > 3 {\n  p -= g\n}\nrule ndim == 2 refuse "small"',  # small matrices reach it
    'rule ndim >= k {\n  p -= g\n}\nrule ndim == 1 refuse "no vectors"',  # k decides, not the rank
])
def test_a_refusal_that_can_apply_does_not_warn(rules):
    text = f"optimizer R\nhyper lr = 0.1, k = 1\n{rules}\nrule {{\n  p -= lr * k * g\n}}\n"
    assert not [w for w in compile_source(text, "r.opt").warnings if "refusal" in w.message]
