"""Compiling is bounded: code grows linearly with a loop's count, and what would not compile in
bounded time is refused with a located error.

An unrolled `repeat` reads each iterate more than once once printed (`c^2` is `c * c` in a
kernel), so its value written out as one expression doubles with every round: before each round
got a name, `c = 2*c^2 - 1` twelve times printed a 213,000-character line and 64 times never
finished. Sizes are asserted here, never wall time (the machine is shared).
"""
from __future__ import annotations

import pytest
import torch

import optdsl
from optdsl.errors import SpecError
from optdsl import axes, lower, parse
from optdsl.lower import MAX_RULES, MAX_SPEC_STATEMENTS, MAX_STATEMENTS, MAX_STATES
from optdsl.pipeline import compile_source

HEAD = "optimizer R\nhyper lr = 0.1\n"


def chebyshev(rounds: int, repeat: bool = True) -> str:
    """c = T_(2^rounds)(g): the doubling formula of the Chebyshev polynomials, `rounds` times."""
    body = "  c = 2*c^2 - 1\n"
    loop = f"repeat {rounds} {{\n{body}}}\n" if repeat else f"repeat 1 {{\n{body}}}\n" * rounds
    return HEAD + "c = g\n" + loop + "p -= lr * c\n"


def _base() -> int:
    """The module of a one-statement spec: the templates' own size, which grows as they gain checks;
    the bounds below are on what a spec adds to it."""
    return len(compile_source(HEAD + "p -= lr * g\n").python)


def test_repeat_code_grows_linearly_with_the_count():
    sizes = {n: compile_source(chebyshev(n)).python for n in (16, 32, 64)}
    lengths = {n: len(code) for n, code in sizes.items()}
    longest = {n: max(map(len, code.splitlines())) for n, code in sizes.items()}
    # linear: 32 more rounds add about twice what 16 more did (exponential would square it)
    assert lengths[64] - lengths[32] <= 2.5 * (lengths[32] - lengths[16])
    assert lengths[64] - _base() < 64 * 400  # each round a line of under 200 characters, on two paths
    assert longest[64] == longest[16] < 200  # each round is a line of its own


def test_unrolled_loop_written_out_gives_the_same_source_size_order():
    """The loop written out as separate one-round blocks is not named; repeat is, and is no larger."""
    named = compile_source(chebyshev(8)).python
    written = compile_source(chebyshev(8, repeat=False)).python
    assert len(named) <= len(written)


def _step_all(cls, g_seq, shape, dtype=torch.float64, **kw):
    """p after stepping on each gradient of g_seq, on the for-loop, foreach and fused paths."""
    out = {}
    for path in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        opt = cls([p], **path, **kw)
        for g in g_seq:
            p.grad = g.clone()
            opt.step()
        out[next(iter(path.items()))] = p.detach().clone()
    return out


@pytest.mark.parametrize("shape", [(1,), (7,), (13, 5), (3, 1, 4)])
def test_unrolled_repeat_computes_what_it_computed_unnamed_and_the_reference(shape):
    """Differential: the named rounds equal the same statements written out (which the plan does
    not name) and a handwritten loop. c stays in [-1, 1]; an error in c grows by at most
    |T'| <= 4 per round, so 6 rounds in float64 amplify rounding by 4^6 ~ 4e3: 1e-11 is ample."""
    rounds, steps = 6, 3
    gen = torch.Generator().manual_seed(0)
    gs = [torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(steps)]
    named = _step_all(optdsl.compile(chebyshev(rounds)), gs, shape)
    written = _step_all(optdsl.compile(chebyshev(rounds, repeat=False)), gs, shape)
    ref = torch.zeros(shape, dtype=torch.float64)
    for g in gs:
        c = g.clone()
        for _ in range(rounds):
            c = 2 * c * c - 1
        ref -= 0.1 * c
    for path in named:
        torch.testing.assert_close(named[path], ref, rtol=0, atol=1e-11)
        torch.testing.assert_close(named[path], written[path], rtol=0, atol=1e-11)


