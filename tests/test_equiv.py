"""`optdsl equiv`: proofs that two specs are one optimizer, and checked counterexamples."""
from __future__ import annotations

from pathlib import Path

import pytest
import sympy as sp
import torch

import optdsl
from optdsl import cli
from optdsl.equiv import Verdict, equivalent
from optdsl.functions import meaning
from optdsl.pipeline import compile_source
from optdsl.sym import meanings

ROOT = Path(__file__).resolve().parent.parent
SPECS, EQUIV = ROOT / "specs", ROOT / "tests" / "specs" / "equiv"
ADAM, ADAMW = SPECS / "adam.opt", SPECS / "adamw.opt"
RMSPROP_BC = {"assume": {"amsgrad": 0, "decoupled": 0, "b1": 0, "wd": 0}, "mapping": {"b2": "alpha", "v": "sq"}}


def spec(path: Path):
    return compile_source(path.read_text(encoding="utf-8"), str(path))


def inline(body: str, head: str = "hyper lr = 1e-2 in [0, inf)"):
    return compile_source(f"optimizer X\n{head}\n{body}\n", "<inline>")


def assert_proven(v: Verdict, compared: tuple[str, ...]):
    assert (v.equal, v.proven, v.exit_code, v.counterexample) == (True, True, 0, None), v.message
    assert v.compared == compared


# ---- 1-3: proofs ----
def test_adamw_with_lerp_equals_adamw_with_multiply_add():
    # amsgrad=False: AdamW's first rule alone (the other is AMSGrad's, which adamw_muladd.opt lacks)
    assert_proven(equivalent(spec(ADAMW), spec(EQUIV / "adamw_muladd.opt"), assume={"amsgrad": 0}), ("p", "m", "v"))


def test_nesterov_torch_form_equals_expanded_form():
    assert_proven(equivalent(spec(EQUIV / "nesterov_torch.opt"), spec(EQUIV / "nesterov_expanded.opt")),
                  ("p", "buf"))


def test_adam_with_b1_zero_is_rmsprop_with_bias_correction():
    v = equivalent(spec(ADAM), spec(EQUIV / "rmsprop_bc.opt"), **RMSPROP_BC)
    assert_proven(v, ("p", "sq"))
    assert (v.only_in_a, v.only_in_b) == (("m",), ())
    # b1 is a hyperparameter RMSprop lacks: comparing without fixing it is an error, not a crash
    v = equivalent(spec(ADAM), spec(EQUIV / "rmsprop_bc.opt"), assume={"amsgrad": 0, "decoupled": 0, "wd": 0},
                   mapping=RMSPROP_BC["mapping"])
    assert v.error and v.exit_code == 3 and "b1" in v.message


def test_nonnegative_state_and_piecewise_proofs():
    # Adam's v never goes negative (proven by the checker), so abs(v) is v
    assert_proven(equivalent(spec(ADAM), spec(EQUIV / "adam_abs_v.opt"), assume={"amsgrad": 0, "decoupled": 0, "wd": 0}), ("p", "m", "v"))
    assert_proven(equivalent(inline("p -= lr * max(g, 0)"), inline("p -= lr * where(g > 0, g, 0)")), ("p",))
    assert_proven(equivalent(inline("p -= lr * (g > 0)"), inline("p -= lr * (1 - (g <= 0))")), ("p",))
    assert equivalent(inline("p -= lr * max(g, 0)").program, inline("p -= lr * max(g, 0)").program).equal


# ---- 4: counterexamples, re-evaluated independently ----
def run_torch(path: Path, cx: dict[str, float], hypers: tuple[str, ...], states: tuple[str, ...]) -> float:
    """One step of the generated optimizer from the counterexample's point, in float64."""
    p = torch.nn.Parameter(torch.tensor([cx["p"]], dtype=torch.float64))
    opt = optdsl.load(path)([p], **{h: cx[h] for h in hypers})
    saved_as = getattr(opt, "_SAVED", {})  # a drop-in spec keeps m as exp_avg, ...
    opt.state[p] = {"step": torch.tensor(cx["t"] - 1, dtype=torch.float64)} | {
        saved_as.get(s, s): torch.tensor([cx[s]], dtype=torch.float64) for s in states}
    p.grad = torch.tensor([cx["g"]], dtype=torch.float64)
    opt.step()
    return p.item()


