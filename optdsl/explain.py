"""What an update rule *is*, derived by SymPy from the spec: `optdsl explain SPEC`.

Each property says how it was obtained: proven symbolically, bounded by the
interval analysis, or (where SymPy gives up) checked numerically.
"""
from __future__ import annotations

import contextlib
import random
import signal
import threading
from dataclasses import dataclass

import sympy as sp

from . import functions as fn
from . import ir, quant
from .check import _Ranges
from .errors import SpecWarning
from .pipeline import Compiled
from .ranges import Interval, bound
from .rewrite import scalar_env
from .mathtext import fold_repeats, group_math, mode_math, statement_math
from .sym import DEVICE, TENSOR, has_matrix_work, meanings, to_sympy

FLOAT32 = 4


@dataclass(frozen=True)
class Property:
    name: str
    value: str
    how: str  # "proven", "interval bound", "numerical check", "counted", ...


@dataclass(frozen=True)
class Section:
    """One rule of a spec: its condition on the parameter's shape (None for a spec of one rule, or
    the rule for every other parameter), its math and what the analyses derive from it."""
    condition: str | None
    rule: tuple[str, ...]        # one line per statement, Unicode
    latex: tuple[str, ...]       # one line per statement, LaTeX
    properties: tuple[Property, ...]
    skipped: str = ""            # the analyses not run on this rule, and why
    refused: str = ""            # `rule COND refuse "why"`: why (no math, no properties)


@dataclass(frozen=True)
class Explanation:
    name: str
    doc: str
    sections: tuple[Section, ...]  # one per rule, in the spec's order
    risks: tuple[SpecWarning, ...]
    group: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # the group statements: Unicode, LaTeX
    modes: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # (eval/train, Unicode, LaTeX)

    # a spec of one rule (most specs): its math and properties directly
    rule = property(lambda self: self.sections[0].rule)
    latex = property(lambda self: self.sections[0].latex)
    properties = property(lambda self: tuple(p for x in self.sections for p in x.properties))

    def property(self, name: str, rule: int = 0) -> Property:
        return next(p for p in self.sections[rule].properties if p.name == name)


# ---- cost ----
def _cost(prog: ir.Program, plan) -> list[Property]:
    tensor_exprs = [d.expr for d in plan.steps if d.level == TENSOR] + [e for _, e in plan.outputs]
    tensor_exprs += [d.expr.args[0] for d in plan.steps if d.level == DEVICE and fn.REDUCTIONS.get(type(d.expr))]
    # a state shaped like p costs per element; a scalar or reduced one per parameter (optdsl info)
    full = {s.name for s in prog.states if s.shape in ("full", "bool")}
    read = [s for s in plan.inputs if any(s in e.free_symbols for e in tensor_exprs) and str(s) in full | {"p", "g"}]
    written = [base for base, e in plan.outputs if e != sp.Symbol(base) and base in full | {"p"}]
    ops = sum(sp.count_ops(e) for e in tensor_exprs)
    n_states = len(full)
    # a matrix state with its size per matrix of p: GaLore's P (rank x ncols), Shampoo's L (nrows x nrows)
    square = {"gram_rows": ("nrows", "nrows"), "gram_cols": ("ncols", "ncols")}
    square |= {s.shape: ((f"d[{k}]",) * 2 if form != "axis" else (f"d[{k}]", "1")) for s in prog.states
               if (axis := ir.axis_kind(s.shape)) for form, k in [axis]}  # per axis K of p (d[K]: its size)
    # a state list's factor: the matrix, or its diagonal where the parameter makes it diagonal
    others = [s.name + (" ({} x {}{})".format(*(ir.matrix_dims(s.shape) or square[s.shape]),
                                             f", or d[{ir.axis_kind(s.shape)[1]}] diagonal" if s.diag is not None else "")
                        if ir.is_matrix(s.shape) else "")
              for s in prog.states if s.name not in full]
    return [
        Property("state memory per element", f"{n_states} x {FLOAT32} B = {n_states * FLOAT32} B (float32)"
                 + (f", plus {', '.join(others)} per parameter" if others else ""), "counted"),
        Property("bytes per element per step",
                 f"{(len(read) + len(written)) * FLOAT32} B: reads {', '.join(map(str, read))}; "
                 f"writes {', '.join(written)}", "counted from the plan"),
        Property("arithmetic per element", f"{ops} operations", "counted after CSE (sympy.count_ops)"),
    ]


