"""State lists over the axes and `for axis` loops, unrolled per rank: a stage of its own, between the
parser and everything else (nothing after it sees a list, a loop or an index).

A rule that declares `state Q[a]: axis(a) if COND else gram(a) = INIT` keeps one factor per axis a of p:
a diagonal one (its diagonal, d[K] numbers) where COND holds for axis K, else a d[K] x d[K] matrix. COND reads
`d[a]` (axis a's size), `a`, `ndim`, the hyperparameters, and `count(b, C)` (how many axes b meet C).
`for axis a { ... }` runs its statements once per axis, in order.

The rule becomes one ordinary rule per rank (1 to MAX_RANK), guarded by `ndim == n`, with `Q[a]` read as the
state `QK` of kind `factor(K)`: which of the two kinds it is, is decided per parameter when the state is
made, by COND (ir.State.diag), and the state keeps it (a diagonal factor is 1-D, a matrix 2-D). Inside the
loop the matrix work of a factor is written once, for the matrix kind; each operation on a factor-like
value (the factor, or a value made from it or from gram_axis) is its kind-generic form (the TABLE below,
optdsl/functions.py's factor_* rows): on a diagonal factor, the diagonal of the same work on a diagonal
matrix, which these operations keep diagonal. A name first assigned inside the loop belongs to its round
(`G` is `G_K`). Ranks past MAX_RANK are refused by a rule of their own, saying so. Code grows linearly
with the rank: one rule per rank, not per mix of kinds.
"""
from __future__ import annotations

from dataclasses import replace

from . import ast, ir
from .errors import SpecError
from .functions import TABLE as FUNCTIONS

MAX_RANK = 8  # as ir.AXIS_SIZES names d[0] .. d[7]
SIZE = "d"  # `d[a]`: the size of axis a, in a state list's kind condition

# The loop's work on a factor-like value `F` (the factor, or a value made from it or from gram_axis), as the
# rule writes it -> its kind-generic form, and what that is on a diagonal factor (the diagonal of the work on
# a diagonal matrix, which each keeps diagonal); on a matrix factor each is the work as written.
TABLE = {
    "mm_axis(F, x, a)": ("mm_axis(F, x, a)", "F * x along axis a"),
    "rsolve_triu_axis(x, F, a)": ("rsolve_triu_axis(x, F, a)", "x / F along axis a"),
    "gram_axis(x, a)": ("factor_gram(x, Q[a], a)", "axis_sum(x^2, a)  (the Gram matrix's diagonal)"),
    "T(F), triu(F)": ("factor_T(F), factor_triu(F)", "F"),
    "mm(F, G)": ("factor_mm(F, G)", "F * G"),
    "norm_lb(F)": ("factor_norm_lb(F)", "amax(abs(F))  (a diagonal matrix's norm)"),
}


def _has_axes(rule: ast.Rule) -> bool:
    return any(isinstance(s, ast.StateList) for s in rule.states) or any(
        b.kind == "axis" for b in _blocks(rule.body))


def _blocks(body):
    for item in body:
        if isinstance(item, ast.Block):
            yield item
            yield from _blocks(item.body)


def expand(spec: ast.Spec) -> ast.Spec:
    for s in spec.states:
        if isinstance(s, ast.StateList):
            raise SpecError(f"a state list ('{s.name}[{s.var}]') belongs to a rule", s.span,
                            hint="put it in a rule, e.g. 'rule ndim >= 1 { ... }': it is unrolled per rank")
    for b in _blocks(spec.body):
        if b.kind == "axis":
            raise SpecError("a 'for axis' loop belongs to a rule with a state list", b.span,
                            hint="put it in a rule declaring 'state Q[a]: axis(a) if ... else gram(a)'")
    if not any(_has_axes(r) for r in spec.rules):
        return spec
    rules = []
    for rule in spec.rules:
        rules.extend(_expand(rule, spec) if _has_axes(rule) else [rule])
    return replace(spec, rules=tuple(rules))


