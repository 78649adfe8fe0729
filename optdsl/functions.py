"""The one table of functions: spec name → arity → SymPy meaning → PyTorch code.

Adding a function is adding a row. `sympy` builds the meaning from SymPy
arguments; `tensor` is the PyTorch expression on tensors; `host` the Python
expression on floats (scalars hoisted to the host); `foreach` names the
`torch._foreach_*` op when there is one (else the multi-tensor path loops).
Reductions take a tensor and give one scalar per parameter (axis reductions: one per row, column or
unit). A scalar where a reduction takes a tensor broadcasts, as a scalar does everywhere a tensor
is expected: it stands for a tensor shaped like p filled with its value, so `sum(c)` is `numel * c`
and `row_sum(c)` is `ncols * c` (`broadcast` below, the one rule every path computes by). A value of a
reduced shape (a rows state r: `r - r - 2`) that SymPy simplifies to a number keeps the language's shape:
the reduction counts that shape's elements (OPERAND_SHAPES).
"""
from __future__ import annotations

import builtins
import functools
from dataclasses import dataclass
from typing import Callable

import sympy as sp
from sympy.core.operations import ShortCircuit
from sympy.core.parameters import global_parameters
from sympy.codegen.cfunctions import log1p


class _Opaque(sp.Function):
    """A function SymPy keeps as written; its meaning lives in `rewrite_meaning`."""

    is_real = True
    is_number = False  # never evaluated to a number, so Min/Max must not compare it as one

    def _eval_evalf(self, prec):
        # SymPy evaluates a function of floats by the mpmath function of its name: mpmath.norm(0.5) is 0.5
        # where norm(0.5) is 0.5 * sqrt(numel) (a scalar broadcast), mpmath.qr raised. Only a function
        # with an element-wise meaning (sigmoid) evaluates so.
        return super()._eval_evalf(prec) if hasattr(self, "rewrite_meaning") else None


class lerp(_Opaque):
    nargs = 3

    def rewrite_meaning(self):
        a, b, w = self.args
        return a + w * (b - a)


class where(_Opaque):
    nargs = 3

    @classmethod
    def eval(cls, cond, a, b):
        if cond.is_Number:  # a constant condition picks its branch
            return a if cond != 0 else b
        if a == b:
            return a


class sigmoid(_Opaque):
    nargs = 1

    def rewrite_meaning(self):
        return 1 / (1 + sp.exp(-self.args[0]))


class softplus(_Opaque):
    nargs = 1

    def rewrite_meaning(self):
        return sp.log(1 + sp.exp(self.args[0]))


def _indicator(name: str, test: Callable[[sp.Expr, sp.Expr], object]):
    """A comparison as a number: 1.0 where it holds, 0.0 where not."""

    def eval(cls, a, b):
        if a.is_Number and b.is_Number and sp.nan not in (a, b):
            return sp.Integer(1) if test(a, b) else sp.Integer(0)

    return type(name, (_Opaque,), {"nargs": 2, "eval": classmethod(eval)})


lt = _indicator("lt", lambda a, b: a < b)
le = _indicator("le", lambda a, b: a <= b)
gt = _indicator("gt", lambda a, b: a > b)
ge = _indicator("ge", lambda a, b: a >= b)
eq = _indicator("eq", lambda a, b: a == b)
ne = _indicator("ne", lambda a, b: a != b)
land = _indicator("land", lambda a, b: a != 0 and b != 0)
lor = _indicator("lor", lambda a, b: a != 0 or b != 0)


class bfloat16(_Opaque):  # x rounded to bfloat16, kept in the arithmetic's dtype; the analyses take x
    nargs = 1

    def rewrite_meaning(self):
        return self.args[0]


class _Tagged:
    """Printed as written: a reduction's second argument (its operand's shape) is no part of the math shown."""

    def _latex(self, printer, **kwargs):
        return printer._print_Function(self.func(self.args[0]), **kwargs)

    def _sympystr(self, printer):
        return printer._print_Function(self.func(self.args[0]))


class _Reduction(_Tagged, _Opaque):
    """A whole-tensor reduction: one scalar per parameter. A second argument, when there is one, is the
    code (OPERAND_SHAPES) of its operand's shape where the language's is not p's (rows, cols, ...)."""

    nargs = (1, 2)


class norm(_Reduction):
    is_nonnegative = True


class sum(_Reduction):  # noqa: A001 - the spec's name
    pass


class mean(_Reduction):
    pass


class rms(_Reduction):
    is_nonnegative = True


