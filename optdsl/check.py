"""Checks on the IR with SymPy: denominators that can be zero, sqrt/log of values that can be negative.

Hyperparameters range over their declared intervals, `t` over 1, 2, ...; a
state's range is proven by induction over steps: start from its initial value,
run one step assuming the range so far, widen until nothing changes.
"""
from __future__ import annotations

import copy

import sympy as sp
from sympy.core.parameters import global_parameters

from . import ir
from .errors import SpecError, SpecWarning
from .functions import TABLE
from .ranges import Interval, _add_iv, _inv, _meet, _mul_iv, bound
from .sym import to_sympy

_FULL = Interval(float("-inf"), float("inf"), False, False)
_ROUNDS = 4


def _hyper_interval(h: ir.Hyper) -> Interval:
    return Interval(h.lo, h.hi, h.lo_closed and h.lo > float("-inf"), h.hi_closed and h.hi < float("inf"))


def _widen(old: Interval, new: Interval) -> Interval:
    """Keep an end that held still, drop one that moved: the induction then ends."""
    lo_same = (new.lo, new.lo_closed) == (old.lo, old.lo_closed) or new.lo > old.lo or (
        new.lo == old.lo and not new.lo_closed)
    hi_same = (new.hi, new.hi_closed) == (old.hi, old.hi_closed) or new.hi < old.hi or (
        new.hi == old.hi and not new.hi_closed)
    return Interval(old.lo if lo_same else float("-inf"), old.hi if hi_same else float("inf"),
                    old.lo_closed if lo_same else False, old.hi_closed if hi_same else False)


# to_sympy over the names' own symbols is a function of the expression alone (every name a _Ranges knows is
# Symbol(name)) and of SymPy's evaluate flag: the rules a state list unrolls to share most statements, equal
# as IR (spans included)
_SYMBOLIC: dict[tuple[ir.Expr, bool], sp.Expr] = {}


def _symbolic(e: ir.Expr, symbols: dict[str, sp.Symbol]) -> sp.Expr:
    key = (e, global_parameters.evaluate)
    try:
        return _SYMBOLIC[key]
    except KeyError:
        value = to_sympy(e, symbols)  # (a name it does not know raises, and nothing is kept)
    if len(_SYMBOLIC) >= 8192:
        _SYMBOLIC.clear()
    _SYMBOLIC[key] = value
    return value


