"""Are two specs the same optimizer? A SymPy proof, or a concrete counterexample.

Two specs are equivalent when one step computes the same next `p` and the same next value of
every state they share (matched by name, after `mapping` renames A's hyperparameters and
states to B's), and the shared states start at the same value. A step is compared for all
p, g, loss, t = 1, 2, ..., hyperparameters in both declared ranges (intersected) and states
in the ranges the checker proves by induction (so Adam's v is only compared at v >= 0): from
equal states in those ranges both specs stay in them, so equal steps mean equal trajectories.

Counterexample first: random points (seeded) are evaluated at 30 digits; the first where a
result's change differs by more than 1e-9 relative is re-evaluated exactly (rational inputs,
SymPy) before it is reported. It is one step from arbitrary states in their proven ranges,
not necessarily a state the optimizer reaches. Otherwise, proof: each difference, with the
assumptions substituted, what the interval analysis decides (abs(v) = v for v >= 0) settled,
the opaque functions rewritten and decimals made exact, must reduce to 0 by expand, cancel or
simplify; where, comparisons, min/max, abs and sign are folded into one Piecewise, which (or
each of whose branches) must vanish. Reductions (norm, sum, ...) stay opaque there, which is
sound for any size; a spec with them is sampled on 3-element tensors (element 0 compared), so
an identity between reductions is only ever tested, never proven.
"""
from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass, replace

import mpmath
import sympy as sp

from . import functions as fn
from . import ir
from .check import _hyper_interval as _interval, _Ranges
from .pipeline import Compiled
from .ranges import Interval, bound
from .sym import has_matrix_work, meanings, symbols_of, to_sympy

N_ELEMENTS = 3
_TOL = 1e-9
_INDICATORS = (fn.lt, fn.le, fn.gt, fn.ge, fn.eq, fn.ne)
_RELATIONS = dict(zip(_INDICATORS, (sp.Lt, sp.Le, sp.Gt, sp.Ge, sp.Eq, sp.Ne)))
_CONDITIONAL = (fn.where, sp.Min, sp.Max, sp.Abs, sp.sign) + _INDICATORS
_TESTS = (operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne)
_NUMERIC = {"where": lambda c, a, b: a if c != 0 else b,  # lambdify's names for the opaque functions
            **{f.__name__: (lambda test: lambda a, b: mpmath.mpf(test(a, b)))(t) for f, t in zip(_INDICATORS, _TESTS)}}
_REDUCE = {fn.norm: lambda xs: sp.sqrt(sp.Add(*(x**2 for x in xs))), fn.sum: lambda xs: sp.Add(*xs),
           fn.mean: lambda xs: sp.Add(*xs) / len(xs), fn.amax: lambda xs: sp.Max(*xs),
           fn.rms: lambda xs: sp.sqrt(sp.Add(*(x**2 for x in xs)) / len(xs))}


@dataclass(frozen=True)
class Verdict:
    """`proven`: the verdict is certain (equal by proof, or unequal at an exactly re-checked point)."""

    equal: bool
    proven: bool
    compared: tuple[str, ...] = ()
    only_in_a: tuple[str, ...] = ()
    only_in_b: tuple[str, ...] = ()
    counterexample: dict[str, float] | None = None  # inputs (B's names), then "A:<out>", "B:<out>"
    differing: str | None = None   # "p", a state, or "initial <state>"
    message: str = ""
    error: bool = False            # the specs could not be compared (names, ranges, assumptions)
    details: tuple[str, ...] = ()  # more lines: a verdict per rule, the math of rules not compared

    @property
    def exit_code(self) -> int:
        return 3 if self.error else 0 if self.equal else 1 if self.proven else 2


def _meet(a: Interval, b: Interval) -> Interval | None:
    lo, lc = max((a.lo, a.lo_closed), (b.lo, b.lo_closed), key=lambda e: (e[0], not e[1]))
    hi, hc = min((a.hi, a.hi_closed), (b.hi, b.hi_closed), key=lambda e: (e[0], e[1]))
    return Interval(lo, hi, lc, hc) if lo < hi or (lo == hi and lc and hc) else None


def _nonneg_states(prog: ir.Program) -> set[str]:
    ranges = _Ranges(prog)
    ranges.prove_states()
    return {s.name for s in prog.states if ranges.env[ranges.symbols[ir.ssa_name(s.name, 0)]].nonnegative}