class amax(_Reduction):
    pass


class _AxisReduction(_Tagged, _Opaque):
    """A reduction over some axes of p, kept with size 1 so that it broadcasts back (a second argument:
    as a whole reduction's, its operand's shape)."""

    nargs = (1, 2)


class row_mean(_AxisReduction):
    pass


class col_mean(_AxisReduction):
    pass


class row_sum(_AxisReduction):
    pass


class col_sum(_AxisReduction):
    pass


class row_max(_AxisReduction):
    pass


class col_max(_AxisReduction):
    pass


class unit_mean(_AxisReduction):
    pass


class unit_norm(_AxisReduction):
    is_nonnegative = True


class _Random(_Opaque):
    """A fresh random number per element, shaped like p: `randn()` in a spec is randn(p, k) here, p
    giving the shape and k numbering the spec's draws (0, 1, ...), so two draws are two values to
    SymPy while one draw read twice (`z = randn()`) is one. Its meaning is no formula of its arguments."""

    nargs = 2

    def _latex(self, printer):
        return rf"\operatorname{{{type(self).__name__}}}_{{{self.args[1]}}}"

    def _sympystr(self, printer):
        return f"{type(self).__name__}()" if self.args[1] == 0 else f"{type(self).__name__}(#{self.args[1]})"


class randn(_Random):  # standard normal
    pass


class rand(_Random):  # uniform on [0, 1)
    is_nonnegative = True


class mm(_Opaque):  # matrix product of the last two axes; its meaning is not element-wise
    nargs = 2


class T(_Opaque):  # transpose of the last two axes
    nargs = 1


class inv_root(_Opaque):  # A^(-1/k) of a symmetric positive semi-definite A, by eigendecomposition
    nargs = 2


class eigvecs(_Opaque):  # the eigenvectors of a symmetric A, columns in ascending order of eigenvalue
    nargs = 1


class qr(_Opaque):  # Q of the reduced QR decomposition
    nargs = 1


class svd_u(_Opaque):  # the first k left singular vectors of A, as columns (n x k)
    nargs = 2


class svd_vh(_Opaque):  # the first k right singular vectors of A, as rows (k x m)
    nargs = 2


class sortperm(_Opaque):  # the permutation matrix that sorts the diagonal of A, largest first
    nargs = 1


class triu(_Opaque):  # the upper triangle of A (the diagonal included), zeros below
    nargs = 1


class rsolve_triu(_Opaque):  # B A^-1 for an upper-triangular A (its upper triangle read), a triangular solve
    nargs = 2


class norm_lb(_Opaque):  # PSGD's lower bound of the spectral norm of a square A, one number per matrix
    nargs = 1
    is_nonnegative = True


class mm_axis(_Opaque):  # Q applied along axis k of x: out[.., i, ..] = sum_j Q[i, j] x[.., j, ..]
    nargs = 3


class rsolve_triu_axis(_Opaque):  # x with its axis k multiplied on the right by A^-1 (A upper-triangular)
    nargs = 3


class gram_axis(_Opaque):  # x's Gram matrix along axis k, d_k x d_k: sum over the other axes of x[.., i, ..] x[.., j, ..]
    nargs = 2


class axis_sum(_Opaque):  # x summed over every axis but k, kept with size 1 (it broadcasts against x)
    nargs = 2


# The work of a state list's loop on a factor (optdsl/axes.py): a d_k x d_k matrix or its diagonal (d_k,),
# its kind decided per parameter when the state is made; each is its matrix form's on a diagonal matrix
class factor_T(_Opaque):  # T(F): a diagonal factor is its own transpose
    nargs = 1


class factor_triu(_Opaque):  # triu(F): a diagonal factor is its own upper triangle
    nargs = 1


class factor_mm(_Opaque):  # mm(F, G) of two factors of one kind: the diagonals' product where diagonal
    nargs = 2


class factor_norm_lb(_Opaque):  # norm_lb(F): a diagonal matrix's norm is amax(abs(F))
    nargs = 1
    is_nonnegative = True


class factor_gram(_Opaque):  # gram_axis(x, k) of F's kind: its diagonal, axis_sum(x^2, k), where F is diagonal
    nargs = 3