@pytest.mark.parametrize("body, ref", [
    # host scalars of the hyperparameters and of t: named per round on the host
    ("k = lr\nrepeat 12 {\n  k = lerp(k, sqrt(k + t), 0.5)\n}\np -= k * g\n", "param"),
    # a 0-dim tensor (it reads a reduction)
    ("k = norm(g)\nrepeat 12 {\n  k = sqrt(k + 1)\n}\np -= lr * k * g\n", "device"),
])
def test_scalar_rounds_are_named_at_their_level(body, ref):
    shape = (4, 3)
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    got = _step_all(optdsl.compile(HEAD + body), gs, shape)
    want = torch.zeros(shape, dtype=torch.float64)
    for t, g in enumerate(gs, 1):
        if ref == "param":
            k = 0.1
            for _ in range(12):
                k = k + 0.5 * ((k + t) ** 0.5 - k)
        else:
            k = torch.linalg.vector_norm(g)
            for _ in range(12):
                k = torch.sqrt(k + 1)
        want = want - (k if ref == "param" else 0.1 * k) * g
    for path, p in got.items():  # a dozen dependent roundings of numbers of order 1..1e3
        torch.testing.assert_close(p, want, rtol=1e-12, atol=0, msg=str(path))


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_source(text, "deep.opt")
    err = info.value
    assert err.span is not None and "this is a bug" not in str(err), str(err)
    return err


def test_nested_repeats_beyond_the_statement_budget_are_refused_at_the_loop():
    text = HEAD + "c = g\nrepeat 64 {\n  repeat 64 {\n    repeat 64 {\n      c = c * c\n    }\n  }\n}\np -= lr * c\n"
    err = _error(text)
    assert (err.span.line, err.span.column) == (4, 8)
    assert "unrolls to 262144 statements" in str(err) and f"at most {MAX_STATEMENTS}" in str(err)


def test_the_statement_budget_counts_the_whole_rule():
    body = "".join(f"  c{i} = c * {i}\n" for i in range(2))
    fits = HEAD + "c = g\nrepeat 63 {\n" + body + "}\np -= lr * c\n"  # 1 + 126 statements
    compile_source(fits)
    err = _error(HEAD + "c = g\nd = g\nc = c + d\nrepeat 63 {\n" + body + "}\np -= lr * c\n")
    assert err.span.line == 6 and "129 in all" in str(err)


def test_straight_line_statements_share_the_budget():
    """Without a loop too: 5,000 statements took 35 s to compile; the one past the budget is named."""
    lines = "".join(f"x{i} = g * {i + 1}\n" for i in range(MAX_STATEMENTS - 1))
    compile_source(HEAD + lines + "p -= lr * x0\n")  # exactly the budget: fits
    err = _error(HEAD + lines + "x = g\np -= lr * x\n")  # one more: refused at the one past the budget
    assert err.span.line == HEAD.count("\n") + MAX_STATEMENTS + 1 and f"more than {MAX_STATEMENTS}" in str(err)


def test_states_past_the_limit_are_refused_at_the_first_one_too_many():
    """200 states took 7 s to compile: a spec declares at most MAX_STATES, counted over its rules."""
    def spec(n):
        names = ", ".join(f"m{i}" for i in range(n))
        return HEAD + f"state {names}\n" + "".join(f"m{i} = lerp(m{i}, g, 0.1)\n" for i in range(n)) + "p -= lr * m0\n"
    compile_source(spec(MAX_STATES))
    err = _error(spec(MAX_STATES + 1))
    line = spec(MAX_STATES + 1).splitlines()[err.span.line - 1]
    assert f"{MAX_STATES + 1} states" in str(err) and line[err.span.column - 1:].startswith(f"m{MAX_STATES}")


def _rules(n: int, body: str = "  p -= lr * g\n") -> str:
    """n rules, each its own condition, the last without one."""
    return HEAD + "".join(f"rule numel == {i + 1} {{\n{body}}}\n" for i in range(n - 1)) + f"rule {{\n{body}}}\n"


def test_rules_past_the_limit_are_refused_at_the_first_one_too_many():
    """Each rule is checked, planned and printed on its own: the rules' count bounds the compile time."""
    lower.lower_rules(parse.parse(_rules(MAX_RULES)))  # exactly the limit: fits (lowered, not compiled)
    text = _rules(MAX_RULES + 1)
    err = _error(text)
    assert (err.span.line, err.span.column) == (HEAD.count("\n") + 3 * MAX_RULES + 1, 1), str(err)
    assert f"{MAX_RULES + 1} rules; a spec may have at most {MAX_RULES}" in str(err)
    assert f"deep.opt:{err.span.line}:1" in str(err) and "^^^^" in str(err)  # file, line, column, caret


