"""SymPy printers for scalars: host floats (math), 0-dim tensors (torch), and Triton registers."""
from __future__ import annotations

import math
import re

import numpy as np
import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from .. import functions as fn
from .. import ieee, ir

_BY_CLASS = {f.sympy: f for f in list(fn.TABLE.values()) + list(fn.COMPARISONS.values())
             if isinstance(f.sympy, type)}
_COMPARISONS = tuple(f.sympy for f in fn.COMPARISONS.values())
# SymPy writes atan2(y, c) of a constant c > 0 as atan(y/c): no spec names atan, but a plan may hold it.
_BY_CLASS[sp.atan] = fn.Function("atan", 1, sp.atan, "torch.atan({0})", "math.atan({0})", "atan",
                                  triton="_atan({0})")


# A state's shape (ir.State.shape) as code on its parameter's name; None: the parameter's own.
STATE_SHAPE_CODE = {"full": None, "scalar": "()", "rows": "p.shape[:-1] + (1,)",
                    "cols": "p.shape[:-2] + (1,) + p.shape[-1:]", "bool": "p.shape",
                    # a square matrix per matrix of p (optdsl/shapes.py): Shampoo's L and R
                    "gram_rows": "p.shape[:-1] + p.shape[-2:-1]", "gram_cols": "p.shape[:-2] + p.shape[-1:] * 2"}


def state_shape_code(shape: str, group_code: dict[str, str] | None = None, diag: str | None = None) -> str | None:
    """Code for the shape of a state of this kind, on its parameter `p` (None: p's own). A
    `matrix(A, B)` size that is a hyperparameter k reads as min(k, nrows, ncols), the most singular
    vectors a matrix has (GaLore's rank, as a truncated SVD gives it); group_code says how the group
    holds each hyperparameter (without it, the step's own variable of that name). `diag`: a `factor(K)`
    state's condition for its diagonal kind, as code (ir.State.diag)."""
    axis = ir.axis_kind(shape)
    if axis is not None:  # one d_K x d_K matrix, or one value per index of axis K
        form, k = axis
        if form == "factor":  # its diagonal (d_K,) where its condition holds, else the d_K x d_K matrix
            return f"p.shape[{k}:{k + 1}] * (1 if {diag} else 2)" if diag else f"p.shape[{k}:{k + 1}] * 2"
        return f"p.shape[{k}:{k + 1}] * 2" if form == "gram" else f"(1,) * {k} + p.shape[{k}:{k + 1}] + (1,) * (p.dim() - {k + 1})"
    dims = ir.matrix_dims(shape)
    if dims is None:
        return STATE_SHAPE_CODE[shape]
    size = {"nrows": "p.shape[-2]", "ncols": "p.shape[-1]"}
    code = [size.get(d) or f"min(int({(group_code or {}).get(d, d)}), p.shape[-2], p.shape[-1])" for d in dims]
    return f"p.shape[:-2] + ({code[0]}, {code[1]})"


def read_state_code(shape: str, signed: bool, stored: str, p: str, diag: str | None = None) -> str:
    """Code reading a float state `stored` of parameter `p` as the update computes with it: in p's
    precision, dequantised when it holds low-bit codes (templates/lowbit.py.j2's _read_state,
    which needs the code the state was given and its shape)."""
    code = re.sub(r"\bp\b", p, state_shape_code(shape, diag=diag) or "p.shape")
    return f"_read_state({stored}, {p}, {signed}, {code})"


def number_code(x) -> str:
    """Python (and Triton) code for a number as a float64: inf and nan by name, too large as inf."""
    try:
        f = float(x)
    except OverflowError:  # an integer past the largest float
        f = math.inf if x > 0 else -math.inf
    if f != f:
        return 'float("nan")'
    if math.isinf(f):
        return 'float("inf")' if f > 0 else '-float("inf")'
    return repr(f)