# ---- behaviour, from the SymPy meaning of one or two steps ----
class _Steps:
    """The meaning of the first steps from fresh state, as functions of the gradients."""

    def __init__(self, prog: ir.Program):
        self.prog = prog
        self.syms, _, outputs = meanings(prog)
        self.outputs = {base: fn.meaning(e) for base, e in outputs.items()}  # once, not once per step run
        self.hypers = {self.syms[h.name]: sp.Symbol(h.name, **({"nonnegative": True} if h.lo >= 0 else
                                                              {"real": True})) for h in prog.hypers}
        self.p = sp.Symbol("p", real=True)

    def fresh(self, p) -> dict:
        values = {self.syms[ir.P0]: p}
        for s in self.prog.states:
            init = to_sympy(s.init, {**self.syms, ir.P0: p}) if s.init is not None else sp.Integer(0)
            values[self.syms[ir.ssa_name(s.name, 0)]] = init
        return values

    def run(self, grads, p) -> sp.Expr:
        """p after len(grads) steps from fresh state."""
        values = self.fresh(p)
        for t, g in enumerate(grads, start=1):
            subs = {**values, self.syms[ir.G0]: g, self.syms["t"]: t}
            new = {base: e.xreplace(subs) for base, e in self.outputs.items()}
            values = {self.syms[ir.P0]: new["p"], **{self.syms[ir.ssa_name(s.name, 0)]: new[s.name]
                                                      for s in self.prog.states}}
        return values[self.syms[ir.P0]].xreplace(self.hypers)


def _hyper_sample(h: ir.Hyper, rng: random.Random, use_default: bool) -> float:
    if use_default:
        return h.default
    lo = h.lo if h.lo > float("-inf") else -3.0
    hi = h.hi if h.hi < float("inf") else lo + 3.0
    return lo + (hi - lo) * rng.uniform(0.05, 0.95)


def _one_element(expr: sp.Expr) -> sp.Expr:
    """Reductions of numbers as over a one-element tensor (the host forms), so they evaluate."""
    return expr.replace(lambda e: type(e) in fn.REDUCTIONS and e.args[0].is_number,
                        lambda e: sp.Abs(e.args[0]) if isinstance(e, (fn.norm, fn.rms)) else e.args[0])


def _numeric_zero(expr: sp.Expr, symbols, prog: ir.Program, trials: int = 12) -> bool:
    """Zero at every sampled point: inputs random, hyperparameters at defaults or anywhere in range."""
    rng = random.Random(0)
    for i in range(trials):
        hypers = {sp.Symbol(h.name, **({"nonnegative": True} if h.lo >= 0 else {"real": True})):
                  _hyper_sample(h, rng, use_default=i % 2 == 0) for h in prog.hypers}
        point = {s: rng.uniform(0.1, 3.0) * rng.choice([1, -1] if not s.is_positive else [1]) for s in symbols}
        # one substitution of numbers for every symbol: SymPy then evaluates numbers alone (substituted
        # in two passes, each Max/Min of the half-numeric first pass compared its symbols, ~3 s on AdamW)
        value = complex(_one_element(expr.xreplace({**point, **hypers})).evalf(30))
        if abs(value) > 1e-12:
            return False
    return True


def _scale_invariance(steps: _Steps) -> Property:
    try:
        return _scale_invariance_of(steps)
    except TypeError:  # a value SymPy cannot evaluate at a point: the loss, the shape, an axis reduction
        return Property("invariant to g -> c*g (c > 0)", "not decided",
                        "the step reads values the numerical check cannot sample (loss, shape, axis reductions)")


def _scale_invariance_of(steps: _Steps) -> Property:
    c = sp.Symbol("c", positive=True)
    g1, g2, p = sp.Symbol("g1", real=True), sp.Symbol("g2", real=True), steps.p
    diff = steps.run([c * g1, c * g2], p) - steps.run([g1, g2], p)
    name = "invariant to g -> c*g (c > 0)"
    symbols = [c, g1, g2, p]
    # hyperparameters that may be 0 and default to (nearly) 0: eps, weight decay, ...
    zeroable = [s for h, s in zip(steps.prog.hypers, steps.hypers.values()) if h.lo == 0 and h.default <= 1e-6]
    for zeroed in ([], zeroable) if zeroable else ([],):
        if not _numeric_zero(diff.subs({s: 0 for s in zeroed}), symbols, steps.prog):
            continue  # a counterexample settles it
        for s in list(zeroed):  # keep only the ones that matter
            rest = [z for z in zeroed if z != s]
            if _numeric_zero(diff.subs({z: 0 for z in rest}), symbols, steps.prog):
                zeroed = rest
        candidate = diff.subs({s: 0 for s in zeroed})
        value = "yes" if not zeroed else f"only when {', '.join(map(str, zeroed))} = 0"
        if _proven_zero(candidate):
            return Property(name, value, "proven over two steps")
        return Property(name, value, "numerical check over two steps (SymPy could not prove it)")
    return Property(name, "no", "a numerical counterexample over two steps")


