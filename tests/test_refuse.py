"""`rule COND refuse "why"`: a rule that takes the parameters its condition holds for (in the rules'
order, as any rule) and refuses them, saying why: a ValueError when the parameter is given to the
optimizer (construction, add_param_group, the group then left out) and at step (a condition on a
hyperparameter the group changed since). Kron refuses tensors of rank 3 or more with it
(tests/test_zoo_kron.py); here the construct itself, on the for-loop, foreach and fused paths.
"""
from __future__ import annotations

import re

import pytest
import torch

import optdsl
from optdsl import info
from optdsl.explain import explain, report
from optdsl.pipeline import compile_source
from test_zoo_frontier import paths_here

SPEC = '''optimizer Picky
hyper lr = 0.1 in [0, inf), big = 3 in [1, inf)
rule ndim == 3 and nunits == 1 {
  p -= lr * g
}
rule ndim >= big refuse ("rank {ndim} \\ is too many " "for this spec: \u2028reshape it")
rule ndim == 2 {
  state m
  m = 0.5 * m + g
  p -= lr * m
}
rule {
  p -= 2 * lr * g
}
'''
SAME = SPEC.replace(SPEC.split("\n")[5] + "\n", "")  # without the refusal
# U+2028 shows as its escape (a terminal would break the line there): optdsl.escape.visible
WHY = "rank {ndim} \\ is too many for this spec: \\u2028reshape it (picky.opt:6: rule ndim >= big refuse)"


def test_a_parameter_an_earlier_rule_takes_is_not_refused_and_the_others_step_as_without_it():
    """(2, 5, 4) is refused; (1, 5, 4) is taken by the first rule, before the refusal; the rest update
    bitwise as the same spec without the refusal, on every path."""
    Picky, Same = optdsl.compile(SPEC, "picky.opt"), optdsl.compile(SAME, "same.opt")
    with pytest.raises(ValueError) as err:
        Picky([torch.nn.Parameter(torch.zeros(1, 5, 4)), torch.nn.Parameter(torch.zeros(2, 5, 4))])
    assert str(err.value) == "Picky refuses a parameter of shape (2, 5, 4): " + WHY
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 2), (4, 3), (5,), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    for mode in paths_here():
        runs = []
        for cls in (Picky, Same):
            ps = [torch.nn.Parameter(x.clone()) for x in init]
            opt = cls(ps, **mode)
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                opt.step()
            runs.append(ps)
        assert all(torch.equal(a, b) for a, b in zip(*runs)), mode
        assert not torch.equal(runs[0][1], init[1])


def test_a_refusal_on_a_hyperparameter_is_checked_per_group_and_again_at_step():
    Picky = optdsl.compile(SPEC, "picky.opt")
    for mode in paths_here():
        p, q = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(2, 2, 2))
        opt = Picky([p], **mode)
        with pytest.raises(ValueError, match=re.escape("shape (2, 2, 2): rank {ndim}")):
            opt.add_param_group({"params": [q]})
        assert len(opt.param_groups) == 1  # the refused group left out
        opt.add_param_group({"params": [q], "big": 4})  # this group refuses rank 4 and more only
        p.grad, q.grad = torch.ones(4, 3), torch.ones(2, 2, 2)
        opt.step()
        assert q[0, 0, 0].item() == pytest.approx(0.8)  # the last rule: p -= 2 lr g
        opt.param_groups[1]["big"] = 3
        with pytest.raises(ValueError, match=re.escape("Picky refuses a parameter of shape (2, 2, 2)")):
            opt.step()