STATE_LIST = """rule ndim >= 1 and numel > {i} {{
  state Q[a]: axis(a) if d[a] == 1 else gram(a) = eye
  u = g
  for axis a {{
    u = mm_axis(Q[a], u, a)
  }}
  p -= lr * u
}}
"""


def test_state_lists_count_as_the_rules_they_unroll_to():
    """One state-list rule is a rule per rank (1 to axes.MAX_RANK) and one refusing the ranks past them: a
    few fit with room (kron.opt has one); past MAX_RULES, refused at the state-list rule that passes it."""
    per_list = axes.MAX_RANK + 1
    assert 4 * per_list <= MAX_RULES
    n = MAX_RULES // per_list + 1  # the last of them passes the limit
    lists = [STATE_LIST.format(i=i) for i in range(n)]
    text = HEAD + "".join(lists) + "rule {\n  p -= lr * g\n}\n"
    err = _error(text)
    last = HEAD.count("\n") + sum(x.count("\n") for x in lists[:-1]) + 1
    assert (err.span.line, err.span.column) == (last, 1), str(err)
    assert f"{n * per_list + 1} rules once state lists are unrolled ({n * axes.MAX_RANK} from state lists" in str(err)


def test_the_statements_of_all_rules_share_a_budget():
    """MAX_STATEMENTS per rule, and MAX_SPEC_STATEMENTS over the rules: refused at the rule that passes it."""
    body = "".join(f"  x{i} = g * {i + 1}\n" for i in range(MAX_STATEMENTS - 1)) + "  p -= lr * x0\n"
    fits = MAX_SPEC_STATEMENTS // MAX_STATEMENTS
    lower.lower_rules(parse.parse(_rules(fits, body)))  # 12 full rules: exactly the budget
    err = _error(_rules(fits + 1, body))
    assert (err.span.line, err.span.column) == (HEAD.count("\n") + fits * (MAX_STATEMENTS + 2) + 1, 1), str(err)
    assert f"{(fits + 1) * MAX_STATEMENTS} statements up to this one" in str(err)
    assert f"at most {MAX_SPEC_STATEMENTS} over all its rules" in str(err)


@pytest.mark.parametrize("expr", [
    "lerp(" * 40 + "g" + ", g, 0.3)" * 40,               # Triton's lerp reads each end twice
    "(" * 30 + "g" + " + 1)^2" * 30,                     # x^2 prints as x * x in a kernel (2 levels a
                                                         # round: 40 rounds pass sym.MAX_DEPTH)
    "sign(" * 30 + "g" + ")" * 30,                       # Triton's sign reads its operand thrice
])
def test_a_nested_expression_that_printers_copy_stays_small(expr):
    code = compile_source(HEAD + f"p -= lr * {expr}\n").python
    assert len(code) - _base() < 40 * 500 and max(map(len, code.splitlines())) < 2_000  # linear in the depth


def test_a_host_scalar_that_printers_copy_stays_small():
    code = compile_source(HEAD + "p -= " + "lerp(" * 40 + "lr" + ", lr, 0.3)" * 40 + " * g\n").python
    assert len(code) - _base() < 40 * 500 and max(map(len, code.splitlines())) < 2_000  # 2^40 if copied


@pytest.mark.parametrize("text", [
    HEAD + "p -= lr * " + "-" * 3000 + "g\n",
    HEAD + "p -= lr * " + "abs(" * 1500 + "g" + ")" * 1500 + "\n",
    HEAD + "p -= lr * " + "(" * 3000 + "g" + ")" * 3000 + "\n",
    HEAD + "p -= lr * " + " + ".join(["g"] * 3000) + "\n",
    HEAD + "p -= lr * " + "^".join(["1"] * 3000) + " * g\n",
])
def test_deep_nesting_is_the_nested_too_deeply_error(text):
    """Never a raw VisitError, RecursionError, OverflowError or NotImplementedError."""
    try:
        compile_source(text, "deep.opt")
    except SpecError as err:
        assert err.span is not None and "this is a bug" not in str(err), str(err)