class _Ranges:
    def __init__(self, prog: ir.Program, group: dict[str, Interval] | None = None):
        self.prog = prog
        self.default = group is None  # the ranges of the spec's group values: prove_states is per program
        self._sympy: dict[int, tuple[ir.Expr, sp.Expr]] = {}  # id -> (expression, its SymPy): shared by copies
        self.symbols = {name: sp.Symbol(name) for name in
                        [h.name for h in prog.hypers] + ["t", "loss", ir.P0, ir.G0, *ir.SHAPE_BUILTINS]
                        + [e.out for e in prog.eqns] + list(prog.inputs) + [ir.EYE]}
        self.env: dict[sp.Symbol, Interval] = {self.symbols[h.name]: _hyper_interval(h) for h in prog.hypers}
        if group is None:
            group = _group_intervals(prog)
            if prog.group is not None and prog.group.reads:
                # the states a group reduction reads, by their ranges proven with every group value
                # unbounded (sound whatever the group values are): Adam's v >= 0 in mean(v)
                free = _Ranges(prog, {n: _FULL for n in group})
                free.prove_states()
                group = _group_intervals(prog, {ir.ssa_name(s, 0): free.env[free.symbols[ir.ssa_name(s, 0)]]
                                                for s in prog.group.reads})
        self.env.update({self.symbols[n]: iv for n, iv in group.items()})
        self.env[self.symbols["t"]] = Interval(1.0, float("inf"), True, False)
        for name in ir.SHAPE_BUILTINS:  # ndim >= 0; numel, nrows, ncols >= 1
            self.env[self.symbols[name]] = Interval(0.0 if name == "ndim" else 1.0, float("inf"), True, False)
        for name in ("loss", ir.P0, ir.G0):
            self.env[self.symbols[name]] = _FULL

    def of(self, e: ir.Expr) -> Interval:
        return bound(self.sympy(e), self.env)

    def sympy(self, e: ir.Expr) -> sp.Expr:
        """to_sympy(e, self.symbols), once per expression: the induction over steps reads each statement
        in every round (up to _ROUNDS + 1 of them), the checks of its operations again."""
        hit = self._sympy.get(id(e))
        if hit is None or hit[0] is not e:
            hit = self._sympy[id(e)] = (e, _symbolic(e, self.symbols))
        return hit[1]

    def under(self, guards: tuple[ir.Expr, ...]) -> _Ranges:
        """These ranges where every guard holds: each comparison of a value with a bound narrows
        that value and, back through its definition, what it is computed from (RAdam's rho_t > 5,
        with rho_t = rho_inf - (a value >= 0), gives rho_inf > 5)."""
        if not guards:
            return self
        key = tuple(ir.format_expr(g) for g in guards)
        cache = self.__dict__.setdefault("_under", {})
        if key in cache:
            return cache[key]
        out = copy.copy(self)
        out.env, out._under = dict(self.env), {}
        if "_defs" not in self.__dict__:
            self._defs = {self.symbols[eq.out]: self.sympy(eq.expr) for eq in self.prog.eqns}
        defs = self._defs
        cache[key] = out
        for guard in guards:
            for g in _conjuncts(guard):
                if not (isinstance(g, ir.Op) and g.op in ("gt", "ge", "lt", "le")):
                    continue
                x, c = (self.sympy(a) for a in g.args)
                rc = bound(c, out.env)
                if g.op in ("gt", "ge"):  # x > c: x above c's lowest value
                    _narrow(x, Interval(rc.lo, float("inf"), g.op == "ge" and rc.lo_closed, False), out.env, defs)
                    _narrow(c, Interval(float("-inf"), bound(x, out.env).hi, False, g.op == "ge"), out.env, defs)
                else:
                    _narrow(x, Interval(float("-inf"), rc.hi, False, g.op == "le" and rc.hi_closed), out.env, defs)
                    _narrow(c, Interval(bound(x, out.env).lo, float("inf"), g.op == "le", False), out.env, defs)
        return out

    def run_step(self) -> None:
        for eq in self.prog.eqns:
            self.env[self.symbols[eq.out]] = self.of(eq.expr)

    def prove_states(self) -> None:
        if self.default:  # the checks, the low-bit codes and the backends each ask it of a rule
            self.env = dict(_proven(self.prog))
        else:
            self._prove()

    def _prove(self) -> None:
        last = dict(self.prog.outputs)
        init_env = {self.symbols[ir.P0]: _FULL, self.symbols[ir.EYE]: Interval(0.0, 1.0, True, True)}
        for s in self.prog.states:
            zero = Interval(0.0, 0.0, True, True)
            start = bound(to_sympy(s.init, self.symbols), {**self.env, **init_env}) if s.init else zero
            # an input holds whatever the training loop feeds it
            self.env[self.symbols[ir.ssa_name(s.name, 0)]] = _FULL if s.fed else start
        for round_ in range(_ROUNDS):
            self.run_step()
            changed = False
            for s in self.prog.states:
                sym0 = self.symbols[ir.ssa_name(s.name, 0)]
                old = self.env[sym0]
                new = old.hull(self.env[self.symbols[last[s.name]]])
                if new != old:
                    self.env[sym0] = _widen(old, new) if round_ > 0 else new
                    changed = True
            if not changed:
                return
        for s in self.prog.states:  # no fixed point in time: assume nothing
            self.env[self.symbols[ir.ssa_name(s.name, 0)]] = _FULL
        self.run_step()


