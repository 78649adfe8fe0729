"""`optdsl explain`: properties derived by SymPy from the spec, checked against what the papers say."""
from pathlib import Path

import pytest

from optdsl.cli import main
from optdsl.explain import explain, report
from optdsl.pipeline import compile_source

SPECS = Path(__file__).resolve().parent.parent / "specs"

MEMORY = "state memory per element"
BYTES = "bytes per element per step"
SCALE = "invariant to g -> c*g (c > 0)"
AGAINST = "first step moves against the gradient (from p = 0)"
BOUND = "bound on |Δp| per element at step 1 (from p = 0)"

# spec: (state bytes, bytes moved, scale invariance, |Δp| bound at step 1, {state: range})
EXPECTED = {
    "adamw": ("8 B", "28 B", "only when eps = 0", "lr", {"m": "(-inf, inf)", "v": "[0, inf)"}),
    "adam": ("8 B", "28 B", "only when eps, wd = 0", "lr", {"v": "[0, inf)"}),
    "lion": ("4 B", "20 B", "yes", "lr", {"m": "(-inf, inf)"}),
    "adam_atan2": ("8 B", "28 B", "yes", "pi*a*lr/2", {"v": "[0, inf)"}),
    "sgd": ("4 B", "20 B", "no", "unbounded", {"buf": "(-inf, inf)"}),
    "radam": ("8 B", "28 B", "no", "unbounded", {"v": "[0, inf)"}),
    "adagrad": ("4 B", "20 B", "only when wd, initial_accumulator_value, eps = 0", "lr", {"sum_sq": "[0, inf)"}),
    "adamax": ("8 B", "28 B", "only when eps, wd = 0", "lr", {"u": "[0, inf)"}),
    "rmsprop": ("12 B", "36 B", "only when eps, wd = 0", None, {"square_avg": "[0, inf)"}),
    "amsgrad": ("12 B", "36 B", "only when eps, wd = 0", None, {"v": "[0, inf)", "v_max": "[0, inf)"}),
    "nsgda": ("4 B", "20 B", "no", None, {"m": "(-inf, inf)"}),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def explained(request):
    name = request.param
    path = SPECS / f"{name}.opt"
    return name, explain(compile_source(path.read_text(), path.as_posix()))


def test_properties_match_the_papers(explained):
    name, x = explained
    memory, moved, scale, step_bound, ranges = EXPECTED[name]
    assert x.property(MEMORY).value.endswith(f"= {memory} (float32)")
    assert x.property(BYTES).value.startswith(moved)
    assert x.property(SCALE).value == scale
    assert x.property(AGAINST).value == "yes"  # every shipped optimizer descends on its first step
    if step_bound is not None:
        assert x.property(BOUND).value == step_bound
    for state, r in ranges.items():
        assert x.property(f"range of state {state}").value == r


def test_report_shows_rule_properties_and_risks(explained):
    name, x = explained
    text = report(x)
    assert text.startswith(x.name)
    assert "Update rule" in text and "←" in text
    assert all(p.name in text for p in x.properties)
    assert ("Domain risks: none found" in text) == (not x.risks)


def test_latex_is_the_docstring_math():
    path = SPECS / "adamw.opt"
    compiled = compile_source(path.read_text(), path.as_posix())
    x = explain(compiled)
    assert x.latex and all(line in compiled.python for line in x.latex)
    assert "\\operatorname{lerp}" in report(x, latex=True)


def test_unicode_rule_reads_like_the_spec():
    x = explain(compile_source((SPECS / "adamw.opt").read_text()))
    assert x.rule[1] == "v ← lerp(v, g², 1 - b2)"
    assert x.rule[3] == "p ← p - lr·(m / (1 - b1ᵗ)) / (√(v / (1 - b2ᵗ)) + eps)"


def test_a_risk_names_its_line_and_the_assumption_that_makes_it_safe():
    text = ("optimizer NoEps\nhyper lr = 1e-3 in [0, inf), b2 = 0.999 in [0, 1)\nstate v\n"
            "v = lerp(v, g^2, 1 - b2)\np -= lr * g / sqrt(v)\n")
    x = explain(compile_source(text, "noeps.opt"))
    assert len(x.risks) == 1
    shown = report(x)
    assert "noeps.opt:5:" in shown and "can be zero" in shown and "eps" in shown
    # v >= 0 was proven by induction, so sqrt(v) itself is no risk: only the division is
    assert "sqrt() of" not in shown
    assert x.property("range of state v").value == "[0, inf)"


def test_a_sign_flip_is_noticed():
    text = "optimizer Ascent\nhyper lr = 0.1 in [0, inf)\np += lr * g\n"
    x = explain(compile_source(text))
    assert x.property(AGAINST).value == "not proven"
    assert x.property(SCALE).value == "no"


def test_cli_explain(capsys, tmp_path):
    assert main(["explain", str(SPECS / "lion.opt")]) == 0
    out = capsys.readouterr().out
    assert "Lion" in out and "bound on |Δp|" in out
    assert main(["explain", str(SPECS / "lion.opt"), "--latex"]) == 0
    assert "\\begin{aligned}" in capsys.readouterr().out
    bad = tmp_path / "bad.opt"
    bad.write_text("optimizer Bad\np -= lr * g\n")
    assert main(["explain", str(bad)]) == 1
    assert "bad.opt:2:6" in capsys.readouterr().err


def _explained(name):
    path = SPECS / f"{name}.opt"
    return explain(compile_source(path.read_text(), path.as_posix()))


def test_rules_by_shape_are_explained_rule_by_rule():
    """Adafactor: a factored rule for matrices, a full second moment for the rest; each rule's
    math and its own properties, not a refusal."""
    x = _explained("adafactor")
    assert [s.condition for s in x.sections] == ["parameters with ndim >= 2", "every other parameter"]
    assert "r ← lerp(r, row_mean(g²), t^beta2_decay)" in x.sections[0].rule
    assert "u ← g·rsqrt(max(v, eps1²))" in x.sections[1].rule  # rsqrt stays rsqrt
    assert x.property(MEMORY, 0).value.startswith("0 x 4 B = 0 B (float32), plus r, c per parameter")
    assert x.property(MEMORY, 1).value == "1 x 4 B = 4 B (float32)"
    assert x.property("range of state r", 0).value == "[0, inf)"
    assert x.property("range of state v", 1).value == "[0, inf)"
    assert x.property(AGAINST, 1).value == "yes"
    text = report(x)
    assert text.index("Rule for parameters with ndim >= 2:") < text.index("Rule for every other parameter:")


def test_matrix_work_shows_its_math_and_memory_and_says_what_it_skips():
    x = _explained("muon")
    muon, adamw = x.sections
    assert muon.condition == "parameters with ndim == 2 and use_muon" and adamw.condition == "every other parameter"
    # the Newton-Schulz loop (kept as a loop, not unrolled) is shown once, as written
    at = muon.rule.index("repeat ns_steps times:")
    body = [line for line in muon.rule[at + 1:at + 7] if "bfloat16" not in line]
    assert body == ["  A ← mm(x, T(x))", "  B ← b·A + c·mm(A, A)", "  x ← a·x + mm(B, x)"]
    assert muon.rule.count("  A ← mm(x, T(x))") == 1
    # and the code its momentum gets at int8/int4 (matrix work or not, the range is proven)
    assert [p.name for p in muon.properties] == [MEMORY, BYTES, "int8/int4 code of state buf"]
    assert "matrix work" in muon.skipped
    assert x.property(BOUND, 1).value == "adam_lr"  # the AdamW rule is analysed as AdamW is
    assert "\\text{repeat ns_steps times:}" in report(x, latex=True)
    assert "loop" not in " ".join(muon.rule)  # the IR's loop/loop_end are no statements of the spec


def test_cli_explains_a_shipped_name_with_rules(capsys):
    assert main(["explain", "muon"]) == 0
    out = capsys.readouterr().out
    assert "Rule for parameters with ndim == 2 and use_muon:" in out and "repeat ns_steps times:" in out


def test_explain_prints_group_statements_and_mode_blocks():
    """Issue 16: the group statements (a reduction written where it is read) before the update rule,
    each mode block after it, in Unicode and in LaTeX."""
    root = Path(__file__).resolve().parent.parent / "specs"
    sf = explain(compile_source((root / "schedule_free_adamw.opt").read_text(), "sf.opt"))
    text = report(sf)
    assert "Group values" in text and "  k ← k + 1\n" in text and "  bc2 ← 1 - b2^k\n" in text
    assert text.index("Group values") < text.index("Update rule") < text.index("\neval() (") < text.index("\ntrain() (")
    assert "  p ← lerp(p, z, 1 - 1 / b1)\n" in text and "  p ← lerp(p, z, 1 - b1)\n" in text
    assert r"\operatorname{lerp}{\left(p,z,1 - b_{1} \right)}" in report(sf, latex=True)
    prodigy = report(explain(compile_source((root / "prodigy.opt").read_text(), "p.opt")))
    assert "d_numerator ← b3·d_numerator + d / d0·dlr·sum(g·(x0 - p))" in prodigy
    adamw = report(explain(compile_source((root / "adamw.opt").read_text(), "a.opt")))
    assert "Group values" not in adamw and "eval()" not in adamw


@pytest.mark.parametrize("operand, want", [
    ("-2", "2*lr*numel"),                                  # a scalar broadcasts to p's shape: numel elements
    ("r - r - 2", "2*lr*nrows*prod(shape[:-2])"),          # -2 in each row of a rows value: one per row
    ("c * 0 - 2", "2*lr*ncols*prod(shape[:-2])"),          # ... and of a cols value, one per column
])
def test_a_bound_shows_what_a_reduction_of_a_scalar_computes(operand, want):
    """The bound was lr*sum(-2)/sign(lr*sum(-2)) for each: SymPy's sum of the number it simplified the
    operand to, which reads as one element and hides the count the step computes (the broadcast rule)."""
    text = ("optimizer Counted\nhyper lr = 0.1 in (0, inf)\nstate r: rows, c: cols\nr = row_mean(g)\n"
            f"c = col_mean(g)\np -= lr * sign(g) * sum({operand})\n")
    assert explain(compile_source(text)).property(BOUND).value == want