def test_adam_with_decoupled_weight_decay_is_adamw():
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW: proven, rule by rule."""
    assert_proven(equivalent(spec(ADAM), spec(ADAMW), assume={"decoupled": 1, "amsgrad": 0}), ("p", "m", "v"))


def test_adam_l2_is_not_adamw_and_the_counterexample_is_real():
    v = equivalent(spec(ADAM), spec(ADAMW), assume={"wd": 0.1, "decoupled": 0})  # Adam with L2, its default
    assert (v.equal, v.proven, v.exit_code, v.differing) == (False, True, 1, "p")
    cx = v.counterexample
    assert cx["wd"] == 0.1 and cx["v"] >= 0 and 1 <= cx["t"] <= 10
    hypers = ("lr", "b1", "b2", "eps", "wd")
    a, b = (run_torch(path, cx, hypers, ("m", "v")) for path in (ADAM, ADAMW))
    assert a == pytest.approx(cx["A:p"], rel=1e-12) and b == pytest.approx(cx["B:p"], rel=1e-12)
    assert abs((a - cx["p"]) - (b - cx["p"])) > 1e-6 * abs(a - cx["p"])
    # and with SymPy, from the specs' own meanings
    for path, key in ((ADAM, "A:p"), (ADAMW, "B:p")):
        _, _, out = meanings(spec(path).program)
        value = meaning(out["p"]).subs({sp.Symbol(k): cx[k] for k in ("p", "g", "m", "v", "t")
                                                          + hypers}).subs(sp.Symbol("decoupled"), 0)
        assert float(value) == pytest.approx(cx[key], rel=1e-12)


def test_reductions_are_sampled_on_three_element_tensors():
    norm, mean = spec(EQUIV / "normalized_norm.opt"), spec(EQUIV / "normalized_mean.opt")
    v = equivalent(norm, mean)
    assert (v.equal, v.proven, v.differing) == (False, True, "p")
    cx = v.counterexample
    g = torch.tensor([cx[f"g[{i}]"] for i in range(3)], dtype=torch.float64)
    for path, key in ((EQUIV / "normalized_norm.opt", "A:p"), (EQUIV / "normalized_mean.opt", "B:p")):
        p = torch.nn.Parameter(torch.tensor([cx["p[0]"], 0.5, -0.5], dtype=torch.float64))
        opt = optdsl.load(path)([p], lr=cx["lr"], eps=cx["eps"])
        p.grad = g.clone()
        opt.step()
        assert p[0].item() == pytest.approx(cx[key], rel=1e-12)
    # norm(g) and sqrt(sum(g^2)) agree, but a reduction identity is only ever sampled
    v = equivalent(norm, spec(EQUIV / "normalized_sum.opt"))
    assert (v.equal, v.proven, v.exit_code) == (False, False, 2)
    assert "no counterexample in 200 samples" in v.message and "3-element" in v.message


def test_initial_values_and_small_differences_are_found():
    v = equivalent(inline("state s = p\ns = lerp(s, p, 0.5)\np -= lr * (g + s)"),
                   inline("state s\ns = lerp(s, p, 0.5)\np -= lr * (g + s)"))
    assert v.differing == "initial s" and v.counterexample["A:initial s"] == v.counterexample["p"]
    v = equivalent(inline("state m\nm = lerp(m, g, 0.1)\np -= lr * m"),
                   inline("state m\nm = 0.9 * m + 0.1000001 * g\np -= lr * m"))
    assert v.exit_code == 1 and v.differing in ("p", "m")


def test_deterministic_and_name_errors():
    a, b = spec(ADAM), spec(ADAMW)
    assert equivalent(a, b) == equivalent(a, b)
    assert equivalent(a, b, assume={"b1": 1.5}).error                  # outside [0, 1)
    assert equivalent(a, b, assume={"nope": 1}).error
    assert equivalent(a, b, mapping={"nope": "lr"}).error
    assert equivalent(a, b, mapping={"b1": "b2"}).error               # two of A's names on one
    narrow = inline("p -= lr * g", head="hyper lr = 2 in [1, 3]")
    wide = inline("p -= lr * g", head="hyper lr = 0.5 in [0, 1)")
    assert "do not overlap" in equivalent(narrow, wide).message


# ---- 5: the command ----
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["equiv", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_exit_codes(capsys):
    code, out, _ = run_cli(capsys, str(EQUIV / "nesterov_torch.opt"), str(EQUIV / "nesterov_expanded.opt"))
    assert code == 0 and "equivalent" in out
    code, out, _ = run_cli(capsys, str(ADAM), str(ADAMW), "--assume", "wd=0.1", "--assume", "decoupled=0")
    assert code == 1 and "NOT equivalent" in out and "p after the step:" in out
    assert all(f"\n  {name} " in out for name in ("p", "g", "m", "v", "lr", "wd", "t"))
    code, out, _ = run_cli(capsys, str(ADAM), str(EQUIV / "rmsprop_bc.opt"), "--assume", "amsgrad=0", "--assume", "decoupled=0", "--assume", "b1=0",
                           "--assume", "wd=0", "--map", "b2=alpha", "--map", "v=sq")
    assert code == 0 and "only in" in out and ": m (not compared)" in out
    code, out, _ = run_cli(capsys, str(EQUIV / "normalized_norm.opt"), str(EQUIV / "normalized_sum.opt"))
    assert code == 2 and "undecided" in out


def test_cli_errors_are_messages(capsys, tmp_path):
    code, _, err = run_cli(capsys, str(tmp_path / "missing.opt"), str(ADAM))
    assert code == 3 and "missing.opt" in err
    bad = tmp_path / "bad.opt"
    bad.write_text("optimizer Bad\nhyper lr = 1e-3\np -= lr * (g\n", encoding="utf-8")
    code, _, err = run_cli(capsys, str(bad), str(ADAM))
    assert code == 3 and "bad.opt:" in err and "error" in err
    code, _, err = run_cli(capsys, str(ADAM), str(EQUIV / "rmsprop_bc.opt"))
    assert code == 3 and "no counterpart" in err
    for option in (["--assume", "wd"], ["--assume", "wd=x"], ["--map", "b1"]):
        code, _, err = run_cli(capsys, str(ADAM), str(ADAMW), *option)
        assert code == 3 and "optdsl equiv: error:" in err


def test_rules_by_shape_are_compared_rule_by_rule():
    text = (SPECS / "adafactor.opt").read_text()
    adafactor = compile_source(text, "adafactor.opt")
    v = equivalent(adafactor, compile_source(text, "copy.opt"))
    assert (v.equal, v.proven, v.exit_code) == (True, True, 0)
    assert v.details == ("rule for parameters with ndim >= 2: equivalent: p, r, c (and the initial values of r, c) "
                         "proven equal for all inputs",
                         "rule for every other parameter: equivalent: p, v (and the initial value of v) proven equal "
                         "for all inputs")
    # eps1 floors v, not its root, in the rule for vectors: change that, and only that rule differs
    mutant = text.replace("u = g * rsqrt(max(v, eps1^2))", "u = g * rsqrt(max(v, eps1))")
    assert mutant != text
    v = equivalent(adafactor, compile_source(mutant, "mutant.opt"))
    assert (v.equal, v.proven, v.exit_code) == (False, True, 1)
    assert v.message.startswith("for every other parameter: NOT equivalent: p differs")
    assert v.details[0].startswith("rule for parameters with ndim >= 2: equivalent")
    # an axis reduction has no numerical form here: undecided, and it says so (no crash, no false proof)
    v = equivalent(adafactor, compile_source(text.replace("max(col_mean(r), eps1)", "max(row_mean(c), eps1)"), "m.opt"))
    assert (v.equal, v.exit_code) == (False, 2)
    assert "no counterexample sought (an axis reduction here has no numerical form)" in v.details[0]


def test_matrix_work_is_undecided_and_shows_the_math(capsys):
    assert cli.main(["equiv", "muon", str(SPECS / "muon.opt")]) == 2
    out = capsys.readouterr().out
    assert "rule for parameters with ndim == 2 and use_muon: undecided: matrix work (mm, T) is not modelled" in out
    assert out.count("repeat ns_steps times:") == 2  # A's and B's Newton-Schulz loops, as written
    assert "rule for every other parameter: equivalent: p, m, v" in out