@ir.per_program
def _proven(prog: ir.Program) -> dict[sp.Symbol, Interval]:
    """The ranges over a step once the states' are proven by induction (_Ranges.prove_states)."""
    ranges = _Ranges(prog)
    ranges._prove()
    return ranges.env


def _narrow(x: sp.Expr, target: Interval, env: dict, defs: dict, depth: int = 0) -> None:
    """Narrow env so that x lies in target, backwards through sums, constant factors and the
    definitions of locals (sound: only values that cannot reach target are dropped)."""
    if depth > 8:
        return
    if x.is_Symbol:
        env[x] = _meet(env.get(x, _FULL), target)
        if x in defs:
            _narrow(defs[x], env[x], env, defs, depth + 1)
    elif isinstance(x, sp.Add):
        for i, term in enumerate(x.args):
            rest = bound(sp.Add(*(x.args[:i] + x.args[i + 1:])), env)
            _narrow(term, _add_iv(target, _mul_iv(Interval.point(-1.0), rest)), env, defs, depth + 1)
    elif isinstance(x, sp.Mul) and len(x.args) == 2 and x.args[0].is_Number and x.args[0] != 0:
        _narrow(x.args[1], _mul_iv(target, _inv(bound(1 / x.args[0], env))), env, defs, depth + 1)


def _uses(e: ir.Expr, guards: tuple[ir.Expr, ...] = ()):
    """Each name e reads, with the conditions that hold where that reading is used."""
    for op, under in _walk(e, guards):
        for i, a in enumerate(op.args):
            if isinstance(a, ir.Ref):
                yield a.name, under + ((op.args[0],) if op.op == "where" and i == 1 else ())
    if isinstance(e, ir.Ref):
        yield e.name, guards


def _inherited_guards(prog: ir.Program) -> dict[str, tuple[ir.Expr, ...]]:
    """For each local, the guards under which every one of its uses sits: a value computed only
    to be picked by where(rho_t > 5, rect, 1) matters only where rho_t > 5."""
    outputs = set(dict(prog.outputs).values())
    common: dict[str, dict[str, ir.Expr]] = {}
    for eq in reversed(prog.eqns):
        own = () if eq.out in outputs else tuple(common.get(eq.out, {}).values())
        for name, under in _uses(eq.expr, own):
            seen = {ir.format_expr(g): g for g in under}
            common[name] = {k: g for k, g in common[name].items() if k in seen} if name in common else seen
    for name in outputs:
        common[name] = {}
    return {name: tuple(gs.values()) for name, gs in common.items()}


def _group_intervals(prog: ir.Program, read: dict[str, Interval] | None = None) -> dict[str, Interval]:
    """The range of each group value the step reads, a group state's proven by induction over steps
    as a per-parameter state's is; a reduction over the group is bounded as its per-tensor twin, the
    per-parameter states it reads by `read` (SSA name of version 0 -> range; others unbounded)."""
    phase = prog.group
    if phase is None:
        return {}
    hypers = {h.name: sp.Symbol(h.name) for h in prog.hypers if not h.computed}
    env = {sp.Symbol(h.name): _hyper_interval(h) for h in prog.hypers if not h.computed}
    env[sp.Symbol("t")] = Interval(1.0, float("inf"), True, False)
    zero = Interval(0.0, 0.0, True, True)
    states = {s.name: bound(to_sympy(s.init, hypers), env) if s.init else zero for s in phase.states}
    last = dict(phase.outputs)

    def run(states):
        syms = dict(hypers, **{n: sp.Symbol(n) for n in ("p0", "g0", "t", *ir.SHAPE_BUILTINS)})
        iv = dict(env)
        iv.update({sp.Symbol(n): value for n, value in (read or {}).items()})
        for name, value in states.items():
            syms[f"{name}.0"] = sp.Symbol(f"{name}.0")
            iv[syms[f"{name}.0"]] = value
        for step in phase.steps:
            if isinstance(step, ir.GroupReduce):  # per-parameter names missing from syms read as unbounded
                arg = to_sympy(step.arg, {**syms, **{r: sp.Symbol(r) for r in ir.refs(step.arg) if r not in syms}})
                value = bound(TABLE[step.func].sympy(arg), iv)
            else:
                value = bound(to_sympy(step.expr, syms), iv)
            syms[step.out] = sp.Symbol(step.out)
            iv[syms[step.out]] = value
        return {n: iv[sp.Symbol(n)] for n in [s.out for s in phase.steps] + [f"{k}.0" for k in states]}

    for round_ in range(_ROUNDS):
        values = run(states)
        grown = {n: old.hull(values[last[n]]) if n in last else old for n, old in states.items()}
        if grown == states:
            break
        states = {n: _widen(states[n], grown[n]) if round_ > 0 else grown[n] for n in states}
    else:
        values = run({n: _FULL for n in states})
    return {name: values[ssa] for name, ssa in phase.values}