def test_many_reductions_in_sequence_compile_and_say_why_they_are_not_fused():
    cls = optdsl.compile(HEAD + "c = g\nrepeat 20 {\n  c = c / norm(c)\n}\np -= lr * c\n")
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    p.grad = torch.arange(1.0, 6.0, dtype=torch.float64)
    cls([p], foreach=True).step()
    torch.testing.assert_close(p.detach(), -0.1 * p.grad / torch.linalg.vector_norm(p.grad), rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="more than 8 reductions in sequence are not fused"):
        cls([p], fused=True).step()


@pytest.mark.parametrize("depth", [3, 40])
def test_the_step_shape_replay_stays_small(depth):
    """A rule whose shapes only the parameter decides gets a replay of its statements, each printed
    whole (optdsl/backends/step_shapes.py); lerp's printed form holds its first end twice, so nested
    lerps would double the line with every level (114,675 characters at 12). Past a bound the replay
    is not made, and a step's ShapeError names every such statement instead of the one that fails."""
    text = (HEAD + "rule ndim == 2 {\n  x = where(nrows > ncols, T(g), g)\n  A = mm(x, T(x))\n  y = "
            + "lerp(" * depth + "x" + ", x, 0.3)" * depth + "\n  B = mm(A, col_mean(y))\n"
            "  p -= lr * mean(B) * g\n}\nrule {\n  p -= lr * g\n}\n")
    code = compile_source(text, "deep.opt").python
    # what the spec adds to the templates' own module (45,000 characters at depth 40; doubling per level
    # would be astronomical): the templates grow as they gain checks
    assert len(code) - _base() < 60_000 and max(map(len, code.splitlines())) < 2_000
    assert ("def _shapes_r_0" in code) == (depth == 3)
    cls = optdsl.compile(text, "deep.opt")
    p = torch.nn.Parameter(torch.ones(3, 5, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError) as err:
        cls([p], foreach=False).step()
    assert type(err.value).__name__ == "ShapeError"
    if depth == 3:
        assert "deep.opt:7:3: B = mm(A, col_mean(y))\n" in str(err.value) and "deep.opt:6" not in str(err.value)
    else:
        shown = str(err.value)
        assert "in one of deep.opt:5: A = mm(x, T(x)); deep.opt:6: y = lerp(" in shown, shown
        assert "deep.opt:7: B = mm(A, col_mean(y)) (parameters of shape (3, 5))" in shown, shown


def chain(n: int, line: str) -> str:
    """n straight-line statements, each reading the one before it twice (no loop names them)."""
    body = "".join(f"x{i} = {line.format(x=f'x{i - 1}', i=i)}\n" for i in range(1, n + 1))
    return HEAD + "x0 = g\n" + body + f"p -= lr * x{n}\n"


def test_a_value_read_twice_is_named_once_it_is_large():
    """`x2 = x1 * g + x1 / (g + 2)` and so on doubles x's tree each statement: the plan names a value read
    more than once past sym.MAX_SHARED_TREE nodes, as it names a loop's rounds, so every value it keeps
    whole stays small (20 statements: a tree of 10^7 nodes unnamed, counted up to 2^20) and the module grows linearly."""
    from optdsl import functions as fn, sym
    spec = parse.parse(chain(20, "{x} * g + {x} / (g + {i})"))
    (_, program), = lower.lower_rules(spec)[0]
    _, _, env, outputs, barriers = sym.named_meanings(program)
    largest = max(fn.tree_size(e) for e in [*env.values(), *outputs.values(), *(b for _, b in barriers)])
    assert largest <= 4 * sym.MAX_SHARED_TREE, largest
    assert len(barriers) >= 20 // 8  # named about every log2(MAX_SHARED_TREE) statements
    lengths = {n: len(compile_source(chain(n, "max(sqrt(abs({x}) + {i}) * g, {x} / (abs(g) + {i}))")).python)
               for n in (16, 32, 64)}
    assert lengths[64] - lengths[32] < 3 * (lengths[32] - lengths[16]), lengths


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1, 4)])
def test_named_large_values_compute_the_reference(shape):
    """Differential: 24 such statements (named where large) against the loop written in torch, 2 steps,
    float64. Each statement is a max of non-negative terms, no cancellation: 1e-12 relative is ample."""
    n, steps = 24, 2
    cls = optdsl.compile(chain(n, "max(sqrt(abs({x}) + {i}) * abs(g), {x} / (abs(g) + {i}))"))
    gen = torch.Generator().manual_seed(2)
    gs = [torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1 for _ in range(steps)]
    for path in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        opt, ref = cls([p], **path), torch.zeros(shape, dtype=torch.float64)
        for g in gs:
            p.grad = g.clone()
            opt.step()
            x = g.clone()
            for i in range(1, n + 1):
                x = torch.maximum(torch.sqrt(x.abs() + i) * g.abs(), x / (g.abs() + i))
            ref -= 0.1 * x
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=0, msg=str(path))