class HostPrinter(PythonCodePrinter):
    """Scalars computed on the host in Python floats, once per group or per parameter."""

    column = "host"

    def __init__(self, rename: dict[str, str] | None = None):
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.rename = rename or {}

    keeps_guards = True  # whether it prints optdsl.ieee's wrappers (as helpers, on host floats)
    # (No reduction of a scalar reaches a printer: sym's hoister, a state's initial value and a mode
    # block write each as the scalar broadcast to p's shape, functions.broadcast_scalars.)

    def doprint(self, expr, *args, **kwargs):
        if not self.keeps_guards:  # tensors and kernels are IEEE 754 already: the wrappers go
            expr = ieee.plain(expr)
        return super().doprint(expr, *args, **kwargs)

    def _print_Symbol(self, s):
        return self.rename.get(s.name, s.name)

    def _print_Float(self, e):
        return number_code(e)

    def _print_Integer(self, e):
        return str(int(e)) if abs(int(e)) < 2**53 else number_code(e)

    def _print_NaN(self, e):
        return number_code(math.nan)

    def _print_Function(self, e):
        if isinstance(e, ieee.GUARDED):  # IEEE 754 on host floats (optdsl.ieee); plain on tensors, in kernels
            return (f"{e.helper}({', '.join(self._print(a) for a in e.args)})" if self.column == "host"
                    else self._print(e.plain()))
        row = _BY_CLASS.get(type(e))
        if row is None:
            return super()._print_Function(e)
        form = getattr(row, self.column)
        # an argument a method is called on ({0}.mean(...)) is a whole: (a + b).mean, not a + b.mean
        return form.format(*(f"({text})" if "{%d}." % i in form and not text.isidentifier() else text
                             for i, text in enumerate(self._print(a) for a in e.args)))

    def _print_Infinity(self, e):
        return 'float("inf")'

    def _print_NegativeInfinity(self, e):
        return '-float("inf")'


class DevicePrinter(HostPrinter):
    """Scalars that stay 0-dim tensors on the parameter's device (they read a reduction), and values
    that may be tensors (a state's initial value)."""

    column = "tensor"
    keeps_guards = False

    def _print_Pow(self, e, rational=False):
        if e.exp == sp.S.Half:
            return f"torch.sqrt({self._print(e.base)})"
        if e.exp == -sp.S.Half:
            return f"torch.rsqrt({self._print(e.base)})"
        return super()._print_Pow(e, rational)

    def _print_Min(self, e):
        return self._nary(e, "torch.minimum")

    def _print_Max(self, e):
        return self._nary(e, "torch.maximum")

    def _nary(self, e, func):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            # float64: torch.as_tensor(0.9) alone would round a host float to float32
            out = (f"{func}(torch.as_tensor({out}, dtype=torch.float64), "
                   f"torch.as_tensor({self._print(a)}, dtype=torch.float64))")
        return out

    def _print_exp(self, e):
        return f"torch.exp({self._print(e.args[0])})"

    def _print_log(self, e):
        return f"torch.log({self._print(e.args[0])})"

    def _print_Abs(self, e):
        return f"torch.abs({self._print(e.args[0])})"

    def _print_sign(self, e):
        return f"torch.sign({self._print(e.args[0])})"

    def _print_tanh(self, e):
        return f"torch.tanh({self._print(e.args[0])})"

    def _print_cos(self, e):
        return f"torch.cos({self._print(e.args[0])})"

    def _print_sin(self, e):
        return f"torch.sin({self._print(e.args[0])})"

    def _print_Mod(self, e):  # a host float on the left: torch.remainder takes it as a Scalar
        return f"torch.remainder({self._tensor(e.args[0])}, {self._tensor(e.args[1])})"

    def _print_Function(self, e):
        text = super()._print_Function(e)
        if isinstance(e, _COMPARISONS):  # a bool tensor: as a number, 1.0 where it holds
            return f"torch.as_tensor({text}, dtype=torch.float64)"
        return text

    def _tensor(self, e):  # an argument that may be a host float (float64: as_tensor(0.9) is float32)
        return f"torch.as_tensor({self._print(e)}, dtype=torch.float64)"

    def _print_atan2(self, e):
        return f"torch.atan2({self._tensor(e.args[0])}, {self._tensor(e.args[1])})"

    def _print_lerp(self, e):  # torch.lerp takes no host float for its ends
        return fn.TABLE["lerp"].host.format(*(self._print(a) for a in e.args))

    def _print_where(self, e):
        c, a, b = e.args
        return f"torch.where({self._tensor(c)} != 0, {self._tensor(a)}, {self._tensor(b)})"

    def _print_atan(self, e):
        return f"torch.atan({self._print(e.args[0])})"

    def _print_log1p(self, e):
        return f"torch.log1p({self._print(e.args[0])})"