def _walk(e: ir.Expr, guards: tuple[ir.Expr, ...] = ()):
    """Each operation in e, with the conditions that hold where its value is used: the first
    branch of where(cond, a, b) only matters where cond holds."""
    if isinstance(e, ir.Op):
        yield e, guards
        if e.op == "where":
            cond, a, b = e.args
            yield from _walk(cond, guards)
            yield from _walk(a, guards + (cond,))
            yield from _walk(b, guards)
        else:
            for a in e.args:
                yield from _walk(a, guards)


def _factors(e: ir.Expr) -> set[str]:
    if isinstance(e, ir.Op) and e.op == "*":
        return {f for a in e.args for f in _factors(a)}
    return {ir.format_expr(e)}


def _conjuncts(cond: ir.Expr):
    """The comparisons that all hold where `cond` is non-zero: a product of comparisons (or their
    min) holds where each of them does."""
    if isinstance(cond, ir.Op) and cond.op in ("*", "min"):
        for a in cond.args:
            yield from _conjuncts(a)
    else:
        yield cond


_NEGATED = {"gt": "le", "le": "gt", "lt": "ge", "ge": "lt", "eq": "ne", "ne": "eq"}
_FLIPPED = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge", "eq": "eq", "ne": "ne"}


def _negation(cond: ir.Expr) -> ir.Expr | None:
    """What holds where `cond` is zero (the second branch of a where), when that is one comparison."""
    if isinstance(cond, ir.Op) and cond.op in _NEGATED:
        return ir.Op(_NEGATED[cond.op], cond.args, cond.span)
    return None


def _guarded_nonzero(den: ir.Expr, guards: tuple[ir.Expr, ...], ranges: _Ranges) -> bool:
    """A guard compares den, or a product with den as a factor, strictly with 0 or with a value on
    0's side of it (w * r > 0, gn != 0, b > eps with eps > 0), alone or as a factor of a product of
    comparisons ((a > 0) * (b > 0))."""
    key = ir.format_expr(den)
    for guard in guards:
        for g in _conjuncts(guard):
            if not (isinstance(g, ir.Op) and g.op in _FLIPPED):
                continue
            for (x, other), op in ((g.args, g.op), (g.args[::-1], _FLIPPED[g.op])):
                if key not in _factors(x):
                    continue
                r = ranges.of(other)
                if (op == "ne" and r.lo == r.hi == 0) or (op == "gt" and r.nonnegative) or (
                        op == "lt" and r.hi <= 0) or (op == "ge" and r.positive) or (op == "le" and r.negative):
                    return True
    return False


def _nonzero(den: ir.Expr, guards: tuple[ir.Expr, ...], ranges: _Ranges) -> bool:
    """den is never 0 where its value is used: by its range, by a guard, or piece by piece (each
    branch of a where under its condition, each factor of a product)."""
    if ranges.of(den).nonzero or _guarded_nonzero(den, guards, ranges):
        return True
    if isinstance(den, ir.Op) and den.op == "where":
        cond, a, b = den.args
        negated = _negation(cond)
        return (_nonzero(a, guards + (cond,), ranges)
                and _nonzero(b, guards + ((negated,) if negated is not None else ()), ranges))
    if isinstance(den, ir.Op) and den.op in ("*", "neg", "abs"):
        return all(_nonzero(a, guards, ranges) for a in den.args)
    return False