# SymPy's Min and Max look for "local zeros" each time one is made: every pair of arguments is compared,
# and factor_terms of their difference is taken, which costs as much as the arguments are large (Kron's
# `min(1.1 / (rms(u) + 1e-6), 1)` over the whole update), and SymPy does not cache it as it caches Add and
# Mul. The checks, the plan, the analyses and the printers of a rule each make the same ones again, and
# a rule unrolled per rank and kinds (optdsl/axes.py) the same ones per unrolled rule: 3,096 made, 132
# different, 11.8 of kron.opt's 24.7 s under the profiler. Made once here, by their arguments: a Min or
# Max is a pure function of them (and of SymPy's global `evaluate`).
#
# Two arguments are ordered only where that is cheap: their difference a number (`max(x, x + 1)` is
# x + 1; numbers fold), or one of them a number and the sign of the difference known to the assumptions
# (`max(v, 0)` of a v known nonnegative is v). SymPy compares every pair, taking factor_terms of the
# difference when the assumptions do not decide: 2 ms a pair of 2-node arguments, 9 ms of larger ones,
# so 126 statements each a max of the one before took 5 s and twelve such rules a minute. A pair left
# unordered is kept as written, a Max of both, which computes the same number; no spec in specs/
# compiles to other code for it.


@functools.lru_cache(maxsize=1 << 16)
def tree_size(e: sp.Basic) -> int:
    """Nodes of e's tree, a subtree read twice counted twice (as factor_terms walks it), capped."""
    return min(1 + builtins.sum(map(tree_size, e.args)), 1 << 20)  # (`sum` here is the spec's)


def _order(x: sp.Expr, y: sp.Expr) -> int | None:
    """1 where x >= y is known, -1 where x <= y, 0 where both, None where unknown or not asked."""
    d = x - y
    if not (d.is_number or x.is_number or y.is_number):
        return None
    ge, le = d.is_extended_nonnegative, d.is_extended_nonpositive
    return 0 if ge and le else 1 if ge else -1 if le else None


@functools.lru_cache(maxsize=4096)  # the Min/Max of a few specs' rules
def _made(func, args: tuple, evaluate: bool) -> sp.Expr:
    if not evaluate:
        return func(*args)
    try:
        kept = frozenset(func._new_args_filter(args))
    except ShortCircuit:
        return func.zero
    kept = func._collapse_arguments(kept)
    zeros: list[sp.Expr] = []  # SymPy's _find_localzeros, each pair ordered by _order
    wins = 1 if func is sp.Max else -1  # the order in which a new argument replaces a kept one
    for v in kept:
        new = True
        for z in list(zeros):
            order = 0 if v == z else _order(v, z)
            if order is None:
                continue
            new = False
            if order == wins:
                zeros.remove(z)
                zeros.append(v)
        if new:
            zeros.append(v)
    return func(*zeros, evaluate=False)


def minmax(func, *args) -> sp.Expr:
    """func(*args) for func sp.Min or sp.Max, evaluated as SymPy evaluates it but for the pairs it
    does not compare (above), made once per arguments."""
    args = tuple(map(sp.sympify, args))
    try:
        return _made(func, args, global_parameters.evaluate)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return func(*args)  # an argument that is not hashable: SymPy's to refuse or take


def rebuild(e: sp.Expr, args) -> sp.Expr:
    """e.func(*args), a Min or Max made through minmax: for passes that rebuild an expression."""
    if type(e) in (sp.Min, sp.Max):
        return minmax(type(e), *args)
    return e.func(*args)


def xreplace(e: sp.Expr, rule: dict) -> sp.Expr:
    """e.xreplace(rule), each Min and Max rebuilt through minmax, each shared subexpression once."""
    memo: dict[sp.Expr, tuple[sp.Expr, bool]] = {}

    def walk(x):  # (value, whether a replacement was made below): Basic._xreplace's rule
        if x in rule:
            return rule[x], True
        if x in memo:
            return memo[x]
        args, changed = [], False
        for a in x.args:
            if isinstance(a, sp.Basic):
                a, below = walk(a)
                changed |= below
            args.append(a)
        memo[x] = (rebuild(x, tuple(args)), True) if changed else (x, False)
        return memo[x]
    return walk(e)[0] if rule else e


def _minmax(func):
    """SymPy's Min/Max, left unevaluated where SymPy cannot order constant arguments."""
    def build(*args):
        try:
            return minmax(func, *args)
        except (TypeError, ValueError):
            return func(*args, evaluate=False)
    return build


_min, _max = _minmax(sp.Min), _minmax(sp.Max)