def _exact(e: sp.Expr) -> sp.Expr:
    """Bring out rationals hidden in floats (0.9 is 9/10) so that equal constants cancel."""
    return e.xreplace({f: sp.Rational(repr(float(f))) for f in e.atoms(sp.Float)})


def _settle(e: sp.Expr, env: dict[sp.Symbol, Interval]) -> sp.Expr:
    """Use what the interval analysis knows: decide abs, sign and comparisons (abs(v) of Adam's v is v),
    and split a fractional power of a product of non-negative factors, sqrt(x*y) = sqrt(x)*sqrt(y)."""
    if not e.args:
        return e
    e = e.func(*(_settle(a, env) for a in e.args))
    if isinstance(e, (sp.Abs, sp.sign)):
        r = bound(e.args[0], env)
        if r.nonnegative or r.hi <= 0:
            sign = 1 if r.positive else -1 if r.negative else 0 if r.lo == r.hi == 0 else None
            return (e.args[0] if r.nonnegative else -e.args[0]) if isinstance(e, sp.Abs) else (
                e if sign is None else sp.Integer(sign))
    elif type(e) in _RELATIONS and (r := bound(e, env)).lo == r.hi:
        return sp.Integer(int(r.lo))
    elif isinstance(e, sp.Pow) and isinstance(e.base, sp.Mul) and not e.exp.is_integer and all(
            bound(f, env).nonnegative for f in e.base.args):
        return sp.Mul(*(f**e.exp for f in e.base.args))
    return e


def _piecewise(e: sp.Expr) -> sp.Expr:
    """where, comparisons, min/max, abs and sign as Piecewise, which piecewise_fold can merge."""
    if not e.args:
        return e
    args = [_piecewise(a) for a in e.args]
    if isinstance(e, fn.where):
        c = e.args[0]
        cond = _RELATIONS[type(c)](*map(_piecewise, c.args)) if type(c) in _RELATIONS else sp.Ne(args[0], 0)
        return sp.Piecewise((args[1], cond), (args[2], True))
    if type(e) in _RELATIONS:
        return sp.Piecewise((1, _RELATIONS[type(e)](*args)), (0, True))
    if isinstance(e, (sp.Min, sp.Max, sp.Abs, sp.sign)):
        return e.func(*args).rewrite(sp.Piecewise)
    return e.func(*args)


def proven_zero(d: sp.Expr, thorough: bool = True) -> bool:
    """True only if d is identically 0 (for the assumptions on its symbols); cheap steps unless thorough."""
    steps = [sp.expand, lambda e: sp.cancel(sp.together(e))]
    steps += [sp.simplify] if thorough and sp.count_ops(d) < 400 else []
    if d == 0 or any(step(d) == 0 for step in steps):
        return True
    if thorough and 0 < len(d.atoms(*_CONDITIONAL)) <= 6:  # one Piecewise: it, or each branch, must vanish
        folded = sp.piecewise_fold(_piecewise(d))
        if not folded.has(*_CONDITIONAL) and proven_zero(folded):
            return True
        return isinstance(folded, sp.Piecewise) and all(proven_zero(v, False) for v, _ in folded.args)
    return False


def _elements(e: sp.Expr, i: int, elems: dict[sp.Symbol, list[sp.Symbol]]) -> sp.Expr:
    """Element i of a tensor expression whose tensors have N_ELEMENTS elements each."""
    if e in elems:
        return elems[e][i]
    if type(e) in _REDUCE:
        return _REDUCE[type(e)]([_elements(e.args[0], j, elems) for j in range(N_ELEMENTS)])
    return e.func(*(_elements(a, i, elems) for a in e.args)) if e.args else e


def _exact_value(e: sp.Expr) -> sp.Expr:
    """Evaluate a closed expression exactly; conditions are decided at 50 digits."""
    if not e.args:
        return e
    args = [_exact_value(a) for a in e.args]
    if isinstance(e, _CONDITIONAL):
        args = [sp.N(a, 50) for a in args]
    return e.func(*args)


def _differ(x, y) -> bool:
    return abs(x - y) > _TOL * max(abs(x), abs(y))