def _const(e, env):
    """A number where e is one given env (names to numbers), else None."""
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Name):
        return env.get(e.id)
    if isinstance(e, ast.Neg):
        v = _const(e.operand, env)
        return None if v is None else -v
    if isinstance(e, ast.BinOp):
        a, b = _const(e.left, env), _const(e.right, env)
        if e.op == "and" and (a == 0 or b == 0):
            return 0.0
        if e.op == "or" and (a not in (None, 0) or b not in (None, 0)):
            return 1.0
        if a is None or b is None:
            return None
        ops = {"+": a + b, "-": a - b, "*": a * b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b,
               "==": a == b, "!=": a != b, "and": bool(a and b), "or": bool(a or b)}
        return float(ops[e.op]) if e.op in ops else None
    return None


def _expand(rule: ast.Rule, spec: ast.Spec) -> list[ast.Rule]:
    lists = [s for s in rule.states if isinstance(s, ast.StateList)]
    if not lists:
        loop = next(b for b in _blocks(rule.body) if b.kind == "axis")
        raise SpecError("a 'for axis' loop needs its rule's state list, whose kinds it follows", loop.span,
                        hint="declare one, e.g. 'state Q[a]: axis(a) if d[a] > max_size else gram(a) = eye'")
    if len(lists) > 1:
        raise SpecError(f"a second state list ('{lists[1].name}') in one rule", lists[1].span,
                        hint="a rule keeps one state list: its kinds are the axes' kinds")
    (lst,) = lists
    others = tuple(s for s in rule.states if not isinstance(s, ast.StateList))
    taken = {h.name for h in spec.hypers} | {s.name for s in others} | {i.name for i in spec.inputs}
    out = []
    for n in range(1, MAX_RANK + 1):
        if rule.cond is not None and _const(rule.cond, {"ndim": n}) == 0:
            continue
        cond = _cmp("==", ast.Name("ndim", lst.span), n, lst.span)
        if rule.cond is not None:
            cond = ast.BinOp("and", rule.cond, cond, rule.span)
        states = []
        for k in range(n):
            if f"{lst.name}{k}" in taken:
                raise SpecError(f"the state list '{lst.name}' makes a state '{lst.name}{k}', a name the spec "
                                "already gives", lst.span, hint="rename one of them")
            init = None if lst.init is None else _subst(lst.init, {"ndim": n}, eye="eye")
            states.append(ast.State(f"{lst.name}{k}", init, lst.span, shape=f"factor({k})", shape_span=lst.span,
                                    key=lst.key and f"{lst.key}{k}", diag=_kind_cond(lst, k, n, True)))
        body = _Unroll(lst, n, taken | {s.name for s in states}).body(rule.body)
        fixed = f"ndim == {n}: " + ", ".join(f"{s.name} {s.shape}" for s in states)
        out.append(replace(rule, cond=cond, states=others + tuple(states), body=body, unrolled=(rule.cond, fixed)))
    past = _cmp(">", ast.Name("ndim", lst.span), MAX_RANK, lst.span)
    if rule.cond is None or _const(rule.cond, {"ndim": MAX_RANK + 1}) != 0:
        out.append(ast.Rule(past if rule.cond is None else ast.BinOp("and", rule.cond, past, rule.span), (), (),
                            rule.span, refuse=f"its state list '{lst.name}[{lst.var}]' is unrolled for ranks 1 to "
                            f"{MAX_RANK} (one rule per rank, optdsl/axes.py MAX_RANK)"))
    return out


def _cmp(op, left, n, span):
    return ast.BinOp(op, left, ast.Num(float(n), span), span)


def _kind_cond(lst: ast.StateList, k: int, n: int, diag: bool) -> ast.Expr:
    """The condition, for axis k of a rank-n parameter, that the list's factor there is `diag`'s kind."""
    c = _fold(_size_cond(lst.cond, {lst.var: k}, n))
    first = lst.kinds[0] == "axis"  # COND picks the first kind
    holds = first == diag
    return c if holds else ast.BinOp("==", c, ast.Num(0.0, lst.span), lst.span)