def _rewrite(e: sp.Expr) -> sp.Expr:
    """e with lerp and the other opaque functions written out (lerp(a, b, w) = a + w (b - a))."""
    return e.replace(lambda x: hasattr(x, "rewrite_meaning"), lambda x: x.rewrite_meaning())


def _square_pairs(prog: ir.Program, ranges: _Ranges) -> list[tuple[sp.Symbol, sp.Symbol]]:
    """(v, m) symbols of the same version where v >= m^2 is proven, as centered RMSprop's variance
    needs: states starting at 0, each assigned once per step, by v' = (1 - w) v + w x^2 and
    m' = (1 - w) m + w x with one x and one w in [0, 1]. By induction (Jensen): v' - m'^2 =
    (1 - w)(v - m^2) + w (1 - w)(m - x)^2 >= 0 when v - m^2 >= 0, as it is at the start."""
    sym = ranges.symbols
    assigned: dict[str, list[ir.Eqn]] = {}
    for eq in prog.eqns:
        assigned.setdefault(eq.target, []).append(eq)
    moved = {base for mode in prog.modes for base, _ in mode.outputs}  # eval()/train() may break the invariant
    once = {s.name: assigned[s.name][0] for s in prog.states
            if s.init is None and not s.fed and s.shape in ("full", "scalar") and s.name not in moved
            and len(assigned.get(s.name, ())) == 1}
    # Each update as written, over the step's locals (one x is one local or value read by both): small
    # expressions, compared by expanding (a polynomial identity), never by simplify.
    updates = {}
    for name, eq in once.items():
        e = _rewrite(to_sympy(eq.expr, sym))
        if sp.count_ops(e) <= 40:
            updates[name] = sp.expand(e)
    pairs = []
    for v_name, v1 in updates.items():
        v0 = sym[ir.ssa_name(v_name, 0)]
        keep_v = v1.coeff(v0)
        for m_name, m1 in updates.items():
            if m_name == v_name:
                continue
            m0 = sym[ir.ssa_name(m_name, 0)]
            w = sp.expand(1 - m1.coeff(m0))
            wx = sp.expand(m1 - (1 - w) * m0)  # w x
            if (w.free_symbols & {v0, m0} or wx.free_symbols & {v0, m0} or sp.expand(keep_v - (1 - w)) != 0
                    or sp.expand(w * (v1 - keep_v * v0) - wx ** 2) != 0):
                continue
            v_eq, m_eq = once[v_name], once[m_name]
            r = bound(w, ranges.env)
            if r.lo >= 0 and r.hi <= 1:
                pairs += [(v0, m0), (sym[v_eq.out], sym[m_eq.out])]
    return pairs


def _nonneg_by_pairs(arg: ir.Expr, ranges: _Ranges) -> bool:
    """Whether arg is v - c m^2 for a proven pair (v, m) and c in [0, 1]: (v - m^2) + (1 - c) m^2 >= 0."""
    pairs = ranges.__dict__.get("square_pairs", ())
    if not pairs:
        return False
    e = sp.expand(to_sympy(arg, ranges.symbols))
    if sp.count_ops(e) > 40:
        return False
    for v, m in pairs:
        c = sp.expand((v - e) / m ** 2)
        if c.free_symbols & {v, m} or sp.expand(e - (v - c * m ** 2)) != 0:
            continue
        r = bound(c, ranges.env)
        if r.lo >= 0 and r.hi <= 1:
            return True
    return False