def _finite(x) -> bool:
    return isinstance(x, mpmath.mpf) and mpmath.isfinite(x)


def _sample(rng: random.Random, iv: Interval, default: float | None) -> float:
    lo, hi = iv.lo, iv.hi
    span = hi - lo if math.isfinite(lo) and math.isfinite(hi) else 1.0
    edges = [x for x in (lo, hi) if math.isfinite(x) and x in iv]
    edges += [x for x in (lo + 1e-3 * span, hi - 1e-3 * span, default) if x is not None and x in iv]
    if edges and rng.random() < 0.3:
        return rng.choice(edges)
    if math.isfinite(lo) and math.isfinite(hi):
        x = lo + span * rng.random()
    elif math.isfinite(lo) or math.isfinite(hi):
        scale = 10 ** rng.uniform(-4, 1)
        x = lo + scale if math.isfinite(lo) else hi - scale
    else:
        x = rng.gauss(0, 2)
    return x if x in iv else (default if default is not None and default in iv else edges[0])


def _rules(x: Compiled | ir.Program, assume: dict[str, float]) -> list[tuple[str | None, ir.Program]]:
    """(condition as written, or None for the rule of every other parameter; program) per rule that
    a parameter can take under `assume`: a rule whose condition the assumed values make false is
    left out, and one they make true takes every parameter (`--assume amsgrad=0` leaves Adam's
    first rule alone)."""
    if not (isinstance(x, Compiled) and x.rules):
        return [(None, x.program if isinstance(x, Compiled) else x)]
    out = []
    for (_, prog, _, shown), cond in zip(x.rules, x.conditions):
        decided = _decided(cond, prog, assume)
        if decided is False:
            continue
        out.append((None if decided else shown, prog))
        if decided:
            break
    return out


def _decided(cond: ir.Expr | None, prog: ir.Program, assume: dict[str, float]) -> bool | None:
    """A rule's condition under the assumed hyperparameters: True, False, or None (it reads the
    parameter's shape or a hyperparameter not assumed). No condition: True."""
    if cond is None:
        return True
    exact = lambda x: sp.Integer(int(x)) if x == int(x) else _exact(sp.Float(x))  # noqa: E731 (Float(0) != 0 in SymPy)
    env = {h.name: exact(assume[h.name]) if h.name in assume else exact(h.default) if h.only and not h.optional
           else sp.Symbol(h.name) for h in prog.hypers}
    env.update({n: sp.Symbol(n) for n in ir.SHAPE_BUILTINS})
    value = to_sympy(cond, env)
    return bool(value != 0) if value.is_number else None


def _refused(x: Compiled | ir.Program) -> list[tuple[int, str]]:
    """(updating rules before it, condition as written) per `rule COND refuse` of a spec."""
    return [(before, shown) for before, _, _, shown, _ in getattr(x, "refusals", ())]


def equivalent(a: Compiled | ir.Program, b: Compiled | ir.Program, assume: dict[str, float] | None = None,
               mapping: dict[str, str] | None = None, samples: int = 200, seed: int = 0) -> Verdict:
    """Prove spec A equivalent to spec B, or find a counterexample (see the module's docstring).

    Specs with rules by shape are compared rule by rule: rules with the same condition, and a spec
    of one rule against each rule of the other; a rule `assume` rules out is left out. A rule with matrix work is not modelled: its math
    is shown and the verdict is at best undecided. A refusal (`rule COND refuse`) is no step: specs
    whose refusals differ (as written, and where they stand among the rules) are at best undecided,
    since one refuses a parameter the other may step."""
    verdict = _equivalent_steps(a, b, assume, mapping, samples, seed)
    ra, rb = _refused(a), _refused(b)
    if ra == rb or not verdict.equal:
        return verdict
    show = lambda refused: "; ".join(f"parameters with {c}" for _, c in refused) or "none"  # noqa: E731
    return replace(verdict, equal=False, proven=False,
                   message=f"undecided: {verdict.message.removeprefix('equivalent: ')} on the parameters both step, but the specs refuse "
                           f"different parameters (A refuses {show(ra)}; B refuses {show(rb)})")