def _size_cond(e, axes: dict, n: int):
    """A kind condition with its axis variables bound: d[b] the size of axis b, count(b, C) a sum."""
    if isinstance(e, ast.Index):
        if e.name != SIZE:
            raise SpecError(f"'{e.name}[{e.var}]' in a kind condition: it reads d[{e.var}], axis {e.var}'s size",
                            e.span, hint=f"write d[{e.var}]")
        if e.var not in axes:
            raise SpecError(f"'{e.var}' is not an axis here", e.span, hint="name the list's axis, or count(b, ...)'s")
        return ast.Name(f"{SIZE}[{axes[e.var]}]", e.span)
    if isinstance(e, ast.Name):
        if e.id in axes:
            return ast.Num(float(axes[e.id]), e.span)
        if e.id == "ndim":
            return ast.Num(float(n), e.span)
        return e
    if isinstance(e, ast.Call) and e.func == "count":
        if len(e.args) != 2 or not isinstance(e.args[0], ast.Name):
            raise SpecError("count(b, C) takes an axis variable and a condition", e.span,
                            hint="e.g. count(b, d[b] > d[a]): how many axes are larger than a")
        var = e.args[0].id
        terms = [_size_cond(e.args[1], {**axes, var: j}, n) for j in range(n)]
        out = terms[0]
        for t in terms[1:]:
            out = ast.BinOp("+", out, t, e.span)
        return out
    if isinstance(e, ast.Call):
        return replace(e, args=tuple(_size_cond(a, axes, n) for a in e.args))
    if isinstance(e, ast.BinOp):
        return replace(e, left=_size_cond(e.left, axes, n), right=_size_cond(e.right, axes, n))
    if isinstance(e, ast.Neg):
        return replace(e, operand=_size_cond(e.operand, axes, n))
    return e


_SAME = {"<": 0.0, "<=": 1.0, ">": 0.0, ">=": 1.0, "==": 1.0, "!=": 0.0}


def _fold(e):
    """A kind condition with what its numbers decide worked out (`(0 > 1) * (d[1] == d[0])` is 0, `d[0] > d[0]`
    is 0): shorter conditions, the same truth for every shape."""
    if isinstance(e, ast.Call):
        return replace(e, args=tuple(map(_fold, e.args)))
    if isinstance(e, ast.Neg):
        v = _fold(e.operand)
        return ast.Num(-v.value, e.span) if isinstance(v, ast.Num) else replace(e, operand=v)
    if not isinstance(e, ast.BinOp):
        return e
    a, b = _fold(e.left), _fold(e.right)
    x = a.value if isinstance(a, ast.Num) else None
    y = b.value if isinstance(b, ast.Num) else None
    if x is not None and y is not None and e.op in "+-*" + "<<=>>===!=" and e.op not in ("and", "or"):
        v = _const(replace(e, left=a, right=b), {})
        if v is not None:
            return ast.Num(float(v), e.span)
    if isinstance(a, ast.Name) and isinstance(b, ast.Name) and a.id == b.id and e.op in _SAME:
        return ast.Num(_SAME[e.op], e.span)
    if e.op == "*" and (x == 0 or y == 0):
        return ast.Num(0.0, e.span)
    if e.op == "*" and (x == 1 or y == 1):
        return b if x == 1 else a
    if e.op == "+" and (x == 0 or y == 0):
        return b if x == 0 else a
    return replace(e, left=a, right=b)


def _subst(e, names: dict, eye=None):
    """e with names replaced by numbers, and `eye` by 1 where eye is None (a diagonal factor's identity)."""
    if isinstance(e, ast.Name):
        if e.id in names:
            return ast.Num(float(names[e.id]), e.span)
        if e.id == "eye" and eye is None:
            return ast.Num(1.0, e.span)
        return e
    if isinstance(e, ast.Index):
        raise SpecError(f"'{e.name}[{e.var}]' outside a 'for axis {e.var}' loop", e.span,
                        hint="read a factor inside the loop over the axes")
    if isinstance(e, ast.Call):
        return replace(e, args=tuple(_subst(a, names, eye) for a in e.args))
    if isinstance(e, ast.BinOp):
        return replace(e, left=_subst(e.left, names, eye), right=_subst(e.right, names, eye))
    if isinstance(e, ast.Neg):
        return replace(e, operand=_subst(e.operand, names, eye))
    return e