class MatrixPrinter(DevicePrinter):
    """Matrix work that torch runs between two fused launches, one tensor at a time. A condition on
    host scalars (`host`: the parameter's shape, t) picks a branch in Python: the branches may differ
    in shape (x or x.mT), which torch.where cannot take."""

    def __init__(self, host: set[str]):
        super().__init__()
        self.host = set(host)

    def _print_where(self, e):
        c, a, b = e.args
        if all(s.name in self.host for s in c.free_symbols):
            return f"({self._print(a)} if {HostPrinter().doprint(c)} else {self._print(b)})"
        return f"torch.where({self._print(c)} != 0, {self._print(a)}, {self._print(b)})"

    def _print_T(self, e):
        return f"({self._print(e.args[0])}).mT"


class CompiledPrinter(DevicePrinter):
    """Per-parameter scalars under torch.compile: 0-dim tensors wherever they read `tensors`.

    Eager code reads the step count with `.item()` and computes in Python floats; a compiled
    step keeps it a tensor, since `.item()` would break the graph. Parts that read no tensor
    (hyperparameters, numbers) still print as host floats: torch.sqrt takes no float.
    """

    keeps_guards = True  # the parts that read no tensor are host floats

    def __init__(self, tensors: set[str]):
        super().__init__()
        self.tensors = set(tensors)
        self.host = HostPrinter()

    def _reads_tensor(self, e) -> bool:
        return isinstance(e, sp.Basic) and any(s.name in self.tensors for s in e.free_symbols)

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Basic) and not self._reads_tensor(expr):
            return self.host._print(expr, **kwargs)
        return super()._print(expr, **kwargs)

    def _tensor(self, e):  # what reads a tensor (t is float64 here) is one already
        return self._print(e) if self._reads_tensor(e) else super()._tensor(e)

    def _nary(self, e, func):
        out = self._tensor(e.args[0])
        for a in e.args[1:]:
            out = f"{func}({out}, {self._tensor(a)})"
        return out


class ShapePrinter(CompiledPrinter):
    """A spec's statements one by one on shapes alone (optdsl/backends/step_shapes.py): `tensors` are
    meta tensors, what reads none of them a host float. A condition on host scalars picks a branch in
    Python, as the matrix section's (the branches may differ in shape); a draw is shaped like p."""

    def __init__(self, tensors: set[str]):
        super().__init__(tensors)

    def _print_where(self, e):
        c, a, b = e.args
        if not self._reads_tensor(c):
            return f"({self._print(a)} if {HostPrinter().doprint(c)} else {self._print(b)})"
        return super()._print_where(e)

    def _print_T(self, e):
        return f"({self._print(e.args[0])}).mT"

    def _print_randn(self, e):
        return f"torch.zeros_like({self._print(e.args[0])})"

    _print_rand = _print_randn

    # A kept loop (optdsl/ir.py) is replayed one round: its body's statements once, each carried value
    # its value on entry, then the round's end (a round keeps the shapes it carries: optdsl/shapes.py).
    def _print_loop(self, e):
        return self._print(e.args[3])

    def _print_loop_end(self, e):
        return self._print(e.args[1])