def _equivalent_steps(a, b, assume, mapping, samples: int, seed: int) -> Verdict:
    """`equivalent` on the steps alone, refusals left out."""
    ren = dict(mapping or {})
    ra = _rules(a, dict(assume or {}))
    rb = _rules(b, {ren.get(k, k): v for k, v in (assume or {}).items()})
    if len(ra) == len(rb) == 1:
        return _equivalent_rule(ra[0][1], rb[0][1], assume, mapping, samples, seed)
    if len(ra) > 1 and len(rb) > 1:
        if [c for c, _ in ra] != [c for c, _ in rb]:
            show = lambda rules: ", ".join(c or "other" for c, _ in rules)  # noqa: E731
            return Verdict(False, False, message=f"undecided: the rules' conditions differ (A: {show(ra)}; "
                           f"B: {show(rb)}), so they are not compared rule by rule")
        pairs = [(c, x, y) for (c, x), (_, y) in zip(ra, rb)]
    else:
        pairs = [(c or d, x, y) for c, x in ra for d, y in rb]
    verdicts = []
    for condition, x, y in pairs:
        where = f"parameters with {condition}" if condition else "every other parameter"
        verdicts.append((where, _equivalent_rule(x, y, assume, mapping, samples, seed)))
    details = tuple(line for where, v in verdicts for line in (f"rule for {where}: {v.message}",
                                                                 *(f"  {d}" for d in v.details)))
    for where, v in verdicts:  # a counterexample or an error decides
        if v.error or (v.proven and not v.equal):
            return replace(v, message=f"for {where}: {v.message}", details=details)
    if all(v.equal for _, v in verdicts):
        return Verdict(True, True, compared=verdicts[0][1].compared, message="equivalent: every rule proven equal",
                       details=details)
    return Verdict(False, False, message="undecided: not every rule is proven equal", details=details)


def _matrix_math(prog: ir.Program, who: str) -> tuple[str, ...]:
    from .mathtext import fold_repeats, statement_math
    return (f"  {who}:",) + tuple(f"    {line}" for line in fold_repeats(statement_math(prog, False, rounds=True), False))