@dataclass(frozen=True)
class Function:
    name: str
    arity: int
    sympy: Callable[..., sp.Expr]
    tensor: str           # PyTorch on tensors, {0}, {1}, ... are the arguments
    host: str             # Python on floats (hoisted scalars)
    foreach: str | None = None  # torch._foreach_<name>: element-wise unary, or a reduction's results per tensor
    reduction: bool = False
    triton: str = ""      # Triton on registers (float32 or float64), {0}, {1}, ... the arguments
    axis: str = ""        # an axis reduction: the axes it reduces (a shape tag of optdsl.ir)
    matrix: bool = False  # matrix work: its result is not shaped like its arguments
    cheap: bool = False   # matrix work costing no more than element-wise work (a view, a mask)
    # matrix work that runs on a DTensor's parts, each rank its rows (DTensor's own rule for the op, or the
    # helper's: rsolve_triu of a row-split operand row by row, norm_lb of the whole): a rule of such work
    # whose matrix-shaped states a parameter's placement leaves whole steps on the shards, not on an owner
    on_parts: bool = False
    scalars: int = 0      # matrix work: how many of its last arguments are host scalars (inv_root's k)
    random: bool = False  # a draw shaped like p from the optimizer's generator: {0} p, {1} the draw's number
    # a reduction of a scalar x: x broadcast to its operand's shape (an Extent), reduced, as SymPy over x
    # and the shape built-ins
    broadcast: Callable[[sp.Expr, "Extent"], sp.Expr] | None = None


# The parameter's shape built-ins (optdsl/ir.py SHAPE_BUILTINS), as the symbols optdsl/sym.py reads them by
_NDIM, _NUMEL, _NROWS, _NCOLS, _NUNITS = (sp.Symbol(n) for n in ("ndim", "numel", "nrows", "ncols", "nunits"))


@dataclass(frozen=True)
class Extent:
    """The sizes of the value a reduction reads, over the shape built-ins: its number of elements, its
    extent along the last two axes (1 where reduced), and its elements per output unit (unit_norm's)."""
    numel: sp.Expr
    nrows: sp.Expr
    ncols: sp.Expr
    per_unit: sp.Expr


def _at_least(rank: int, a, b) -> sp.Expr:
    """a for parameters of rank `rank` or more, else b."""
    return where(ge(_NDIM, rank), a, b)


# Products of p's axes that no quotient of the built-ins gives where an axis is 0 (optdsl/ir.py
# HIDDEN_SIZES): the matrices of p, math.prod(p.shape[:-2]), and those of one unit, math.prod(p.shape[1:-2])
# (1 where p has fewer axes). numel / ncols of a (2, 3, 0) parameter is 0/0 where its rows are 6.
_NBATCH, _NINNER = sp.Symbol("_nbatch"), sp.Symbol("_ninner")
# A value shaped like p, or a scalar (which broadcasts to p's shape): p's sizes; per unit, the elements
# of p.shape[1:] from rank 2 on (ncols of a matrix), all of them below.
P_EXTENT = Extent(_NUMEL, _NROWS, _NCOLS, _at_least(3, _NINNER * _NROWS * _NCOLS, _at_least(2, _NCOLS, _NUMEL)))
# A value of a reduced shape (optdsl/ir.py operand_code): `r - r - 2` with r a rows state is -2 in each
# row, which SymPy simplifies to the number -2; the reduction of it counts the rows, not p's elements.
# Products of sizes, no quotients: exact for every rank, also where an axis of p is 0.
OPERAND_SHAPES: dict[int, Extent] = {
    1: Extent(_NBATCH * _NROWS, _NROWS, sp.Integer(1), _at_least(3, _NINNER * _NROWS, 1)),            # rows
    2: Extent(_NBATCH * _NCOLS, sp.Integer(1), _NCOLS, _NINNER * _NCOLS),                            # cols
    3: Extent(_NBATCH, sp.Integer(1), sp.Integer(1), _NINNER),                                       # rows and cols
    4: Extent(_at_least(2, _NUNITS, 1), where(eq(_NDIM, 2), _NROWS, 1), sp.Integer(1), sp.Integer(1)),  # units
    5: Extent(_at_least(3, _NUNITS, 1), sp.Integer(1), sp.Integer(1), sp.Integer(1)),            # units, cols
}