class _Unroll:
    """A rule's body for one rank: loops unrolled, factors named, their work written kind-generic (TABLE)."""

    def __init__(self, lst, n, taken):
        self.lst, self.n, self.taken = lst, n, taken
        # names assigned before (or outside) a loop, and the built-ins: shared by its rounds
        self.known = set(taken) | set(ir.BUILTINS) | set(ir.SHAPE_BUILTINS)

    def body(self, items, axis=None):
        out = []
        for item in items:
            if isinstance(item, ast.Block) and item.kind == "axis":
                if axis is not None:
                    raise SpecError("a 'for axis' loop inside another", item.span, hint="write the loops one after the other")
                var = item.arg.id
                if var != self.lst.var:
                    raise SpecError(f"the loop's variable '{var}' is not its state list's ('{self.lst.var}')",
                                    item.arg.span, hint=f"write 'for axis {self.lst.var} {{'")
                before = set(self.known)
                for k in range(self.n):
                    self.factors = set()  # names holding factor-like values, this round
                    out.extend(self.body(item.body, k))
                    self.known = set(before)
                continue
            if isinstance(item, ast.Block):
                out.append(replace(item, arg=self.expr(item.arg, axis)[0], body=tuple(self.body(item.body, axis))))
                continue
            value, factor = self.expr(item.value, axis)
            target = item.target
            if "[" in target:
                name, var = target[:-1].split("[")
                if axis is None or var != self.lst.var or name != self.lst.name:
                    raise SpecError(f"'{target}' is assigned outside its 'for axis' loop or is not a state list",
                                    item.target_span, hint=f"assign {self.lst.name}[{self.lst.var}] inside the loop")
                target = f"{name}{axis}"
            elif axis is not None:
                if target not in self.known:
                    target = self._round(target, axis)
            else:
                self.known.add(target)
            if axis is not None:
                (self.factors.add if factor else self.factors.discard)(target)
            out.append(replace(item, target=target, value=value))
        return tuple(out)

    def _round(self, name, axis):
        return f"{name}_{axis}"

    def expr(self, e, axis):
        """(the expression for this round, whether it is factor-like)."""
        if isinstance(e, ast.Index):
            if axis is None or e.name != self.lst.name or e.var != self.lst.var:
                raise SpecError(f"'{e.name}[{e.var}]' outside its 'for axis {e.var}' loop, or not a state list",
                                e.span, hint=f"read {self.lst.name}[{self.lst.var}] inside 'for axis {self.lst.var}'")
            return ast.Name(f"{self.lst.name}{axis}", e.span), True
        if isinstance(e, ast.Name):
            if axis is not None and e.id == self.lst.var:
                return ast.Num(float(axis), e.span), False
            if e.id == "ndim":
                return ast.Num(float(self.n), e.span), False
            if axis is not None and e.id not in self.known:
                name = self._round(e.id, axis)
                return ast.Name(name, e.span), name in self.factors
            return e, axis is not None and e.id in self.factors
        if isinstance(e, ast.Num):
            return e, False
        if isinstance(e, ast.Neg):
            v, f = self.expr(e.operand, axis)
            return replace(e, operand=v), f
        if isinstance(e, ast.BinOp):
            (a, fa), (b, fb) = self.expr(e.left, axis), self.expr(e.right, axis)
            return replace(e, left=a, right=b), fa or fb
        args = [self.expr(a, axis) for a in e.args]
        vals, facs = [a for a, _ in args], [f for _, f in args]
        loop = axis is not None
        f, s = e.func, e.span

        def call(name, args):
            return ast.Call(name, tuple(args), s, e.func_span)
        if loop and f == "gram_axis" and len(vals) == 2 and isinstance(e.args[1], ast.Name) and e.args[1].id == self.lst.var:
            return call("factor_gram", (vals[0], ast.Name(f"{self.lst.name}{axis}", s), vals[1])), True
        if loop and f in ("T", "triu") and len(vals) == 1 and facs[0]:
            return call(f"factor_{f}", vals), True
        if loop and f == "mm" and len(vals) == 2 and all(facs):
            return call("factor_mm", vals), True
        if loop and f == "norm_lb" and len(vals) == 1 and facs[0]:
            return call("factor_norm_lb", vals), False
        row = FUNCTIONS.get(f)
        factor = f in ("gram_axis", "T", "triu", "mm") or (
            any(facs) and row is not None and not row.reduction and f not in ("mm_axis", "rsolve_triu_axis"))
        return replace(e, args=tuple(vals)), factor