# ---- the depth and size of what the plan keeps (optdsl/sym.py MAX_DEPTH, MAX_WORK) ----

def test_a_value_nested_past_the_depth_limit_is_refused_at_its_statement():
    """`x2 = abs(x1) + g`, each read once, nests: SymPy's Abs walks its whole argument each time it is
    made, so 126 of them took 121 s and ended in a RecursionError. Each statement adds 2 levels (Abs and
    +): the first value deeper than MAX_DEPTH is refused at its line, before any analysis runs."""
    from optdsl import sym
    n = sym.MAX_DEPTH // 2 + 4
    err = _error(chain(n, "abs({x}) + g"))
    deep = next(i for i in range(1, n + 1) if 2 * i + 1 > sym.MAX_DEPTH)  # x_i: Add(Abs(...), g), x0 = g
    assert err.span.line == 3 + deep, str(err)  # HEAD is 2 lines, then x0
    assert f"at most {sym.MAX_DEPTH}" in str(err) and "operations deep" in str(err)
    compile_source(chain(deep - 2, "abs({x}) + g"))  # two fewer compile: p -= lr * x adds 2 levels


def test_a_statement_that_flattens_is_not_deep():
    """Depth is SymPy's, not the IR's: `x * 0.5 + g` chained 120 times is one sum (3 levels)."""
    compile_source(chain(120, "{x} * 0.5 + g"))


def _mix(n: int, rules: int = 1) -> str:
    line = "max(abs({x}), g) * sign({x} - g) + where({x} > 0, sqrt(abs({x})), g)"
    if rules == 1:
        return chain(n, line)
    body = chain(n, line)[len(HEAD):]
    return HEAD + "".join(f"rule numel == {r + 1} {{\n{body}}}\n" for r in range(rules))


def test_a_rule_past_the_work_limit_is_refused_at_the_statement_that_passes_it():
    from optdsl import sym
    err = _error(_mix(120))
    assert "operations here" in str(err) and f"at most {sym.MAX_WORK}" in str(err)
    line = err.span.line
    assert 5 < line < 3 + 120, str(err)
    compile_source(_mix(line - 5))  # the statements before it (less one: p's update adds the last) compile


def test_the_rules_share_the_work_limit_and_are_refused_before_the_analyses(monkeypatch):
    """Twelve rules each within the limit, together past it: refused at a statement of a later rule,
    and before check.check runs (what the analyses cost is what the limit bounds)."""
    from optdsl import check, sym
    one = _mix(30)[len(HEAD):]
    from optdsl.pipeline import compile_source as compile_one
    compile_one(HEAD + one)  # one rule alone is fine
    called = []
    monkeypatch.setattr(check, "check", lambda *a, **k: called.append(1) or ())
    err = _error(_mix(30, rules=12))
    assert "over all its rules" in str(err) and f"at most {sym.MAX_WORK}" in str(err), str(err)
    assert err.span.line > len((HEAD + one).splitlines()) + 2  # in a rule after the first
    assert not called


