"""Plan → a straight list of tensor operations, printed two ways with identical arithmetic:
per tensor (`x.add_(y)`) and multi-tensor (`torch._foreach_add_(X, Y)`).

Values are updated in place wherever nothing reads them afterwards, and
`p - c*m/d` becomes one `addcdiv_`, as in torch.optim's own optimizers.
"""
from __future__ import annotations

from collections import Counter

import sympy as sp

from .. import functions as fn
from .. import ir
from ..sym import DEVICE, GROUP, PARAM, TENSOR, LoopBlock, Plan, is_reduction, nest_loops
from .instrs import Instr, Operand
from .printers import _BY_CLASS, DevicePrinter, HostPrinter, number_code
from .schedule import sink


_OUT_OF_PLACE = {"call", "reduce", "maximum", "minimum"}  # no in-place method to call


class Emitter:
    def __init__(self, plan: Plan, names: set[str]):
        self.plan = plan
        self.levels = plan.level_of()
        self.instrs: list[Instr] = []
        self.uses: Counter = Counter()
        for d in plan.steps:
            self._count(d.expr)
        for _, e in plan.outputs:
            self._count(e)
        self.buffer: dict[sp.Symbol, str] = {s: str(s) for s in plan.inputs}
        # Reduced-shape states and the values computed from them are smaller than p: they are
        # written in place only by a result of their own shape.
        self.shapes: dict[sp.Symbol, frozenset | None] = {
            sp.Symbol(s.name): ir.state_shape(s.shape) for s in plan.program.states}
        self.owned: set[str] = set()          # buffers this step allocated
        self.taken = set(names)
        self.writable_inputs: dict[str, str] = {}  # input buffer -> the output allowed to take it
        self.hyper_names = {h.name for h in plan.program.hypers}

    # ---- bookkeeping ----
    def _count(self, e: sp.Expr) -> None:
        for node in sp.preorder_traversal(e):
            if node.is_Symbol:
                self.uses[node] += 1

    def fresh(self) -> str:
        i = 0
        while f"tmp{i}" in self.taken or f"tmp{i}_" in self.taken:  # tmp0_ names tmp0's items
            i += 1
        self.taken.add(f"tmp{i}")
        return f"tmp{i}"

    def operand(self, e: sp.Expr) -> Operand:
        if e.is_Symbol:
            lvl = self.levels[e]
            return Operand(self.buffer.get(e, str(e)), lvl, self.shapes.get(e, ir.FULL))
        if e.is_Number:
            return Operand(str(int(e)) if e.is_Integer and abs(int(e)) < 2**53 else number_code(e), GROUP)
        if self._level(e) == GROUP:  # hyperparameters alone that the plan left inline (-lr): a host float
            return Operand(f"({HostPrinter().doprint(e)})", GROUP)
        return self.emit(e)

    def _consume(self, exprs) -> None:
        for e in exprs:
            if e.is_Symbol:
                self.uses[e] -= 1

    def _may_overwrite(self, a: Operand, target: str | None) -> bool:
        """A buffer may be written in place when nothing reads its value later."""
        if not a.tensor:
            return False
        sym = next((s for s, b in self.buffer.items() if b == a.code and self.uses[s] > 0), None)
        if sym is not None:
            return False
        return a.code in self.owned or (target is not None and self.writable_inputs.get(a.code) == target)

    def apply(self, op: str, args: list[Operand], exprs, *, value: Operand | None = None,
              target: str | None = None, template: str = "", shape=ir.ALL, row=None) -> Operand:
        self._consume(exprs)
        if op not in ("call", "reduce"):  # element-wise: the broadcast of its operands
            for a in args:
                shape = ir.join(shape, a.shape)
        inplace = (op not in _OUT_OF_PLACE and self._may_overwrite(args[0], target)
                   and shape is not None and args[0].shape == shape)
        out = args[0].code if inplace else self.fresh()
        # x + 0*y is x: a term whose coefficient is a hyperparameter is skipped when it is 0
        # (as torch.optim skips weight decay 0); the result may then be x itself.
        skip_zero = (op == "add" and not inplace and value is not None and value.level == GROUP
                     and value.code in self.hyper_names)
        if not inplace and not skip_zero:
            self.owned.add(out)
        self.instrs.append(Instr(op, out, tuple(args), inplace, value, template, skip_zero=skip_zero, row=row))
        level = DEVICE if op == "reduce" else TENSOR
        return Operand(out, level, shape)

    # ---- expressions ----
    def emit(self, e: sp.Expr, target: str | None = None) -> Operand:
        if isinstance(e, sp.Add):
            return self.emit_add(e, target)
        if isinstance(e, sp.Mul):
            return self.emit_mul(e, target)
        if isinstance(e, sp.Pow):
            return self.emit_pow(e, target)
        if type(e) is fn.lerp:
            a, b, w = e.args
            product = _product_of_two(b)
            if (product and all(self._level(f) == TENSOR for f in product) and self._level(w) == GROUP
                    and self._may_write_symbol(a, target)
                    and self._shape(a) == ir.join(self._shape(a), ir.join(*map(self._shape, product)))):
                # lerp(v, x*y, w) = v*(1 - w) + w*x*y: scale and addcmul in place, no temporary
                x, y = (self.operand(f) for f in product)
                acc = self.apply("mul", [self.operand(a), Operand(f"(1 - {self.operand(w).code})", GROUP)],
                                 [a], target=target)
                return self.apply("addcmul", [acc, x, y], list(dict.fromkeys(product)) + [w], value=self.operand(w),
                                  target=target)
            A, B = self.operand(a), self.operand(b)
            if A.tensor and B.tensor:
                return self.apply("lerp", [A, B, self.operand(w)], e.args, target=target)
            # a scalar end: torch.lerp on it made a tensor (its expanded meaning holds scalar
            # subexpressions the plan never hoisted, which emit cannot print)
            args = [A, B, self.operand(w)]
            ref = _first_tensor(args)
            wrapped = (f"{{{i}}}" if x.level >= DEVICE else _like(ref, i) for i, x in enumerate(args))
            return self.apply("call", args, e.args, template="torch.lerp({}, {}, {})".format(*wrapped),
                              shape=ir.join(ir.join(A.shape, B.shape), args[2].shape))
        if isinstance(e, (sp.Min, sp.Max)):
            return self.emit_minmax(e, target)
        if (type(e) is fn.where and self._level(e.args[0]) <= PARAM
                and all(self._level(x) == TENSOR for x in e.args[1:])):
            return self.emit_branch(e)
        row = _BY_CLASS.get(type(e))
        if row is None:
            raise NotImplementedError(f"no PyTorch form for {e.func}")
        if row.random:  # p gives the shape; the draw's number and the tensor's index `i` key the generator
            args = [self.operand(e.args[0]), Operand(str(int(e.args[1])), GROUP), Operand("i", PARAM)]
            return self.apply("call", args, e.args, template=row.tensor, shape=ir.FULL, row=row)
        args = [self.operand(a) for a in e.args]
        if row.foreach and len(args) == 1:
            return self.apply(row.foreach, args, e.args, target=target)
        ref = _first_tensor(args)
        host = range(len(args) - row.scalars, len(args))  # a matrix function's host parameters (inv_root's k)
        template = row.tensor.format(*(f"{{{i}}}" if a.level >= DEVICE or i in host else _like(ref, i)
                                       for i, a in enumerate(args)))
        if row in fn.COMPARISONS.values():
            template = f"{template}.to({{{_first_tensor(args)}}}.dtype)"
        shape = ir.result_shape(row, [a.shape for a in args])
        result = self.apply("call", args, e.args, template=template, shape=shape, row=row)
        if row.matrix and len(args) == 1:  # a transpose is a view of its operand: never write into it
            self.owned.discard(result.code)
        return result

    def emit_branch(self, e) -> Operand:
        """where(c, a, b) with a host condition: compute only the branch it picks.

        Per tensor, that is an if/else; multi-tensor with a per-parameter
        condition, both branches run and each tensor takes its own.
        """
        cond = self.operand(e.args[0])
        self._consume([e.args[0]])
        results, blocks = [], []
        for branch in e.args[1:]:
            outer, self.instrs = self.instrs, []
            result = self.operand(branch)
            self._consume([branch])
            blocks.append(tuple(self.instrs))
            results.append(result)
            self.instrs = outer
        out = self.fresh()
        if all(r.code in self.owned for r in results):
            self.owned.add(out)
        self.instrs.append(Instr("branch", out, (cond, *results), blocks=tuple(blocks)))
        return Operand(out, TENSOR, results[0].shape if results[0].shape == results[1].shape else None)

    def emit_add(self, e: sp.Add, target: str | None) -> Operand:
        terms = list(e.args)
        scalars = [t for t in terms if self._level(t) < TENSOR]
        tensors = [t for t in terms if self._level(t) == TENSOR]
        base_sym = self._base_symbol(target)
        head = next((t for t in tensors if base_sym is not None and _scaled(t, base_sym) is not None), None)
        if head is None:
            head = next((t for t in tensors if not _is_negated(t)), tensors[0])
        tensors.remove(head)
        prepared = [self._term(t) for t in tensors]  # read everything before writing the base
        if base_sym is not None and _scaled(head, base_sym) is not None:
            coef = _scaled(head, base_sym)
            acc = self.operand(base_sym)
            if coef != 1:
                acc = self.apply("mul", [acc, self.operand(coef)], [base_sym, coef], target=target)
            else:
                self._consume([base_sym])
        else:
            acc = self.operand(head)
            if head.is_Symbol:
                self._consume([head])
        for kind, scale, ops, exprs in prepared:
            if kind in ("addcmul", "addcdiv"):
                acc = self.apply(kind, [acc, *ops], exprs, value=scale, target=target)
            elif scale is None:
                acc = self.apply("add", [acc, ops[0]], exprs, target=target)
            elif scale.code == "-1":
                acc = self.apply("sub", [acc, ops[0]], exprs, target=target)
            else:
                acc = self.apply("add", [acc, ops[0]], exprs, value=scale, target=target)
        for s in scalars:
            acc = self.apply("add", [acc, self.operand(s)], [s], target=target)
        return acc

    def _term(self, t: sp.Expr):
        """A term of a sum, shaped for a fused op: value*a/b, value*a*b, value*a or a."""
        scale, factors = _split_scale(t, self._level)
        host = scale is not None and self._level(scale) <= PARAM
        num = [f for f in factors if not _is_reciprocal(f)]
        den = [f.base if f.exp == -1 else f.base ** -f.exp for f in factors if _is_reciprocal(f)]
        value = self.operand(scale) if host else None
        if host and len(num) == 1 and len(den) == 1:
            ops = [self.operand(num[0]), self.operand(den[0])]
            return "addcdiv", value, ops, [num[0], den[0]]
        if host and len(num) == 2 and not den:
            ops = [self.operand(num[0]), self.operand(num[1])]
            return "addcmul", value, ops, num
        if host and len(num) == 1 and not den:
            return "add", value, [self.operand(num[0])], num
        if _is_negated(t):
            inner = -t
            return "add", Operand("-1", GROUP), [self.operand(inner)], [inner] if inner.is_Symbol else []
        return "add", None, [self.operand(t)], [t] if t.is_Symbol else []

    def emit_mul(self, e: sp.Mul, target: str | None) -> Operand:
        scale, factors = _split_scale(e, self._level)
        if not factors:  # a product of scalars, one on the device (e.g. -amax(g)): host part is the scale
            low = [a for a in e.args if self._level(a) < DEVICE]
            factors = [a for a in e.args if self._level(a) >= DEVICE]
            scale = sp.Mul(*low) if low else None
        num = [f for f in factors if not _is_reciprocal(f)]
        den = [f.base if f.exp == -1 else f.base ** -f.exp for f in factors if _is_reciprocal(f)]
        if num:
            acc = self.operand(num[0])
            acc_expr = [num[0]]
        else:
            d = den.pop(0)
            acc = self.apply("reciprocal", [self.operand(d)], [d], target=target)
            acc_expr = []
        if acc_expr and not num[1:] and not den and scale is not None:
            return self.apply("mul", [acc, self.operand(scale)], acc_expr + [scale], target=target)
        for f in num[1:]:
            acc = self.apply("mul", [acc, self.operand(f)], acc_expr + [f], target=target)
            acc_expr = []
        for d in den:
            acc = self.apply("div", [acc, self.operand(d)], acc_expr + [d], target=target)
            acc_expr = []
        if scale is not None:
            op = "neg" if scale == -1 else "mul"
            args = [acc] if op == "neg" else [acc, self.operand(scale)]
            acc = self.apply(op, args, acc_expr + ([] if op == "neg" else [scale]), target=target)
        return acc

    def emit_pow(self, e: sp.Pow, target: str | None) -> Operand:
        base, exp = e.args
        if self._level(base) < TENSOR:  # scalar ** tensor
            x = self.operand(exp)
            return self.apply("call", [x, self.operand(base)], [base, exp],
                              template="torch.pow({1}, {0})", shape=x.shape)
        b = self.operand(base)
        special = {sp.Integer(2): None, sp.S.Half: "sqrt", -sp.S.Half: "rsqrt", sp.Integer(-1): "reciprocal"}
        if exp in special:
            if special[exp] is None:
                return self.apply("mul", [b, b], [base], target=target)  # one use of base, read twice
            return self.apply(special[exp], [b], [base], target=target)
        return self.apply("pow", [b, self.operand(exp)], [base, exp], target=target)

    def emit_minmax(self, e, target):
        tensor_args = [a for a in e.args if self._level(a) == TENSOR]
        scalar_args = [a for a in e.args if self._level(a) < TENSOR]
        acc = self.operand(tensor_args[0])
        exprs = [tensor_args[0]]
        is_min = isinstance(e, sp.Min)
        for a in tensor_args[1:]:
            acc = self.apply("minimum" if is_min else "maximum", [acc, self.operand(a)], exprs + [a],
                             target=target)
            exprs = []
        for a in scalar_args:
            acc = self.apply("clamp_max" if is_min else "clamp_min", [acc, self.operand(a)], exprs + [a],
                             target=target)
            exprs = []
        return acc

    def _shape(self, e: sp.Expr):
        """The shape of a value, without emitting it."""
        if e.is_Symbol:
            return self.shapes.get(e, ir.FULL) if self.levels.get(e) == TENSOR else ir.ALL
        if is_reduction(e):
            return ir.ALL
        return ir.result_shape(_BY_CLASS.get(type(e)), [self._shape(a) for a in e.args])

    # ---- steps and outputs ----
    def _level(self, e: sp.Expr) -> int:
        if e.is_Symbol:
            return self.levels[e]
        if e.is_Number:
            return GROUP
        return max((self._level(a) for a in e.args), default=GROUP)

    def _base_symbol(self, target: str | None):
        if target is None:
            return None
        return next((s for s in self.plan.inputs if str(s) == target), None)

    def run(self) -> list[Instr]:
        out_of = {e: base for base, e in self.plan.outputs if e.is_Symbol}
        for base, _ in self.plan.outputs:
            self.writable_inputs[base] = base
        for d in nest_loops(self.plan.steps):
            if isinstance(d, LoopBlock):
                self.loop(d)
            else:
                self.step(d, out_of.get(d.symbol))
        pending = list(self.plan.outputs)
        while pending:  # update in place the outputs whose old value nothing else reads
            ready = next((o for o in pending if self._free_to_write(o, pending)), None)
            if ready is None:  # each reads another's old value (m, v = v, m): keep this one's
                ready = pending[0]
                keep = self.fresh()
                self.owned.add(keep)
                self.instrs.append(Instr("call", keep, (Operand(ready[0], TENSOR),), template="torch.clone({0})"))
                self.buffer[self._base_symbol(ready[0])] = keep
            pending.remove(ready)
            base, e = ready
            result = self.operand(e) if e.is_Symbol or e.is_Number else self.emit(e, target=base)
            if e.is_Symbol:
                self._consume([e])
            if result.code != base:  # now, before a later output updates its source in place
                self.instrs.append(Instr("copy", base, (Operand(base, TENSOR), result), inplace=True))
        return self.instrs

    def step(self, d, target: str | None) -> None:
        """One definition of the plan's steps."""
        if d.level < TENSOR and not is_reduction(d.expr):
            self._consume(d.expr.free_symbols)
            # In the parameter's arithmetic dtype: the printer's float64 (host floats kept exact)
            # would otherwise promote a 0-dim parameter's whole update to float64.
            self.instrs.append(Instr("scalar", str(d.symbol), tuple(
                self.operand(s) for s in sorted(d.expr.free_symbols, key=str)),
                template=f"torch.as_tensor({DevicePrinter().doprint(d.expr)}, dtype={{dtype}})"))
            self.buffer[d.symbol] = str(d.symbol)
            return
        if is_reduction(d.expr):
            row = fn.REDUCTIONS[type(d.expr)]
            arg = self.operand(d.expr.args[0])
            self._consume([d.expr.args[0]])
            args, template = (arg,), row.tensor
            if not arg.tensor:  # a scalar broadcasts: reduce it over a tensor shaped like p
                args, template = (arg, Operand("p", TENSOR)), row.tensor.format("({0} + torch.zeros_like({1}))")
            self.instrs.append(Instr("reduce", str(d.symbol), args, template=template, row=row))
            self.buffer[d.symbol] = str(d.symbol)
            return
        if d.expr.is_Symbol:  # matrix work that is another value already
            self._consume([d.expr])
            result = self.operand(d.expr)
        else:
            result = self.emit(d.expr, target=target)
        self._rename(result, d.symbol)

    def loop(self, block: LoopBlock) -> None:
        """A kept loop: each carried value bound to a name of its own, then `for _ in range(count):`
        one round, which ends by binding each to its next value. A round writes in place only what
        it allocated itself: a value from before the loop is read again by the next round."""
        count = self.operand(block.count)
        names = []
        for start, init in block.carried:
            value = self.operand(init)
            self._consume([init])
            names.append(self.fresh())
            self.instrs.append(Instr("bind", names[-1], (value,)))
            self.buffer[start], self.shapes[start] = names[-1], value.shape
        outer = (self.instrs, self.owned, self.writable_inputs)
        self.instrs, self.owned, self.writable_inputs = [], set(), {}
        for d in block.body:
            self.step(d, None)
        values = [self.operand(end) for _, _, end in block.ends]  # bound together: one may read another
        self._consume([x for _, start, end in block.ends for x in (end, start)])
        self.instrs.append(Instr("bind", ", ".join(names), tuple(values)))
        body = sink(self.instrs)
        self.instrs, self.owned, self.writable_inputs = outer
        self.instrs.append(Instr("loop", names[0], (count,), blocks=(tuple(body),)))
        for (after, start, _), name in zip(block.ends, names):
            self.buffer[after], self.shapes[after] = name, self.shapes[start]

    def _may_write_symbol(self, e: sp.Expr, target: str | None) -> bool:
        """Would `e` be written in place once this use of it is consumed?"""
        if not e.is_Symbol or self.levels.get(e) != TENSOR:
            return False
        return self.uses[e] == 1 and self._may_overwrite_after(self.operand(e), target)

    def _may_overwrite_after(self, a: Operand, target: str | None) -> bool:
        return a.code in self.owned or (target is not None and self.writable_inputs.get(a.code) == target)

    def _rename(self, result: Operand, symbol: sp.Symbol) -> None:
        self.buffer[symbol] = result.code
        self.shapes[symbol] = result.shape

    def _free_to_write(self, output, pending) -> bool:
        base, _ = output
        sym = self._base_symbol(base)
        return all(sym not in e.free_symbols for b, e in pending if b != base)