def check(prog: ir.Program) -> list[SpecWarning]:
    """Domain warnings for a lowered program; raises SpecError for a certain division by zero."""
    ranges = _Ranges(prog)
    ranges.prove_states()
    try:
        ranges.square_pairs = _square_pairs(prog, ranges)
    except (TypeError, ValueError, RecursionError, sp.SympifyError):  # no proof, no claim
        ranges.square_pairs = []
    warnings = []
    names = ir.source_names(prog)
    inherited = _inherited_guards(prog)
    for eq in prog.eqns:
        for op, guards in _walk(eq.expr, inherited.get(eq.out, ())):
            warnings += _check_op(op, ranges.under(guards), names, guards)
    return warnings


def _literal(e: ir.Expr) -> float | None:
    """The value of a number as written, `-1` (a negated literal) included; None for anything else."""
    if isinstance(e, ir.Op) and e.op == "neg" and isinstance(e.args[0], ir.Const):
        return -e.args[0].value
    return e.value if isinstance(e, ir.Const) else None


def _holds(func: str, r: Interval) -> bool:
    """Whether func (sqrt, rsqrt, log, log1p) is defined on all of r."""
    return {"sqrt": r.nonnegative, "rsqrt": r.positive, "log": r.positive,
            "log1p": r.lo > -1 or (r.lo == -1 and not r.lo_closed)}[func]


def _with_loss_nonneg(ranges: _Ranges) -> _Ranges:
    out = copy.copy(ranges)
    out.env = {**ranges.env, ranges.symbols["loss"]: Interval(0.0, float("inf"), True, False)}
    return out


def _check_op(op: ir.Op, ranges: _Ranges, names: dict[str, str], guards=()) -> list[SpecWarning]:
    out = []

    def format_expr(e):
        return ir.format_expr(e, names=names)

    def warn(arg, message, hint):
        out.append(SpecWarning(message.format(x=format_expr(arg), r=ranges.of(arg)), arg.span or op.span, hint))

    exponent = _literal(op.args[1]) if op.op == "^" else None
    if op.op == "/" or (exponent is not None and exponent < 0):
        den = op.args[1] if op.op == "/" else op.args[0]
        r = ranges.of(den)
        if r.lo == r.hi == 0:
            raise SpecError(f"division by zero: '{format_expr(den)}' is always 0", den.span or op.span,
                            hint="divide by a value that is not zero")
        if not _nonzero(den, guards, ranges):
            warn(den, "denominator '{x}' can be zero (it ranges over {r})",
                 "add a positive epsilon, e.g. '+ eps' with 'hyper eps = 1e-8 in (0, inf)', "
                 "or narrow the ranges of the hyperparameters it uses")
    elif op.op in ("sqrt", "log", "rsqrt", "log1p"):
        arg, r = op.args[0], ranges.of(op.args[0])
        need = _holds(op.op, r) or (op.op == "sqrt" and _nonneg_by_pairs(arg, ranges))
        if not need:
            what = {"sqrt": "negative", "rsqrt": "zero or negative", "log": "zero or negative",
                    "log1p": "-1 or less"}[op.op]
            if "loss" in set(ir.refs(arg)) and _holds(op.op, _with_loss_nonneg(ranges).of(arg)):
                # the loss is the user's, any number to optdsl: what is safe for a loss >= 0 (AdaLo's
                # log1p(loss)) is warned about, saying why
                warn(arg, f"{op.op}() of '{{x}}', which can be {what} (it ranges over {{r}}) when the loss is "
                          "negative: a spec cannot declare the loss's range; for a loss >= 0 it is safe",
                     "if your loss can be negative, guard it, e.g. max(loss, 0)")
            else:
                warn(arg, f"{op.op}() of '{{x}}', which can be {what} (it ranges over {{r}})",
                     "guard the argument (e.g. max(x, 0) or + eps) or narrow the declared ranges")
    elif exponent is not None and not float(exponent).is_integer():
        if not ranges.of(op.args[0]).nonnegative:
            warn(op.args[0], "fractional power of '{x}', which can be negative (it ranges over {r})",
                 "raise a non-negative value, e.g. abs(x)^a")
    return out