def test_every_shipped_spec_is_within_the_limits_with_room():
    """The limits are not tuned to pass the specs by a hair: the largest (kron.opt) keeps at least a
    tenth of MAX_WORK free, and every value is at most half MAX_DEPTH deep."""
    from pathlib import Path
    from optdsl import sym
    for path in sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.opt")):
        lowered, _ = lower.lower_rules(parse.parse(path.read_text(), path.name))
        work = sum(sym._named_meanings(p)[-1][-1][1] for _, p in lowered if p.eqns)
        assert work <= 0.9 * sym.MAX_WORK, (path.name, work)
        depths: dict = {}
        deepest = max(sym.depth(e, depths) for _, p in lowered for e in sym.named_meanings(p)[2].values())
        assert deepest <= sym.MAX_DEPTH // 2, (path.name, deepest)


def test_min_and_max_order_only_what_is_cheap_and_keep_the_rest_as_written():
    """functions.minmax: numbers fold, a difference that is a number orders, a known sign orders; two
    arguments whose order is unknown stay, both, in either order given."""
    import sympy as sp
    from optdsl.functions import minmax
    x, y = sp.symbols("x y")
    w = sp.Symbol("w", nonnegative=True)
    assert minmax(sp.Max, x, x + 1) == x + 1 and minmax(sp.Min, x, x + 1) == x
    assert minmax(sp.Max, 2, 3, x) == sp.Max(3, x) and minmax(sp.Min, 2, 3) == 2
    assert minmax(sp.Max, w, 0) == w and minmax(sp.Min, w, 0) == 0
    assert minmax(sp.Min, x, sp.oo) == x and minmax(sp.Max, x, x) == x
    big = sum(sp.sqrt(sp.Abs(x) + i) for i in range(12))
    other = sum(sp.Abs(y) / (x + i) for i in range(12))
    assert set(minmax(sp.Max, big, other).args) == {big, other}
    assert minmax(sp.Max, big, other) == minmax(sp.Max, other, big)


def test_a_spec_past_the_character_limit_is_refused_where_it_passes_it():
    """Parsing is linear but not cheap (a 1 MB sum took 9 s to be refused): a spec is at most
    parse.MAX_SPEC_CHARS characters, comments included, refused at the character past them."""
    from optdsl.parse import MAX_SPEC_CHARS
    filler = "# " + "c" * 98 + "\n"
    lines = MAX_SPEC_CHARS // len(filler) + 1
    err = _error(HEAD + filler * lines + "p -= lr * g\n")
    assert err.span.line == 3 + (MAX_SPEC_CHARS - len(HEAD)) // len(filler), str(err)
    assert f"at most {MAX_SPEC_CHARS:,}" in str(err)
    fits = HEAD + filler * ((MAX_SPEC_CHARS - len(HEAD) - 20) // len(filler)) + "p -= lr * g\n"
    assert len(fits) <= MAX_SPEC_CHARS
    compile_source(fits)


def test_hyperparameters_past_the_limit_are_refused_at_the_first_one_too_many():
    from optdsl.lower import MAX_HYPERS
    def spec(n):  # lr and n more
        return HEAD + "".join(f"hyper h{i} = {i}\n" for i in range(n)) + "p -= lr * g" + "".join(
            f" + h{i} * g" for i in range(n)) + "\n"
    err = _error(spec(MAX_HYPERS))
    assert (err.span.line, err.span.column) == (2 + MAX_HYPERS, 7), str(err)  # h{MAX_HYPERS - 1}, the 129th
    assert f"at most {MAX_HYPERS}" in str(err)
    compile_source(spec(MAX_HYPERS - 1))


def test_group_statements_past_the_limit_are_refused_at_the_first_one_too_many():
    """Group statements are host scalars, outside the rules' statement budget: 400 took 6.9 s."""
    from optdsl.group import MAX_GROUP_STATEMENTS
    def spec(n):  # x0 .. x{n-2}, then k: n group statements
        return HEAD + "state k: group\ngroup x0 = k + lr\n" + "".join(
            f"group x{i + 1} = max(sqrt(abs(x{i}) + 2) * lr, x{i} / (abs(lr) + 2))\n" for i in range(n - 2)) + (
            f"group k = x{n - 2}\np -= k * g\n")
    err = _error(spec(MAX_GROUP_STATEMENTS + 1))
    assert err.span.line == 4 + MAX_GROUP_STATEMENTS, str(err)  # the 65th, after HEAD and the state
    assert f"more than {MAX_GROUP_STATEMENTS} group statements" in str(err)
    compile_source(spec(MAX_GROUP_STATEMENTS))