def _proven_zero(e: sp.Expr) -> bool:
    if sp.count_ops(e) > 300:  # simplify can take minutes on large expressions: not proven
        return False
    try:
        with time_limit(SYMPY_SECONDS):
            e = e.replace(lambda m: isinstance(m, (sp.Max, sp.Min)), _pull_positive)
            # cancel (a rational function in e's atoms, sqrt(v) one of them) proves most differences 0
            # at a fraction of simplify's cost (AdamW's two: 0.18 s, simplify 0.54 s); simplify the rest
            return sp.cancel(e) == 0 or sp.simplify(e) == 0
    except Exception:  # noqa: BLE001 - SymPy gave up or ran out of time: then it is not proven
        return False


def _pull_positive(m):
    """max(c^2 a, c^2 b) as c^2 max(a, b) for a positive common factor, which SymPy leaves alone:
    AMSGrad's max(v_max, v) under g -> c g took simplify past its time limit, unproven."""
    try:
        common = sp.factor_terms(sp.gcd_list(list(m.args)))
    except Exception:  # noqa: BLE001 - no polynomial gcd (a sqrt, a Min inside): left as it is
        return m
    positive = sp.Mul(*[f for f in sp.Mul.make_args(common) if f.is_positive])
    if positive == 1:
        return m
    return positive * type(m)(*[sp.cancel(a / positive) for a in m.args])


SYMPY_SECONDS = 5


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after `seconds` of CPU time (main thread; elsewhere no limit).

    CPU time, not wall time, so that the same spec gets the same answer on a loaded machine."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


# p's sizes as the bounds show them: the built-ins by name, the products of axes the broadcast rule counts
# (optdsl/ir.py HIDDEN_SIZES) as what they are, prod(shape[:-2])
_SIZES_SHOWN = {sp.Symbol(n): sp.Symbol(code.replace("math.", "").replace("p.", ""))
                for n, code in ir.HIDDEN_SIZES.items()}


def _first_step(steps: _Steps, prog: ir.Program) -> list[Property]:
    g = sp.Symbol("g", real=True)
    dp = steps.run([g], sp.Integer(0)).xreplace({v: sp.Symbol(v.name) for v in steps.hypers.values()})
    gsym = sp.Symbol("g")
    dp = dp.xreplace({g: gsym})
    # a reduction of a scalar as what it computes: the scalar over its operand's shape, counted in p's
    # sizes (functions.broadcast_scalars), where SymPy prints sum(-2) for -2 in each of a rows value's rows
    dp = fn.broadcast_scalars(dp, lambda x: not fn.reads_tensor({gsym})(x)).xreplace(_SIZES_SHOWN)
    sizes = Interval(0.0, float("inf"), True, False)  # any size, 0 included
    env = {**scalar_env(prog), **{sp.Symbol(n): sizes for n in ir.SHAPE_BUILTINS}, **dict.fromkeys(_SIZES_SHOWN.values(), sizes)}
    pos = bound(dp, {**env, gsym: Interval(0, float("inf"), False, False)})
    neg = bound(dp, {**env, gsym: Interval(float("-inf"), 0, False, False)})
    against = pos.hi <= 0 and neg.lo >= 0
    direction = Property("first step moves against the gradient (from p = 0)",
                         "yes" if against else "not proven", "interval bound")
    return [direction, _step_bound(dp, gsym, env, pos.hull(neg))]


def _step_bound(dp: sp.Expr, g: sp.Symbol, env, interval: Interval) -> Property:
    name = "bound on |Δp| per element at step 1 (from p = 0)"
    hyper_syms = {s: sp.Symbol(s.name, nonnegative=True) for s in dp.free_symbols
                  if s != g and s in env and env[s].lo >= 0}
    try:  # each case of a where() on hyperparameters separately: the bound is the largest
        with time_limit(SYMPY_SECONDS):
            found = [_symbolic_sup(case, g, hyper_syms, name) for case in _cases(dp)]
        if any(f and f.value == "unbounded" for f in found):
            return next(f for f in found if f and f.value == "unbounded")
        if found and all(found):
            values = {f.value for f in found}
            value = values.pop() if len(values) == 1 else f"max({', '.join(sorted(values))})"
            return Property(name, value, found[0].how)
    except (NotImplementedError, ValueError, TypeError, TimeoutError):
        pass  # SymPy could not decide: fall back to the interval analysis
    # interval: factor out the hyperparameters that scale the whole step (lr, ...), bound the rest
    scale, rest = sp.Integer(1), dp
    if isinstance(dp, sp.Mul):
        scale = sp.Mul(*[a for a in dp.args if a.is_Symbol and a != g])
        rest = sp.Mul(*[a for a in dp.args if not (a.is_Symbol and a != g)])
    r = bound(rest, {**env, g: Interval.full()})
    if r.lo > float("-inf") and r.hi < float("inf"):
        k = sp.nsimplify(max(abs(r.lo), abs(r.hi)), [sp.pi], tolerance=1e-12)
        return Property(name, str(scale * k), "interval bound")
    return Property(name, "no bound found", "neither a symbolic limit nor the interval analysis bounds it")