F = Function
TABLE: dict[str, Function] = {f.name: f for f in [
    # ---- element-wise ----
    F("sqrt", 1, sp.sqrt, "torch.sqrt({0})", "math.sqrt({0})", "sqrt",
      triton="tl.sqrt({0})"),
    F("rsqrt", 1, lambda x: 1 / sp.sqrt(x), "torch.rsqrt({0})", "1 / math.sqrt({0})", "rsqrt",
      triton="tl.rsqrt({0})"),
    F("abs", 1, sp.Abs, "torch.abs({0})", "abs({0})", "abs",
      triton="tl.abs({0})"),
    F("sign", 1, sp.sign, "torch.sign({0})", "_sign({0})", "sign",
      triton="tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))"),
    F("exp", 1, sp.exp, "torch.exp({0})", "math.exp({0})", "exp",
      triton="tl.exp({0})"),
    F("log", 1, sp.log, "torch.log({0})", "math.log({0})", "log",
      triton="tl.log({0})"),
    F("log1p", 1, log1p, "torch.log1p({0})", "math.log1p({0})", "log1p",
      triton="tl.log(1.0 + {0})"),
    F("tanh", 1, sp.tanh, "torch.tanh({0})", "math.tanh({0})", "tanh",
      triton="(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)"),
    F("sigmoid", 1, sigmoid, "torch.sigmoid({0})", "_sigmoid({0})", "sigmoid",
      triton="tl.sigmoid({0})"),
    F("softplus", 1, softplus, "torch.nn.functional.softplus({0})", "_softplus({0})",
      triton="tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp({0})))"),
    F("cos", 1, sp.cos, "torch.cos({0})", "math.cos({0})", "cos",
      triton="tl.cos({0})"),
    F("sin", 1, sp.sin, "torch.sin({0})", "math.sin({0})", "sin",
      triton="tl.sin({0})"),
    F("square", 1, lambda x: x**2, "torch.square({0})", "({0}) ** 2",
      triton="({0} * {0})"),
    # _atan2: the fused template's helper, from + - * / (libdevice's has no form in the interpreter)
    F("atan2", 2, sp.atan2, "torch.atan2({0}, {1})", "math.atan2({0}, {1})",
      triton="_atan2({0}, {1})"),
    F("lerp", 3, lerp, "torch.lerp({0}, {1}, {2})", "(({0}) + ({2}) * (({1}) - ({0})))",
      # torch.lerp's two forms, a + w*(b - a) below w = 0.5 and b - (1 - w)*(b - a) from there: each
      # exact at its end, so a weight of 1 gives b. The choice is made on the weight (a scalar, mostly).
      triton="(tl.where({2} < 0.5, {0}, {1}) + tl.where({2} < 0.5, {2}, {2} - 1.0) * ({1} - {0}))"),
    F("min", 2, _min, "torch.minimum({0}, {1})", "min({0}, {1})",
      triton="tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    F("max", 2, _max, "torch.maximum({0}, {1})", "max({0}, {1})",
      triton="tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    F("clamp", 3, lambda x, lo, hi: _min(_max(x, lo), hi), "torch.clamp({0}, {1}, {2})",
      "min(max({0}, {1}), {2})"),
    # rounding to bfloat16 (torch.optim.Muon's Newton-Schulz runs in it); the value stays in its dtype.
    # _round_bfloat16: the sharding template's, which sums a DTensor's partial sums before rounding.
    # In kernels by the template's _round_to, through float32 as torch's double -> bfloat16 goes (Triton's
    # interpreter truncates float32 and turns float64 into garbage, 0 for -0.3)
    F("bfloat16", 1, bfloat16, "_round_bfloat16({0})", "_bfloat16({0})",
      triton="_round_to({0}, tl.bfloat16).to({0}.dtype)"),
    F("where", 3, where, "torch.where({0} != 0, {1}, {2})", "({1} if {0} else {2})",
      triton="tl.where({0} != 0, {1}, {2})"),
    # ---- reductions: one scalar per parameter ----
    # _mean, _rms (the sharding template's): of a DTensor split along a reduced axis, a partial sum
    # (count-normalised with the whole tensor's count) left for one all-reduce, not DTensor's all-gather
    F("norm", 1, norm, "torch.linalg.vector_norm({0})", "abs({0})", "norm", reduction=True,
      broadcast=lambda x, n: sp.Abs(x) * sp.sqrt(n.numel)),
    F("sum", 1, sum, "torch.sum({0})", "{0}", reduction=True, broadcast=lambda x, n: x * n.numel),
    F("mean", 1, mean, "_mean({0})", "{0}", reduction=True, broadcast=lambda x, n: x),
    F("rms", 1, rms, "_rms({0})", "abs({0})", reduction=True, broadcast=lambda x, n: sp.Abs(x)),
    F("amax", 1, amax, "_amax({0}, None)", "{0}", reduction=True,  # _amax: the sharding template's
      broadcast=lambda x, n: x),
    # ---- axis reductions: kept with size 1, so they broadcast back against p ----
    F("row_mean", 1, row_mean, "_mean({0}, -1, True)", "{0}", axis="-1", broadcast=lambda x, n: x),
    F("col_mean", 1, col_mean, "_mean({0}, -2, True)", "{0}", axis="-2", broadcast=lambda x, n: x),
    F("row_sum", 1, row_sum, "_sum({0}, -1)", "{0}", axis="-1",
      broadcast=lambda x, n: x * n.ncols),
    F("col_sum", 1, col_sum, "_sum({0}, -2)", "{0}", axis="-2",
      broadcast=lambda x, n: x * n.nrows),
    F("row_max", 1, row_max, "_amax({0}, -1)", "{0}", axis="-1", broadcast=lambda x, n: x),
    F("col_max", 1, col_max, "_amax({0}, -2)", "{0}", axis="-2", broadcast=lambda x, n: x),
    # over every axis but the first: one value per output unit (the whole tensor when rank <= 1, so
    # that a scalar's unit norm counts the elements of p.shape[1:] from rank 2 on, numel below)
    F("unit_mean", 1, unit_mean, "_mean({0}, tuple(range(1, {0}.dim())) or None, True)", "{0}",
      axis="unit", broadcast=lambda x, n: x),
    F("unit_norm", 1, unit_norm,
      "_norm({0}, tuple(range(1, {0}.dim())) or None)", "abs({0})",
      axis="unit",
      broadcast=lambda x, n: sp.Abs(x) * sp.sqrt(n.per_unit)),
    # ---- matrix work on the last two axes ----
    F("mm", 2, mm, "torch.matmul({0}, {1})", "({0}) * ({1})", matrix=True, on_parts=True),
    F("T", 1, T, "{0}.mT", "{0}", matrix=True, cheap=True, on_parts=True),
    # ---- linear algebra of the last two axes (torch.linalg, in float32 at least; helpers in
    # optdsl/backends/torch.py LINALG_HELPERS hold the references' numerical guards) ----
    F("inv_root", 2, inv_root, "_inv_root({0}, {1})", "({0}) ** (-1 / ({1}))", matrix=True,
      scalars=1),
    F("eigvecs", 1, eigvecs, "_eigvecs({0})", "1.0", matrix=True),
    F("qr", 1, qr, "_qr({0})", "_sign({0})", matrix=True),
    F("sortperm", 1, sortperm, "_sortperm({0})", "1.0", matrix=True),
    # the truncated SVD of A (n x m), its singular values largest first: U[:, :k] and Vh[:k, :]
    # (GaLore's projections), k no more than min(n, m)
    F("svd_u", 2, svd_u, "_svd_u({0}, {1})", "_sign({0})", matrix=True, scalars=1),
    F("svd_vh", 2, svd_vh, "_svd_vh({0}, {1})", "_sign({0})", matrix=True, scalars=1),
    F("triu", 1, triu, "torch.triu({0})", "{0}", matrix=True, cheap=True, on_parts=True),
    F("rsolve_triu", 2, rsolve_triu, "_rsolve_triu({0}, {1})", "({0}) / ({1})", matrix=True, on_parts=True),
    F("norm_lb", 1, norm_lb, "_norm_lb({0})", "abs({0})", matrix=True, on_parts=True),
    # ---- the same work along one axis k of a tensor of any rank (k a number: 0 the first axis), with
    # the per-axis states `gram(k)` (d_k x d_k) and `axis(k)` (PSGD-Kron's factors of a rank-3 tensor) ----
    F("mm_axis", 3, mm_axis, "_mm_axis({0}, {1}, {2})", "({0}) * ({1})", matrix=True, scalars=1),
    F("rsolve_triu_axis", 3, rsolve_triu_axis, "_rsolve_triu_axis({0}, {1}, {2})", "({0}) / ({1})", matrix=True,
      scalars=1),
    F("gram_axis", 2, gram_axis, "_gram_axis({0}, {1})", "({0}) ** 2", matrix=True, scalars=1),
    F("axis_sum", 2, axis_sum, "_axis_sum({0}, {1})", "{0}", matrix=True, scalars=1),
    # ... of a factor of either kind (a state list's loop writes them for T, triu, mm, norm_lb and gram_axis
    # of its factors, optdsl/axes.py): mm_axis and rsolve_triu_axis take either kind as they are
    F("factor_T", 1, factor_T, "_factor_T({0})", "{0}", matrix=True, cheap=True),
    F("factor_triu", 1, factor_triu, "_factor_triu({0})", "{0}", matrix=True, cheap=True),
    F("factor_mm", 2, factor_mm, "_factor_mm({0}, {1})", "({0}) * ({1})", matrix=True),
    F("factor_norm_lb", 1, factor_norm_lb, "_factor_norm_lb({0})", "abs({0})", matrix=True),
    F("factor_gram", 3, factor_gram, "_factor_gram({0}, {1}, {2})", "({0}) ** 2", matrix=True, scalars=1),
    # ---- random draws shaped like p, from the optimizer's own generator (saved in state_dict()) ----
    # `randn()` takes no argument in the spec; lowering makes it randn(p, k). Per tensor, a generator
    # keyed by (the step's seed, the tensor's index, k): the for-loop and multi-tensor paths draw the
    # same numbers. Fused, a counter-based hash of (seed, tensor, element, k): a stream of its own.
    F("randn", 0, randn, "_random_like({0}, seed, {2}, {1}, normal=True)", "", random=True,
      triton="_randn(seed, i, offsets, {1}, C_TYPE)"),
    F("rand", 0, rand, "_random_like({0}, seed, {2}, {1}, normal=False)", "", random=True,
      triton="_rand(seed, i, offsets, {1}, C_TYPE)"),
    # ---- `a % b` (and periodic work): Python's modulo, the sign of b, as torch.remainder ----
    F("mod", 2, sp.Mod, "torch.remainder({0}, {1})", "(({0}) % ({1}))",
      # as torch.remainder and Python's %: the exact fmod (a float % in Triton), moved into the
      # divisor's sign. x - k*floor(x/k) rounds: 1e-16 off for x ~ 1, k = 1e-12, a 1e-4 relative error
      # in the remainder (fuzz seed 3972), and nan for k = inf
      triton="tl.where(((({0}) % ({1}) < 0) != (({1}) < 0)) & (({0}) % ({1}) != 0), "
             "({0}) % ({1}) + ({1}), ({0}) % ({1}))"),
]}