def test_a_spec_of_one_updating_rule_and_a_refusal():
    src = 'optimizer One\nhyper lr = 0.1 in [0, inf)\nrule ndim >= 3 refuse "not this"\nrule {\n  state m\n  m = 0.9 * m + g\n  p -= lr * m\n}\n'
    One = optdsl.compile(src, "one.opt")
    for mode in paths_here():
        p = torch.nn.Parameter(torch.ones(2, 3))
        opt = One([p], **mode)
        for _ in range(2):
            p.grad = torch.ones(2, 3)
            opt.step()
        assert p[0, 0].item() == pytest.approx(1 - 0.1 - 0.19) and set(opt.state[p]) == {"m", "step"}, mode
    with pytest.raises(ValueError, match=re.escape("One refuses a parameter of shape (1, 1, 1): not this (one.opt:3: "
                                                   "rule ndim >= 3 refuse)")):
        One([torch.nn.Parameter(torch.ones(1, 1, 1))])


def test_info_and_explain_say_the_refusal():
    compiled = compile_source(SPEC, "picky.opt")
    with pytest.raises(ValueError, match=re.escape("Picky refuses a parameter of shape (2, 3, 4) (rule ndim >= big)")):
        info.memory(compiled, (2, 3, 4))
    assert info.memory(compiled, (1, 3, 4)).rule == "ndim == 3 and nunits == 1"  # taken before the refusal
    assert info.memory(compiled, (4, 3)).rule == "ndim == 2"
    text = report(explain(compiled))
    assert "Rule for parameters with ndim >= big: refused (rank {ndim} \\ is too many" in text
    assert text.index("ndim == 3 and nunits == 1") < text.index("refused") < text.index("Rule for parameters with ndim == 2:")


@pytest.mark.parametrize("src, message, line, col", [
    ('rule ndim >= 3 refuse "x"\n', "every rule of this spec refuses its parameters, so it updates none", 3, 1),
    ('rule {\n  p -= lr * g\n}\nrule ndim >= 3 refuse "x"\n',
     "a rule without a condition takes every parameter, so this refusal never applies", 6, 1),
    ('rule p > 3 refuse "x"\nrule {\n  p -= lr * g\n}\n', "a rule's condition cannot read 'p'", 3, 6),
    ('rule refuse "x"\nrule {\n  p -= lr * g\n}\n', "a refusing rule is 'rule COND refuse \"why\"'", 3, 13),
    ('rule ndim > 2 refuse\nrule {\n  p -= lr * g\n}\n', "syntax error", 3, 21),
    ('rule ndim > 2 refuse "x" {\n  p -= lr * g\n}\n', "syntax error", 3, 26),
])
def test_refusal_errors_are_located(src, message, line, col):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile("optimizer B\nhyper lr = 0.1 in [0, inf)\n" + src, "b.opt")
    assert message in str(err.value), str(err.value)
    assert (err.value.span.line, err.value.span.column) == (line, col), str(err.value)


def test_refuse_is_no_reserved_word_and_a_hyperparameter_read_only_there_is_used():
    """A core spec may still call a local `refuse` (the word is a keyword only after a rule's condition);
    a hyperparameter that only a refusal reads draws no 'never used' warning."""
    X = optdsl.compile("optimizer X\nhyper lr = 0.1 in [0, inf)\nrefuse = 2 * lr\np -= refuse * g\n", "x.opt")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    X([p]).step()
    assert p[0].item() == pytest.approx(0.8)
    compiled = compile_source(SPEC, "picky.opt")
    assert not [w for w in compiled.warnings if "big" in w.message]
    assert [w.message for w in compile_source(SPEC.replace("ndim >= big", "ndim >= 3"), "p.opt").warnings
            if "big" in w.message] == ["hyperparameter 'big' is never used"]


def test_the_reason_stays_text_in_the_generated_module():
    """Braces and a backslash in the reason reach the error as written, U+2028 as its escape (the
    module holds it in a string literal through optdsl/escape.py, not in an f-string's code)."""
    python = compile_source(SPEC, "picky.opt").python
    assert "\u2028" not in python
    assert '"rank {ndim} \\\\ is too many for this spec: \\\\u2028reshape it (picky.opt:6: rule ndim >= big refuse)"' in python