def _cases(e: sp.Expr, limit: int = 8) -> list[sp.Expr]:
    """e with each where(c, a, b) whose condition SymPy cannot decide replaced by a, then by b."""
    node = next((w for w in sp.preorder_traversal(e) if isinstance(w, fn.where)), None)
    if node is None or limit <= 1:
        return [e]
    return [c for branch in node.args[1:] for c in _cases(e.xreplace({node: branch}), limit // 2)]


def _symbolic_sup(dp: sp.Expr, g: sp.Symbol, hyper_syms: dict, name: str) -> Property | None:
    """The supremum over g of |Δp|, from its limits as |g| -> inf and the sign of its slope."""
    gp = sp.Symbol("g", positive=True)
    candidates = []
    for sign in (1, -1):
        branch = sp.simplify(dp.xreplace(hyper_syms).xreplace({g: sign * gp}))
        limit = sp.limit(branch, gp, sp.oo)
        if limit.has(sp.oo, -sp.oo) and not limit.has(sp.zoo, sp.nan, sp.Limit):  # e.g. -lr*oo
            return Property(name, "unbounded", "proven: |Δp| -> inf as |g| -> inf")
        if limit.has(sp.zoo, sp.nan) or isinstance(limit, sp.Limit):
            return None
        candidates.append(sp.simplify(sp.Abs(limit)))
    if sp.simplify(candidates[0] - candidates[1]) == 0 and _monotone(dp, g):
        return Property(name, str(_tidy(candidates[0])), "proven: supremum at |g| -> inf")
    return None


def _monotone(dp, g) -> bool:
    """|Δp| grows with |g| (so its limit is its supremum): the slope never changes sign."""
    gp = sp.Symbol("g", positive=True)
    slope = sp.simplify(sp.diff(dp.xreplace({g: gp}), gp))
    return slope == 0 or slope.is_nonnegative or slope.is_nonpositive or bool(slope.free_symbols - {gp})


def _tidy(e: sp.Expr) -> sp.Expr:
    """The supremum of |e| over its cases, e.g. Lion's |Δp|: 0 where b1 = 1, lr elsewhere."""
    e = sp.piecewise_fold(e.args[0] if isinstance(e, sp.Abs) else e)
    pieces = [v for v, _ in e.args] if isinstance(e, sp.Piecewise) else [e]
    values = [_unit_signs(sp.simplify(sp.Abs(v))) for v in pieces]
    values = [v for v in values if v != 0]
    return sp.Max(*values) if values else sp.Integer(0)


def _unit_signs(e: sp.Expr) -> sp.Expr:
    """x/|x| is sign(x); |sign(x)| <= 1, attained wherever x != 0."""
    return e.rewrite(sp.sign).replace(lambda x: isinstance(x, sp.Abs) and isinstance(x.args[0], sp.sign),
                                      lambda x: sp.Integer(1))


def _state_ranges(prog: ir.Program) -> list[Property]:
    ranges = _Ranges(prog)
    ranges.prove_states()
    return [Property(f"range of state {s.name}", str(ranges.env[ranges.symbols[ir.ssa_name(s.name, 0)]]),
                     "proven by induction over steps") for s in prog.states]


def _lowbit_codes(prog: ir.Program) -> list[Property]:
    """The code each float state gets under state_dtype "int8" / "int4" (optdsl/quant.py), and why."""
    return [Property(f"int8/int4 code of state {name}",
                     f"{quant.MAP_NAMES[('int8', code.signed)]} / {quant.MAP_NAMES[('int4', code.signed)]}", code.why)
            for name, code in quant.codes(prog).items()]


def unexplained(compiled: Compiled) -> str:
    """Why the element-wise analyses (and so equiv) cannot take this spec as a whole ('' when they can)."""
    if compiled.rules:
        return f"{compiled.program.name} has rules by parameter shape; the analyses take one element-wise rule"
    return _matrix_work(compiled.program)


def _matrix_work(prog: ir.Program) -> str:
    if any(has_matrix_work(eq.expr) for eq in prog.eqns):
        return f"{prog.name} does matrix work (mm, T, linear algebra); the analyses model one element"
    return ""


# What an analysis of one element cannot evaluate (axis reductions, shapes, the loss) it says
# "not decided" about; these are SymPy's and the interval analysis' ways of saying so.
_UNDECIDED = (TypeError, ValueError, NotImplementedError, AttributeError, KeyError, RecursionError)


def _section(prog: ir.Program, plan, condition: str | None) -> Section:
    math = tuple(tuple(fold_repeats(statement_math(prog, latex, rounds=True), latex)) for latex in (False, True))
    props = _cost(prog, plan) + _lowbit_codes(prog)
    if _matrix_work(prog):  # its math and memory, not what models one element
        props = [p for p in props if p.name != "arithmetic per element"]  # matmuls are not per element
        return Section(condition, *math, tuple(props), skipped="arithmetic and the element-wise analyses: not "
                       "run, this rule does matrix work (mm, T, linear algebra) and they model one element")
    steps = _Steps(prog)
    for analysis in (lambda: _state_ranges(prog), lambda: [_scale_invariance(steps)],
                     lambda: _first_step(steps, prog)):
        try:
            props += analysis()
        except _UNDECIDED as err:  # say so for this rule; the others still run
            props.append(Property("not decided", f"{type(err).__name__}", "an analysis could not model this rule"))
    return Section(condition, *math, tuple(props))


def explain(compiled: Compiled) -> Explanation:
    """The math and properties of each rule (one for most specs)."""
    rules = compiled.rules or ((None, compiled.program, compiled.plan, None),)
    last = len(rules) - 1
    sections = []
    for i, (_, prog, plan, shown) in enumerate(rules):
        sections += [Section(f"parameters with {cond}", (), (), (), refused=why)
                     for before, _, why, cond, _ in compiled.refusals if before == i]
        sections.append(_section(prog, plan, f"parameters with {shown}" if shown is not None else
                                 "every other parameter" if i == last and (i or compiled.refusals) else None))
    sections += [Section(f"parameters with {cond}", (), (), (), refused=why)
                 for before, _, why, cond, _ in compiled.refusals if before == len(rules)]
    sections = tuple(sections)
    prog = compiled.program
    group = (tuple(group_math(prog, False)), tuple(group_math(prog, True)))
    modes = tuple((name, tuple(text), tuple(tex)) for (name, text), (_, tex) in
                  zip(mode_math(prog, False), mode_math(prog, True)))
    return Explanation(prog.name, prog.doc, sections, compiled.warnings, group, modes)


def report(x: Explanation, latex: bool = False) -> str:
    """The text `optdsl explain` prints."""
    lines = [f"{x.name}" + (f" — {x.doc}" if x.doc else "")]
    width = max(len(p.name) for p in x.properties)

    def block(title: str, text: tuple[str, ...], tex: tuple[str, ...]) -> list[str]:
        if latex:
            return ["", title, "\\begin{aligned}"] + [f"  {line} \\\\" for line in tex] + ["\\end{aligned}"]
        return ["", title] + [f"  {line}" for line in text]
    if x.group[0]:
        lines += block("Group values (once per group and step, before any parameter; a reduction runs over "
                       "the whole group):", *x.group)
    for section in x.sections:
        lines.append("")
        if section.refused:
            lines.append(f"Rule for {section.condition}: refused ({section.refused})")
            continue
        if section.condition:
            lines += [f"Rule for {section.condition}:", ""]
        if latex:
            lines += ["\\begin{aligned}"] + [f"  {line} \\\\" for line in section.latex] + ["\\end{aligned}"]
        else:
            lines.append("Update rule (per element, at step t = 1, 2, ...):" if not section.skipped else
                         "Update rule (at step t = 1, 2, ...):")
            for rule in section.rule:
                first, *rest = rule.split("\n")
                lines += [f"  {first}"] + [f"  {r}" for r in rest]
        lines += ["", "Properties:"]
        lines += [f"  {p.name:<{width}}  {p.value}  [{p.how}]" for p in section.properties]
        lines += [f"  ({section.skipped})"] if section.skipped else []
    for name, text, tex in x.modes:
        lines += block(f"{name}() (the 'on {name}' block, for each parameter that has taken a step):", text, tex)
    lines += ["", "Domain risks:" if x.risks else "Domain risks: none found"]
    lines += ["  " + line for w in x.risks for line in str(w).splitlines()]
    return "\n".join(lines)