# Comparisons are operators in the spec, functions here: `a < b` means lt(a, b).
COMPARISONS: dict[str, Function] = {op: F(name, 2, cls, f"({{0}} {op} {{1}})", f"float({{0}} {op} {{1}})",
                                          triton=f"tl.where({{0}} {op} {{1}}, 1.0, 0.0)")
                                    for op, name, cls in [("<", "lt", lt), ("<=", "le", le), (">", "gt", gt),
                                                          (">=", "ge", ge), ("==", "eq", eq), ("!=", "ne", ne)]}
# `and`/`or` join a rule's conditions (the grammar allows them there only): 1.0 or 0.0 like a comparison.
COMPARISONS |= {op: F(name, 2, cls, f"torch.logical_{op}({{0}} != 0, {{1}} != 0)",
                      f"float(bool({{0}}) {op} bool({{1}}))", triton=f"tl.where(({{0}} != 0) {sym} ({{1}} != 0), 1.0, 0.0)")
                for op, name, cls, sym in [("and", "land", land, "&"), ("or", "lor", lor, "|")]}
OPAQUE_CLASSES = (lerp, where, sigmoid, softplus, bfloat16, lt, le, gt, ge, eq, ne, land, lor, row_mean, col_mean, row_sum, col_sum,
                  row_max, col_max, unit_mean, unit_norm, mm, T, inv_root, eigvecs, qr, sortperm, svd_u, svd_vh,
                  triu, rsolve_triu, norm_lb, mm_axis, rsolve_triu_axis, gram_axis, axis_sum,
                  factor_T, factor_triu, factor_mm, factor_norm_lb, factor_gram,
                  randn, rand)