def test_the_reason_and_file_name_reach_a_terminal_as_text():
    """The ValueError is printed to a terminal: a lone CR, a form feed, U+2028/U+0085 in the reason, or an
    ESC in the file name (which the module's literal escapes, and which would read back as ESC) must show
    as escapes, as optdsl's own errors do (optdsl.escape.visible), not move the cursor or hide the
    text before them."""
    src = 'optimizer X\nhyper lr = 0.1 in [0, inf)\nrule ndim >= 3 refuse "a\rb\x0cc\u2028d\u0085e\tf"\nrule {\n  p -= lr * g\n}\n'
    X = optdsl.compile(src, "evil\x1b[2J\r.opt")
    with pytest.raises(ValueError) as err:
        X([torch.nn.Parameter(torch.zeros(1, 1, 1))])
    message = str(err.value)
    assert message == ("X refuses a parameter of shape (1, 1, 1): a\\rb\\x0cc\\u2028d\\x85e\tf "
                       "(evil\\x1b[2J\\r.opt:3: rule ndim >= 3 refuse)")
    assert all(c.isprintable() or c == "\t" for c in message)
    with pytest.raises(ValueError) as err:
        info.memory(compile_source(src, "evil\x1b.opt"), (1, 1, 1))
    assert all(c.isprintable() or c == "\t" for c in str(err.value)), str(err.value)


def test_equiv_does_not_call_specs_equivalent_when_one_refuses_what_the_other_steps():
    """`optdsl equiv` compares the steps rule by rule; a refusal is no step, and a spec that refuses
    rank-3 tensors is not the same optimizer as one that steps them (exit code 2, undecided, naming
    the refusals), while the same refusals on both sides keep the proof."""
    from optdsl.equiv import equivalent
    refusing = compile_source('optimizer A\nhyper lr = 0.1 in [0, inf)\nrule ndim >= 3 refuse "no"\n'
                              'rule {\n  p -= lr * g\n}\n', "a.opt")
    plain = compile_source('optimizer B\nhyper lr = 0.1 in [0, inf)\np -= lr * g\n', "b.opt")
    for a, b in ((refusing, plain), (plain, refusing)):
        verdict = equivalent(a, b)
        assert not verdict.equal and not verdict.proven and verdict.exit_code == 2, verdict.message
        assert "ndim >= 3" in verdict.message, verdict.message
    assert equivalent(refusing, refusing).equal


def test_a_condition_computes_in_ieee_on_the_host():
    """A rule's condition is Python on the host, run when a group is added (for a refusal) and at each
    step: `1 / (ndim - 2)` on a matrix is inf as in torch and IEEE 754 (so the refusal applies), not a
    ZeroDivisionError; info evaluates the same code."""
    src = ('optimizer D\nhyper lr = 0.1 in [0, inf)\nrule 1 / (ndim - 2) > 0 refuse "rank 3 and up"\n'
           'rule 1 / (ndim - 2) < 0 {\n  p -= lr * g\n}\nrule {\n  p -= 2 * lr * g\n}\n')
    D = optdsl.compile(src, "d.opt")
    with pytest.raises(ValueError, match="refuses a parameter of shape"):
        D([torch.nn.Parameter(torch.zeros(4, 3))])  # 1 / 0 = inf > 0
    with pytest.raises(ValueError, match="refuses a parameter of shape"):
        D([torch.nn.Parameter(torch.zeros(1, 1, 1))])
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    D([p]).step()
    assert p[0].item() == pytest.approx(0.9)
    assert info.memory(compile_source(src, "d.opt"), (3,)).rule == "1 / (ndim - 2) < 0"