def _split_scale(e: sp.Expr, level) -> tuple[sp.Expr | None, list[sp.Expr]]:
    """Split a product into its scalar factor (None if 1) and its tensor factors."""
    if not isinstance(e, sp.Mul):
        return None, [e]
    scalars = [a for a in e.args if level(a) < TENSOR]
    tensors = [a for a in e.args if level(a) == TENSOR]
    scale = sp.Mul(*scalars) if scalars else None
    return scale, tensors


def _product_of_two(e: sp.Expr):
    """(x, y) if e is x*y or x**2 of tensors with no scalar factor, else None."""
    if isinstance(e, sp.Pow) and e.exp == 2:
        return (e.base, e.base)
    if isinstance(e, sp.Mul) and len(e.args) == 2 and not any(a.is_Number for a in e.args):
        return e.args
    return None


def _is_reciprocal(f: sp.Expr) -> bool:
    return isinstance(f, sp.Pow) and f.exp.is_Number and f.exp < 0


def _is_negated(t: sp.Expr) -> bool:
    return isinstance(t, sp.Mul) and t.args[0] == -1


def _scaled(t: sp.Expr, base: sp.Symbol):
    """c if t is c*base with c free of base, else None."""
    if t == base:
        return sp.Integer(1)
    if isinstance(t, sp.Mul) and base in t.args:
        c = t / base
        return c if not c.has(base) else None
    return None


def _like(ref: int, i: int) -> str:
    """Host scalar argument {i} as a tensor like argument {ref}. as_tensor, not new_tensor: compiled,
    the scalar may already be a 0-dim tensor, which new_tensor would copy-construct with a warning."""
    return f"torch.as_tensor({{{i}}}, dtype={{{ref}}}.dtype, device={{{ref}}}.device)"


def _first_tensor(args) -> int:
    return next(i for i, a in enumerate(args) if a.tensor)