# the functions along an axis: their last argument is the axis, a whole number (0 the first axis)
AXIS_FUNCTIONS = ("mm_axis", "rsolve_triu_axis", "gram_axis", "axis_sum", "factor_gram")
# Sums over the axes but one (run in torch's code, not the kernels' axis reductions): of a DTensor split
# along a summed axis each rank's part, which the torch paths make whole as a row or column sum's
# (Instr.whole: one all-reduce per stage); gram_axis's rules keep gram(K) states, stepped on owners
SUMS_ALONG_AXIS = ("axis_sum",)
RANDOM = tuple(f.sympy for f in TABLE.values() if f.random)
REDUCTIONS = {f.sympy: f for f in TABLE.values() if f.reduction}
BROADCAST = {f.sympy: f.broadcast for f in TABLE.values() if f.broadcast is not None}


def reads_tensor(tensors: set[sp.Symbol]) -> Callable[[sp.Expr], bool]:
    """Whether a value reads one of `tensors` other than through a whole-tensor reduction (which
    gives a scalar): `norm(p)` does not, `unit_norm(p)` and `p - norm(p)` do."""
    def reads(e: sp.Expr) -> bool:
        if type(e) in REDUCTIONS:
            return False
        return e in tensors or any(reads(a) for a in e.args)
    return reads