def _equivalent_rule(pa: ir.Program, pb: ir.Program, assume, mapping, samples: int, seed: int) -> Verdict:
    assume, mapping = dict(assume or {}), dict(mapping or {})
    fail = lambda msg: Verdict(False, False, message=f"error: {msg}", error=True)  # noqa: E731
    if any(has_matrix_work(eq.expr) for prog in (pa, pb) for eq in prog.eqns):
        return Verdict(False, False, message="undecided: matrix work (mm, T) is not modelled; the math of both:",
                       details=_matrix_math(pa, "A") + _matrix_math(pb, "B"))
    a_names = {h.name for h in pa.hypers} | {s.name for s in pa.states}
    if bad := [k for k in mapping if k not in a_names]:
        return fail(f"--map names {', '.join(bad)}, not a hyperparameter or state of {pa.name}")
    ren = lambda n: mapping.get(n, n)  # noqa: E731
    if len({ren(n) for n in a_names}) < len(a_names):
        return fail(f"--map gives two names of {pa.name} the same name")
    ha, hb = {ren(h.name): h for h in pa.hypers}, {h.name: h for h in pb.hypers}
    fixed: dict[str, sp.Expr] = {}
    for key, value in assume.items():
        name = ren(key)
        if name not in ha and name not in hb:
            return fail(f"--assume {key}: no hyperparameter of that name in {pa.name} or {pb.name}")
        for h in (ha.get(name), hb.get(name)):
            if h is not None and value not in _interval(h):
                return fail(f"--assume {key}={value} is outside its range {h.range_text}")
        fixed[name] = _exact(sp.Float(value)) if value != int(value) else sp.Integer(int(value))
    for name, h in [*ha.items(), *hb.items()]:
        if h.only and name not in fixed:  # an `only` keyword (amsgrad = False only) takes no other value
            fixed[name] = sp.Integer(int(h.default)) if h.default == int(h.default) else _exact(sp.Float(h.default))
    for mine, theirs, x, y in ((ha, hb, pa.name, pb.name), (hb, ha, pb.name, pa.name)):
        if missing := sorted(set(mine) - set(theirs) - set(fixed)):
            return fail(f"hyperparameter(s) {', '.join(missing)} of {x} have no counterpart in {y}: "
                        "rename with --map A_NAME=B_NAME or fix with --assume NAME=VALUE")
    ranges: dict[str, tuple[Interval, float]] = {}
    for name in (n for n in hb if n not in fixed):
        iv = _meet(_interval(ha[name]), _interval(hb[name]))
        if iv is None:
            return fail(f"the ranges of {name} in {pa.name} and {pb.name} do not overlap")
        ranges[name] = (iv, next((h.default for h in (ha[name], hb[name]) if h.default in iv), None))

    sa, sb = [ren(s.name) for s in pa.states], [s.name for s in pb.states]
    shared = tuple(s for s in sb if s in sa)
    nonneg = {ren(s) for s in _nonneg_states(pa)} | _nonneg_states(pb)
    syms = {n: sp.Symbol(n, real=True) for n in ("p", "g", "loss")}
    syms["t"] = sp.Symbol("t", integer=True, positive=True)
    syms |= {s: sp.Symbol(s, real=True, nonnegative=s in nonneg or None) for s in sa + sb}
    syms |= {n: sp.Symbol(n, real=True, nonnegative=iv.lo >= 0 or None, positive=iv.positive or None)
             for n, (iv, _) in ranges.items()}
    values = fixed | syms
    env = {syms[n]: iv for n, (iv, _) in ranges.items()} | {syms[s]: Interval.nonneg() for s in nonneg}
    env[syms["t"]] = Interval(1, math.inf)

    def outputs(prog: ir.Program, rename) -> dict[str, sp.Expr]:
        inputs, (_, _, out) = symbols_of(prog), meanings(prog)
        sub = {sp.Symbol(n): values[rename(n)] for n in ("p", "g", "loss", "t")
               + tuple(h.name for h in prog.hypers) + tuple(s.name for s in prog.states)}
        res = {"p": out["p"]} | {rename(s.name): out.get(s.name, sp.Symbol(s.name)) for s in prog.states}
        res |= {f"initial {rename(s.name)}": to_sympy(s.init, inputs) if s.init else sp.Integer(0)
                for s in prog.states}
        return {k: _exact(fn.meaning(_settle(v.xreplace(sub), env))) for k, v in res.items()}

    out_a, out_b = outputs(pa, ren), outputs(pb, lambda n: n)
    names = ("p",) + shared + tuple(f"initial {s}" for s in shared)
    pairs = {n: (out_a[n], out_b[n]) for n in names}
    only_a, only_b = tuple(s for s in sa if s not in sb), tuple(s for s in sb if s not in sa)
    common = dict(compared=("p",) + shared, only_in_a=only_a, only_in_b=only_b)
    open_pairs = {n: ab for n, ab in pairs.items() if ab[0] != ab[1]}
    unsampled = False
    if open_pairs:  # numbers first: a counterexample is quicker to find than SymPy is to give up
        vector = any(e.has(*_REDUCE) for ab in open_pairs.values() for e in ab)
        tensors = [syms[n] for n in ("p", "g") + tuple(dict.fromkeys(sa + sb))]
        bases = {n: syms[n] for n in open_pairs if not n.startswith("initial ")}
        found = _search(open_pairs, bases, tensors if vector else [], ranges, syms, samples, seed)
        unsampled = bool(found) and found[0] == "unsampled"
        if unsampled:
            found = None
        if found:
            order = ["p", "g", *dict.fromkeys(sb + sa), *hb, *ha, "t", "loss"]
            point = {k: float(v) for k, v in fixed.items()} | found[1]
            cx = dict(sorted(point.items(), key=lambda kv: order.index(kv[0].split("[")[0])
                             if kv[0].split("[")[0] in order else len(order)))
            return Verdict(False, True, **common, counterexample=cx, differing=found[0],
                           message=f"NOT equivalent: {found[0]} differs (re-checked exactly)")
        open_pairs = {n: ab for n, ab in open_pairs.items() if not proven_zero(ab[0] - ab[1])}
    if not open_pairs:
        starts = f" (and the initial value{'s' * (len(shared) > 1)} of {', '.join(shared)})" if shared else ""
        return Verdict(True, True, **common, message=f"equivalent: {', '.join(common['compared'])}{starts} "
                       "proven equal for all inputs")
    where = f" (reductions evaluated on {N_ELEMENTS}-element tensors)" if vector else ""
    if open_pairs and unsampled:
        return Verdict(False, False, **common, message=f"undecided: not proven ({', '.join(open_pairs)}); no "
                       "counterexample sought (an axis reduction here has no numerical form)")
    return Verdict(False, False, **common, message=f"undecided: not proven ({', '.join(open_pairs)}); "
                   f"no counterexample in {samples} samples{where}")