class TritonPrinter(HostPrinter):
    """Element-wise values inside a Triton kernel: registers of float32 (or float64)."""

    column = "triton"
    keeps_guards = False
    dtype = "C_TYPE"  # the kernel's arithmetic dtype

    def _print_Function(self, e):  # a sum in parentheses: the templates put arguments in products
        row = _BY_CLASS.get(type(e))
        if row is None:
            return super()._print_Function(e)
        if not row.triton:  # backends.triton.unsupported() refuses such a plan before printing it
            raise NotImplementedError(f"{row.name}() has no Triton form")
        args = [self.parenthesize(a, PRECEDENCE["Mul"]) for a in e.args]
        if type(e) is fn.where and all(a.is_Number for a in e.args[1:]):
            args[1:] = [self._end(a) for a in e.args[1:]]
        if type(e) is sp.atan2:  # the helper takes its dtype from its arguments: a number is made a tensor
            args = [self._end(a) for a in e.args]
        text = row.triton.format(*args)
        # tl.where of two literals is float32: sqrt(a > b) would be a float32 sqrt in a float64 kernel
        return f"{text}.to({self.dtype})" if isinstance(e, _COMPARISONS + (sp.sign,)) else text

    def _print_randn(self, e):  # the draw's number is an integer of the hash, not a float
        return _BY_CLASS[type(e)].triton.format("p", int(e.args[1]))

    _print_rand = _print_randn

    def _print_lerp(self, e):
        a, b, w = e.args
        if w.is_number:  # torch.lerp's form for this weight, picked here (see functions.TABLE's row)
            form = "({0} + {2} * ({1} - {0}))" if w < sp.S.Half else "({1} - ({1} - {0}) * {3})"
            return form.format(*(self.parenthesize(x, PRECEDENCE["Mul"]) for x in (a, b, w, 1 - w)))
        return fn.TABLE["lerp"].triton.format(self._end(a), self._end(b), self.parenthesize(w, PRECEDENCE["Mul"]))

    def _end(self, x):
        """An operand tl.where selects: a number would be a float32 literal there, so it is made in
        the kernel's dtype."""
        return f"tl.full((), {self._print(x)}, {self.dtype})" if x.is_Number else self.parenthesize(x, PRECEDENCE["Mul"])

    def _print(self, expr, **kwargs):
        # A constant such as log(2) or sqrt(2) is a number from the host: Triton would compute it
        # from a float32 literal.
        if isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Number and expr.is_finite:
            return self._print(sp.Float(float(expr), 17))
        return super()._print(expr, **kwargs)

    def _print_Pow(self, e, rational=False):
        if e.base.is_number and e.base.is_positive and not e.exp.is_number:  # 2^x: exp(x log 2)
            return f"tl.exp(({self._print(e.exp)}) * {self._print(sp.Float(float(sp.log(e.base)), 17))})"
        base = self._print(e.base)
        if e.exp == sp.S.Half:
            return f"tl.sqrt({base})"
        if e.exp == -sp.S.Half:
            return f"tl.rsqrt({base})"
        if e.exp.is_Integer and 0 < abs(int(e.exp)) <= 4:
            product = " * ".join([f"({base})"] * abs(int(e.exp)))
            return f"({product})" if e.exp > 0 else f"(1.0 / ({product}))"
        # exp(y log x) is nan for x < 0 and at 1^inf, 0^0: torch.pow's values there (IEEE 754's pow)
        if e.exp.is_Integer or e.exp.is_infinite:  # of |x|, with x's sign for an odd power
            y = "float(\"inf\")" if e.exp == sp.oo else "-float(\"inf\")" if e.exp == -sp.oo else f"{int(e.exp)}.0"
            r = f"tl.where(tl.abs({base}) == 1.0, 1.0, tl.exp({y} * tl.log(tl.abs({base}))))"
            return f"tl.where({base} < 0, -{r}, {r})" if e.exp.is_Integer and int(e.exp) % 2 else r
        y = self._print(e.exp)
        return f"tl.where({base} == 1.0, 1.0, tl.where(({y}) == 0.0, 1.0, tl.exp(({y}) * tl.log({base}))))"

    # nan propagates, as torch.minimum/maximum's does (Triton's default returns the other operand)
    def _print_Min(self, e):
        return self._fold(e, "tl.minimum")

    def _print_Max(self, e):
        return self._fold(e, "tl.maximum")

    def _fold(self, e, func):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"{func}({out}, {self._print(a)}, propagate_nan=tl.PropagateNan.ALL)"
        return out

    def _print_Integer(self, e):
        return f"{int(e)}.0" if abs(int(e)) < 2**53 else number_code(e)

    def _print_Rational(self, e):
        return number_code(e)


class TritonScalar64Printer(TritonPrinter):
    """Per-tensor scalars computed in float64 inside a kernel. Triton reads a Python float literal
    as float32, so a number that float32 cannot hold exactly (0.96) is made a float64 constant."""

    dtype = "tl.float64"

    def _print_Float(self, e):
        x = float(e)
        if not math.isfinite(x) or float(np.float32(x)) == x:
            return number_code(x)
        return f"tl.full((), {x!r}, tl.float64)"

    _print_Rational = _print_Float


# SymPy's own functions (Abs, exp, ...) print through the table's Triton column too.
for _cls in [k for k in _BY_CLASS if k.__module__.startswith("sympy")]:
    setattr(TritonPrinter, f"_print_{_cls.__name__}", lambda self, e: self._print_Function(e))