def test_a_refusal_at_step_comes_before_any_parameter_moves():
    """A group whose values changed so that it refuses a parameter: the step raises before it updates
    any group (the first group's parameter, its state and step count as they were), on every path."""
    Picky = optdsl.compile(SPEC, "picky.opt")
    for mode in paths_here():
        p, q = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(2, 2, 2))
        opt = Picky([{"params": [p]}, {"params": [q], "big": 4}], **mode)
        p.grad, q.grad = torch.ones(4, 3), torch.ones(2, 2, 2)
        opt.step()
        before = p.detach().clone(), opt.state[p]["m"].clone(), opt.state[p]["step"].clone()
        opt.param_groups[1]["big"] = 3
        with pytest.raises(ValueError, match=re.escape("Picky refuses a parameter of shape (2, 2, 2)")):
            opt.step()
        after = p.detach(), opt.state[p]["m"], opt.state[p]["step"]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), mode


def test_a_rank_a_refusal_takes_first_is_no_rank_error_of_a_later_rule():
    """ranks.check: a rule whose condition takes vectors is a spec error where its operations need
    matrices, unless a refusal (or rule) before it takes the vectors first."""
    src = ('optimizer M\nhyper lr = 0.1 in [0, inf)\nrule ndim < 2 refuse "matrices only"\nrule ndim >= 1 {\n'
           '  p -= lr * col_mean(g)\n}\nrule {\n  p -= lr * g\n}\n')
    M = optdsl.compile(src, "m.opt")
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.arange(6.0).reshape(2, 3)
    M([p]).step()
    assert torch.allclose(p.detach(), 1 - 0.1 * torch.tensor([1.5, 2.5, 3.5]))
    with pytest.raises(ValueError, match="matrices only"):
        M([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(optdsl.SpecError, match="takes parameters of rank 1"):  # a refusal of rank 0 only
        optdsl.compile(src.replace("ndim < 2", "ndim < 1"), "m.opt")


def test_a_condition_may_read_an_epsilon_of_none():
    """`hyper eps = None` reads as the machine epsilon of p's dtype; in a rule's condition (run when a
    group is added, before any step) it read the step's `params` (NameError)."""
    src = ('optimizer E\nhyper lr = 0.1 in [0, inf), eps = None\nrule eps > 1e-10 and ndim >= 3 refuse "float32 only"\n'
           'rule {\n  p -= lr * g / (abs(g) + eps)\n}\n')
    E = optdsl.compile(src, "e.opt")
    with pytest.raises(ValueError, match="float32 only"):
        E([torch.nn.Parameter(torch.ones(1, 1, 1))])  # float32: eps 1.2e-7
    E([torch.nn.Parameter(torch.ones(1, 1, 1, dtype=torch.float64))])  # float64: eps 2.2e-16
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    E([p], eps=1.0).step()
    assert p[0].item() == pytest.approx(0.95)
    with pytest.raises(ValueError, match="float32 only"):
        info.memory(compile_source(src, "e.opt"), (2, 3, 4))


def test_plot_says_a_refusal_as_its_error(tmp_path):
    """`optdsl plot` of a spec that refuses the plotted parameters (the 2-D point, a model's weights)
    or of a value out of range: one line saying why, exit 1, no traceback."""
    pytest.importorskip("matplotlib")
    from optdsl.plot import PlotError, plot
    spec = tmp_path / "y.opt"
    spec.write_text('optimizer Y\nhyper lr = 0.1 in [0, inf)\nrule ndim >= 1 refuse "no vectors"\nrule {\n  p -= lr * g\n}\n')
    with pytest.raises(PlotError, match=re.escape("Y refuses a parameter of shape (2,): no vectors")):
        plot([str(spec)], tmp_path / "y.png", ["rosenbrock"], [], 3, [], lambda *_: None)
    with pytest.raises(PlotError, match=re.escape("Invalid lr value: -1.0")):
        plot(["specs/sgd.opt"], tmp_path / "z.png", ["rosenbrock"], [], 3, ["lr=-1"], lambda *_: None)
    assert not (tmp_path / "y.png").exists()