def _search(pairs: dict[str, tuple[sp.Expr, sp.Expr]], bases: dict[str, sp.Symbol], tensors: list[sp.Symbol],
            ranges, syms, samples: int, seed: int) -> tuple[str, dict[str, float]] | None:
    """The first sampled point where a pair differs, confirmed exactly: (output, point and both values).

    A new p or state is compared by its change from `bases` (its old value), which a small
    learning rate would otherwise hide below the tolerance."""
    if tensors:  # reductions: N_ELEMENTS-element tensors, compare element 0
        elems = {s: [sp.Symbol(f"{s}[{i}]", **s.assumptions0) for i in range(N_ELEMENTS)] for s in tensors}
        pairs = {n: tuple(_elements(e, 0, elems) for e in ab) for n, ab in pairs.items()}
        bases = {n: elems[s][0] for n, s in bases.items()}
    free = sorted(set().union(*(e.free_symbols for ab in pairs.values() for e in ab), bases.values()), key=str)
    evaluate = sp.lambdify(free, [e for ab in pairs.values() for e in ab], modules=[_NUMERIC, "mpmath"],
                           dummify=True)
    hyper = {syms[n]: n for n in ranges}
    rng = random.Random(seed)
    for k in range(samples):
        point = {}
        for x in free:
            if x in hyper:
                iv, default = ranges[hyper[x]]
                point[x] = default if k == 0 and default is not None else _sample(rng, iv, default)
            elif x.name == "t":
                point[x] = 1 if k == 0 else rng.randint(1, 10)
            else:
                v = 0.0 if rng.random() < 0.05 else rng.gauss(0, 1) * 10 ** rng.choice((0, 0, 0, -3, 2))
                point[x] = abs(v) if x.is_nonnegative else v
        with mpmath.workdps(30):
            try:
                vals = [mpmath.mpmathify(v) for v in evaluate(*(mpmath.mpf(point[x]) for x in free))]
            except (ZeroDivisionError, ValueError, OverflowError, TypeError):
                continue
            except NameError as err:  # a function with no numerical form here (axis reductions)
                return "unsampled", {"why": str(err)}
        for i, (name, (ea, eb)) in enumerate(pairs.items()):
            va, vb, old = vals[2 * i], vals[2 * i + 1], point.get(bases.get(name), 0)
            if not (_finite(va) and _finite(vb) and _differ(va - old, vb - old)):
                continue
            exact = {x: sp.Rational(point[x]) for x in free}
            xa, xb = (sp.N(_exact_value(e.xreplace(exact)), 30) for e in (ea, eb))
            if xa.is_real and xb.is_real and xa.is_finite and xb.is_finite and _differ(xa - old, xb - old):
                return name, {str(x): float(point[x]) for x in free} | {f"A:{name}": float(xa), f"B:{name}": float(xb)}
    return None


def report(v: Verdict, a: str = "A", b: str = "B") -> str:
    """The verdict line, the states compared and, for a counterexample, a table of inputs and results."""
    lines = [f"{a} vs {b}: {v.message}"] + [f"  {line}" for line in v.details]
    lines += [f"  only in {x}: {', '.join(s)} (not compared)" for x, s in ((a, v.only_in_a), (b, v.only_in_b)) if s]
    if v.counterexample:
        inputs = {k: x for k, x in v.counterexample.items() if not k.startswith(("A:", "B:"))}
        width = max(map(len, [*inputs, "input"]))
        lines.append(f"  {'input':<{width}}  value")
        lines += [f"  {k:<{width}}  {x!r}" for k, x in inputs.items()]
        lines.append(f"  {v.differing}:" if v.differing.startswith("initial ") else f"  {v.differing} after the step:")
        width = max(len(a), len(b))
        lines += [f"    {x:<{width}}  {v.counterexample[f'{y}:{v.differing}']!r}" for x, y in ((a, "A"), (b, "B"))]
    return "\n".join(lines)