def extent(e: sp.Expr) -> Extent:
    """The sizes of the value the reduction e reads: p's, or those of its operand's shape (second argument:
    a code of OPERAND_SHAPES, or matrix work's two sizes, one such matrix per matrix of p)."""
    if len(e.args) < 2:
        return P_EXTENT
    if isinstance(e.args[1], sp.Tuple):
        a, b = e.args[1].args
        return Extent(_NBATCH * a * b, a, b, _at_least(3, _NINNER * a * b, b))
    return OPERAND_SHAPES[int(e.args[1])]


def broadcast(e: sp.Expr) -> sp.Expr:
    """The reduction e of a scalar: that scalar broadcast to the shape of e's operand, reduced."""
    return BROADCAST[type(e)](e.args[0], extent(e))


def untagged(e: sp.Expr) -> sp.Expr:
    """e without the shape of its operand (a reduction of a tensor is printed from the tensor)."""
    return e.func(e.args[0]) if type(e) in BROADCAST and len(e.args) > 1 else e


def broadcast_scalars(expr: sp.Expr, is_scalar: Callable[[sp.Expr], bool]) -> sp.Expr:
    """`expr` with every reduction (whole, axis or unit) of a scalar operand written as what it is: the
    reduction of that scalar broadcast to its operand's shape, p's unless the language's is a reduced
    one (`sum(c)` is `c * numel`), in the shape built-ins; the other reductions without that shape.
    `is_scalar` tells a scalar operand (it reads no tensor but through a reduction) from a tensor.
    Bottom up: `sum(norm(c))` is `numel * sqrt(numel) * |c|`."""
    return expr.replace(lambda e: type(e) in BROADCAST,
                        lambda e: broadcast(e) if is_scalar(e.args[0]) else untagged(e))


class loop(_Opaque):  # a kept loop's carried value where a round starts (optdsl/ir.py's LOOP): no table row,
    nargs = 4         # a spec writes `repeat COUNT { }`; (loop number, carried number, count, value on entry)


class loop_end(_Opaque):  # the carried value after the loop (optdsl/ir.py's LOOP_END): (start, round's end)
    nargs = 2


LOOP_CLASSES = (loop, loop_end)
# work the kernels leave to torch (a kept loop's body holds matrix work: optdsl/lower.py keeps no other)
MATRIX_CLASSES = tuple(f.sympy for f in TABLE.values() if f.matrix) + LOOP_CLASSES


def meaning(expr: sp.Expr) -> sp.Expr:
    """Rewrite the opaque functions (lerp, sigmoid, ...) into plain SymPy arithmetic."""
    return expr.replace(lambda e: hasattr(e, "rewrite_meaning"), lambda e: e.rewrite_meaning())


# Functions other languages have and optdsl has not: what to write instead (the hint of an
# unknown function; a new function is a row of TABLE).
INSTEAD = {
    **dict.fromkeys(["tan", "acos", "asin", "atan", "cosh", "sinh"],
                    "optdsl's trigonometric functions are sin, cos, atan2(y, x) and tanh; write tan(x) as "
                    "sin(x) / cos(x), atan(x) as atan2(x, 1); a new function is a row of optdsl/functions.py"),
    "pow": "write x^y", "power": "write x^y", "cbrt": "write x^(1/3)",
    "ln": "write log(x)", "log2": "write log(x) / log(2)", "log10": "write log(x) / log(10)", "exp2": "write 2^x",
    "expm1": "write exp(x) - 1", "hypot": "write sqrt(x^2 + y^2)",
    "maximum": "write max(a, b)", "minimum": "write min(a, b)", "clip": "write clamp(x, lo, hi)",
    "relu": "write max(x, 0)", "sgn": "write sign(x)", "signum": "write sign(x)", "fabs": "write abs(x)",
    "fmod": "write x % k", "remainder": "write x % k", "avg": "write mean(x)", "max_abs": "write amax(abs(x))",
    "if": "write where(c, a, b)", "select": "write where(c, a, b)", "ifelse": "write where(c, a, b)",
    "matmul": "write mm(a, b)", "transpose": "write T(x)",
}
