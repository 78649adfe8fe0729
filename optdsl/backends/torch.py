"""The PyTorch backend: a torch.optim.Optimizer subclass per spec, rendered from a Jinja template."""
from __future__ import annotations

import functools
import keyword
import re
from dataclasses import dataclass

import jinja2
import sympy as sp

from .. import escape, ieee, ir, quant, ranks
from .. import functions as fn
from .. import shapes as shape_check
from ..functions import COMPARISONS, RANDOM, REDUCTIONS, TABLE
from ..lower import RESERVED, STATE_DERIVED
from ..mathtext import statement_math
from ..unread import unread_when
from ..sym import DEVICE, GROUP, PARAM, TENSOR, Plan, meanings
from . import fusion, group_phase, mode_code, schedule, step_shapes
from . import triton as triton_backend
from .printers import CompiledPrinter, HostPrinter, read_state_code, state_shape_code
from .instrs import Instr
from .schedule import sink
from .tensor_ops import Emitter

# Names the generated functions use for their own variables (the same list refuses them in specs).
INTERNAL_NAMES = RESERVED | set(ir.BUILTINS)


# Python twins of torch functions for host scalars, emitted only where a spec uses them.
HOST_HELPERS = {
    "_sign": "def _sign(x):\n    return 0.0 if x == 0 else math.copysign(1.0, x)",
    "_sigmoid": "def _sigmoid(x):\n    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))",
    "_softplus": "def _softplus(x):\n    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)",
    "_bfloat16": "def _bfloat16(x):\n    return float(torch.tensor(x, dtype=torch.float64).bfloat16())",
    "_eye_like": (
        "def _eye_like(a):\n"
        "    # the identity of the matrix state a, placed as a is: a DTensor state (a sharded parameter's)\n"
        "    # takes its part of the identity, without communication; a diagonal factor's (a state list's,\n"
        "    # 1-D: optdsl/axes.py) is ones\n"
        "    if a.dim() == 1:\n"
        "        return torch.ones_like(a)\n"
        "    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)\n"
        "    if _is_sharded(a):\n"
        "        return torch.distributed.tensor.distribute_tensor(eye, a.device_mesh, a.placements, src_data_rank=None)\n"
        "    return eye"),
} | ieee.HELPERS

# Linear algebra of the function table's rows (optdsl/functions.py), on the tensors of the torch
# paths and of the fused path's matrix section: in float32 at least (torch.linalg has no bfloat16),
# with the guards of the reference implementations; emitted only where a spec calls them.
LINALG_HELPERS = {
    "_eigh": (
        "def _eigh(a):\n"
        "    # symmetric eigendecomposition in float32 at least; in float64 where float32's iteration\n"
        "    # fails to converge (as SOAP's reference retries)\n"
        "    x = a.to(torch.promote_types(a.dtype, torch.float32))\n"
        "    try:\n"
        "        return torch.linalg.eigh(x)\n"
        "    except RuntimeError:\n"
        "        if not bool(torch.isfinite(x).all()):  # nan or inf in, nan out, as element-wise work gives\n"
        "            nan = torch.full_like(x, math.nan)\n"
        "            return nan[..., 0], nan\n"
        "        values, vectors = torch.linalg.eigh(x.to(torch.float64))\n"
        "        return values.to(x.dtype), vectors.to(x.dtype)"),
    "_inv_root": (
        "def _inv_root(a, k):\n"
        "    # a^(-1/k) of a symmetric positive semi-definite a, as Shampoo's references take it: the\n"
        "    # eigenvalues' magnitudes (an SVD's singular values) to the power -1/k, kept off zero by\n"
        "    # the dtype's smallest normal number (the spec adds its epsilon to the diagonal)\n"
        "    if k == 0:  # a hyperparameter whose range takes 0 (a number 0 is a spec error)\n"
        "        raise ValueError(\"inv_root(a, k) cannot run: k is 0 (a^(-1/k)); declare k's range without 0\")\n"
        "    values, vectors = _eigh(a)\n"
        "    scale = values.abs().clamp_min(torch.finfo(values.dtype).tiny).pow(-1 / k)\n"
        "    return torch.matmul(vectors * scale.unsqueeze(-2), vectors.mT).to(a.dtype)"),
    "_eigvecs": (
        "def _eigvecs(a):\n"
        "    # the eigenvectors of the symmetric a as columns, the largest eigenvalue's first, of a + 1e-30 I\n"
        "    # (SOAP's reference: the guard moves nothing but an exactly zero diagonal)\n"
        "    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)\n"
        "    return _eigh(a + 1e-30 * eye)[1].flip(-1).to(a.dtype)"),
    "_sortperm": (
        "def _sortperm(a):\n"
        "    # the permutation matrix P that sorts the diagonal of a, largest first: column i of P is\n"
        "    # e_order[i], so mm(x, P) takes x's columns in that order and mm(T(P), x) its rows\n"
        "    order = torch.argsort(torch.diagonal(a, dim1=-2, dim2=-1), dim=-1, descending=True)\n"
        "    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)\n"
        "    return eye.gather(-1, order.unsqueeze(-2).expand_as(a))"),
    "_qr": (
        "def _qr(a):\n"
        "    # Q of the reduced QR decomposition of a, in float32 at least\n"
        "    return torch.linalg.qr(a.to(torch.promote_types(a.dtype, torch.float32)))[0].to(a.dtype)"),
    "_svd": (
        "def _svd(a):\n"
        "    # the reduced SVD of a in float32 whatever its dtype, as GaLore's reference takes it\n"
        "    return torch.linalg.svd(a.to(torch.float32), full_matrices=False)"),
    "_svd_u": (
        "def _svd_u(a, k):\n"
        "    # the first k left singular vectors of a, as columns\n"
        "    return _svd(a)[0][..., :int(k)].to(a.dtype)"),
    "_svd_vh": (
        "def _svd_vh(a, k):\n"
        "    # the first k right singular vectors of a, as rows\n"
        "    return _svd(a)[2][..., :int(k), :].to(a.dtype)"),
    "_rsolve_triu": (
        "def _rsolve_triu(b, a):\n"
        "    # b a^-1 for an upper-triangular a (PSGD-Kron's solve_triangular_right), in float32 at least\n"
        "    if _is_sharded(b) and _is_sharded(a) and not any(map(_splits, a.placements)) \\\n"
        "            and not any(pl.is_partial() for pl in (*a.placements, *b.placements)) \\\n"
        "            and all(pl.dim % b.dim() != b.dim() - 1 for pl in b.placements if _splits(pl)):\n"
        "        # b split along rows only, a whole on every rank: row by row, on each rank's rows (DTensor\n"
        "        # would gather b)\n"
        "        out = _rsolve_triu(b.to_local(), a.to_local())\n"
        "        return _DTensor.from_local(out, b.device_mesh, b.placements, run_check=False, shape=b.shape,\n"
        "                                   stride=b.stride())\n"
        "    x = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)\n"
        "    return torch.linalg.solve_triangular(a.to(x), b.to(x), upper=True, left=False).to(b.dtype)"),
    "_norm_lb": (
        "def _norm_lb(a):\n"
        "    # a lower bound of the spectral norm of each square matrix of a, as PSGD's norm_lower_bound\n"
        "    # (pytorch_optimizer's): from the row of largest norm of a / max|a|, one power-iteration\n"
        "    # step; kept with size 1 x 1, so that it broadcasts against a\n"
        "    if _is_sharded(a):  # a DTensor (a Gram matrix of row shards: partial sums): the whole's, on every rank\n"
        "        return _DTensor.from_local(_norm_lb(a.full_tensor()), a.device_mesh, [_Replicate()] * a.device_mesh.ndim,\n"
        "                                   run_check=False)\n"
        "    if a.shape[-1] == 0:  # 0 x 0 (the factor of an empty parameter's zero axis): its norm is 0\n"
        "        return a.new_zeros(*a.shape[:-2], 1, 1)\n"
        "    max_abs = a.abs().amax(dim=(-2, -1), keepdim=True)\n"
        "    a = a / torch.where(max_abs > 0, max_abs, 1.0)\n"
        "    tiny = torch.finfo(a.dtype).tiny\n"
        "    aa = a * a\n"
        "    value0, i = torch.max(aa.sum(dim=-2), dim=-1, keepdim=True)\n"
        "    value1, j = torch.max(aa.sum(dim=-1), dim=-1, keepdim=True)\n"
        "    col = a.gather(-1, i.unsqueeze(-2).expand(*a.shape[:-1], 1)).mT  # a's column i, as a row\n"
        "    x0 = torch.matmul(col, a)\n"
        "    bound0 = torch.linalg.vector_norm(torch.matmul(x0 / torch.linalg.vector_norm(x0, dim=-1, keepdim=True)\n"
        "                                                   .clamp_min(tiny), a.mT), dim=-1, keepdim=True)\n"
        "    row = a.gather(-2, j.unsqueeze(-1).expand(*a.shape[:-2], 1, a.shape[-1]))  # a's row j\n"
        "    x1 = torch.matmul(row, a.mT)  # (a @ row)^T\n"
        "    bound1 = torch.linalg.vector_norm(torch.matmul(x1 / torch.linalg.vector_norm(x1, dim=-1, keepdim=True)\n"
        "                                                   .clamp_min(tiny), a), dim=-1, keepdim=True)\n"
        "    return max_abs * torch.where((value0 > value1).unsqueeze(-1), bound0, bound1)"),
    # work along axis k of a tensor of any rank (PSGD-Kron's per-axis factors: its reference's einsums)
    "_mm_axis": (
        "def _mm_axis(q, x, k):\n"
        "    # q (d_k x d_k) applied along axis k of x: out[.., i, ..] = sum_j q[i, j] x[.., j, ..]; a\n"
        "    # diagonal factor q (d_k,), a state list's (optdsl/axes.py), multiplies each index of axis k\n"
        "    if q.dim() == 1:\n"
        "        return _along(q, x, k) * x\n"
        "    return torch.movedim(torch.tensordot(q, x, dims=([1], [int(k)])), 0, int(k))"),
    "_along": (
        "def _along(q, x, k):\n"
        "    # a diagonal factor q (d_k,) shaped to broadcast along axis k of x\n"
        "    return q.reshape((1,) * int(k) + q.shape + (1,) * (x.dim() - int(k) - 1))"),
    "_rsolve_triu_axis": (
        "def _rsolve_triu_axis(x, a, k):\n"
        "    # x with its axis k multiplied on the right by a^-1, a upper-triangular (d_k x d_k): as one\n"
        "    # matrix of rows (PSGD-Kron's solve_triangular_right); the row count a product, not -1, which\n"
        "    # an empty x leaves undecided; divided by a diagonal factor a (d_k,)\n"
        "    if a.dim() == 1:\n"
        "        return x / _along(a, x, k)\n"
        "    y = torch.movedim(x, int(k), -1)\n"
        "    rows = y.reshape(math.prod(y.shape[:-1]), y.shape[-1])\n"
        "    return torch.movedim(_rsolve_triu(rows, a).reshape(y.shape), -1, int(k))"),
    "_gram_axis": (
        "def _gram_axis(x, k):\n"
        "    # x's Gram matrix along axis k (d_k x d_k): the sum over the other axes of x[.., i, ..] x[.., j, ..]\n"
        "    xk = torch.movedim(x, int(k), 0)\n"
        "    xk = xk.reshape(xk.shape[0], math.prod(xk.shape[1:]))  # a product, not -1: x may be empty\n"
        "    return torch.matmul(xk, xk.mT)"),
    # a state list's factors (optdsl/axes.py): a d_k x d_k matrix, or its diagonal (d_k,) where the state
    # was made diagonal; each the matrix form's work on a diagonal matrix, kept as its diagonal
    "_factor_T": (
        "def _factor_T(q):\n"
        "    return q if q.dim() == 1 else q.mT"),
    "_factor_triu": (
        "def _factor_triu(q):\n"
        "    return q if q.dim() == 1 else torch.triu(q)"),
    "_factor_mm": (
        "def _factor_mm(a, b):\n"
        "    return a * b if a.dim() <= 1 or b.dim() <= 1 else torch.matmul(a, b)"),
    "_factor_norm_lb": (
        "def _factor_norm_lb(a):\n"
        "    # a diagonal matrix's spectral norm: its largest |entry| (kept with size 1; 0 for a 0 x 0 one)\n"
        "    if a.dim() == 1:\n"
        "        return a.abs().amax(dim=-1, keepdim=True) if a.numel() else a.new_zeros(1)\n"
        "    return _norm_lb(a)"),
    "_factor_gram": (
        "def _factor_gram(x, q, k):\n"
        "    # x's Gram matrix along axis k where the factor q is a matrix, its diagonal where q is diagonal\n"
        "    if q.dim() == 1:  # (a sum over no axes, of a vector, is torch's sum over all: not taken)\n"
        "        dims = tuple(j for j in range(x.dim()) if j != int(k))\n"
        "        return (x * x).sum(dim=dims) if dims else x * x\n"
        "    return _gram_axis(x, k)"),
    "_axis_sum": (
        "def _axis_sum(x, k):\n"
        "    # x summed over every axis but k, kept with size 1\n"
        "    dims = tuple(j for j in range(x.dim()) if j != int(k))\n"
        "    if _is_sharded(x):  # partial over a split axis, made whole as row/col sums are (_sum)\n"
        "        return _sum(x, dims) if dims else x\n"
        "    return x.sum(dim=dims, keepdim=True) if dims else x"),
}
LINALG_USES = {"_inv_root": ("_eigh",), "_eigvecs": ("_eigh",), "_svd_u": ("_svd",), "_svd_vh": ("_svd",),
               "_rsolve_triu_axis": ("_rsolve_triu", "_along"), "_mm_axis": ("_along",),
               "_factor_norm_lb": ("_norm_lb",), "_factor_gram": ("_gram_axis",)}  # a helper's own helpers


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("optdsl", "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["literals"] = _literals  # named choices as a Python tuple
    env.filters["literal"] = escape.literal  # a named choice, compared at runtime as written
    env.filters["message"] = escape.message  # text an error shows at runtime: a reason, a located statement
    env.filters["messages"] = lambda values: _literals(values, escape.message)  # ... as a tuple
    env.filters["shown"] = escape.shown  # ... as a message shows it
    env.filters["text"] = escape.text  # user text: the only way it enters generated code
    env.filters["f32"] = quant.float32_code  # a level of a low-bit map
    return env


def _literals(values, one=escape.literal) -> str:
    """Named choices (None or strings) as a Python tuple, each through escape.literal (or `one`)."""
    return "(" + ", ".join(map(one, values)) + ("," if len(values) == 1 else "") + ")"


# ---- one instruction, printed per tensor and multi-tensor ----
def _kwarg(instr: Instr, foreach: bool, single_value: str | None) -> str:
    if instr.value is None:
        return ""
    key = "alpha" if instr.op == "add" else "value"
    if foreach and instr.op in ("addcmul", "addcdiv"):
        return f", {instr.value.code}"
    return f", {key}={single_value if single_value is not None else instr.value.code}"


def _loop(instr: Instr, printer, block=None) -> list[str] | None:
    """A kept loop's instructions, per tensor and multi-tensor alike (the count is a hyperparameter):
    each printed by `printer`, or the round's block by `block` (the staged and multi-tensor bodies,
    whose reductions of a round share their all-reduces)."""
    if instr.op == "bind":
        return [f"{instr.out} = {', '.join(a.code for a in instr.args)}"]
    if instr.op == "loop":
        lines = _indent(instr.blocks[0], printer) if block is None else ["    " + x for x in block(instr.blocks[0])]
        return [f"for _ in range(int({instr.args[0].code})):"] + lines
    return None


def single(instr: Instr) -> list[str]:
    a = [x.code for x in instr.args]
    if instr.op in ("bind", "loop"):
        return _loop(instr, single)
    if instr.op == "branch":
        return _if_else(instr, single)
    if instr.skip_zero:
        return [f"{_single_line(instr)} if {instr.value.code} != 0 else {a[0]}"]
    return [_single_line(instr)]


def _if_else(instr: Instr, printer, block=None) -> list[str]:
    """A branch on one host condition: a Python if/else, each block's instructions printed by `printer`
    (or each block by `block`)."""
    cond, then_value, other_value = (x.code for x in instr.args)
    then, other = instr.blocks
    lines = block or (lambda b: [line for i in b for line in printer(i)])
    return ([f"if {cond}:"] + ["    " + x for x in lines(then)] + [f"    {instr.out} = {then_value}", "else:"]
            + ["    " + x for x in lines(other)] + [f"    {instr.out} = {other_value}"])


def _indent(block, printer) -> list[str]:
    return ["    " + line for i in block for line in printer(i)]


def staged_body(items) -> list[str]:
    """The per-tensor lines of a DTensor parameter's step (the generated _staged_ function), in
    optdsl/backends/schedule.py's staged order: each stage's partial results handed out by a `yield`
    to _in_stages, which makes those of all the group's tensors whole by one all-reduce and sends
    them back; the reductions computed where they run, as each rank's parts."""
    lines = []
    for item in items:
        if isinstance(item, tuple):
            names = ", ".join(item) + "," * (len(item) == 1)
            lines.append(f"{names} = yield {names}")
        elif item.whole:
            lines.append(_single_line(item, whole=""))
        elif item.op == "branch":
            lines += _if_else(item, single, staged_body)
        elif item.op == "loop":
            lines += _loop(item, single, staged_body)
        else:
            lines += single(item)
    return lines


def _single_line(instr: Instr, whole: str = "_whole") -> str:
    a = [x.code for x in instr.args]
    if instr.op == "copy":
        if instr.args[1].level in (GROUP, PARAM):  # a host float fills
            return f"{a[0]}.fill_({a[1]})"
        return f"_copy_into({a[0]}, {a[1]})"
    if instr.op in ("call", "reduce", "scalar"):
        if instr.op == "scalar":
            return f"{instr.out} = {instr.template.replace('{dtype}', 'p.dtype')}"
        body = instr.template.format(*a)
        return f"{instr.out} = {f'{whole}({body})' if instr.whole and whole else body}"  # a reduction made whole
    rest = ", ".join(a[1:]) + _kwarg(instr, False, None)
    if instr.inplace:
        return f"{a[0]}.{instr.op}_({rest})"
    return f"{instr.out} = torch.{instr.op}({a[0]}{', ' if rest else ''}{rest})"


def _linear_algebra(instrs) -> bool:
    """Whether these instructions (branches included) do matrix work that costs more than element-wise
    work (the function table's rows say: matrix and not cheap), a product or linear algebra."""
    return any((i.row is not None and i.row.matrix and not i.row.cheap)
               or (i.op in ("branch", "loop") and any(_linear_algebra(b) for b in i.blocks)) for i in instrs)


def _on_parts(instrs) -> bool:
    """Whether all the matrix work of these instructions (branches and loops too) runs on DTensor parts
    (the function table's on_parts column)."""
    return all((i.row is None or not i.row.matrix or i.row.on_parts)
               and all(_on_parts(b) for b in i.blocks) for i in instrs)


def multi(instr: Instr) -> list[str]:
    a = [x.code for x in instr.args]
    if instr.op in ("bind", "loop"):
        return _loop(instr, multi, multi_body)  # a round's reductions: one all-reduce per stage
    if instr.op == "branch":
        then, other = instr.blocks
        if instr.args[0].level == GROUP:
            return _if_else(instr, multi)
        pick = f"[x if c else y for c, x, y in zip({a[0]}, {a[1]}, {a[2]})]"
        if _linear_algebra(then + other):
            # an eigendecomposition, a QR or a matrix product per tensor costs more than the whole
            # element-wise step: a branch runs only for the tensors that take it when all take the
            # same (the usual case: every tensor stepped as often), both otherwise
            c = a[0]
            return ([f"if any({c}) or not {c}:"] * bool(then) + _indent(then, multi)
                    + [f"if not all({c}):"] * bool(other) + _indent(other, multi)
                    + [f"{instr.out} = {a[1]} if all({c}) else {a[2]} if not any({c}) else {pick}"])
        return [line for i in then + other for line in multi(i)] + [f"{instr.out} = {pick}"]
    if instr.op == "add" and instr.value is not None and instr.value.level == PARAM:
        # torch._foreach_add takes one alpha: use it when every tensor has the same one
        # (the usual case), else add tensor by tensor with the same arithmetic.
        v, target = instr.value.code, (a[0] if instr.inplace else instr.out)
        per_tensor = (f"for x_, y_, v_ in zip({a[0]}, {a[1]}, {v}):\n    x_.add_(y_, alpha=v_)"
                      if instr.inplace else
                      f"{target} = [torch.add(x_, y_, alpha=v_) for x_, y_, v_ in zip({a[0]}, {a[1]}, {v})]")
        fast = _multi_line(instr).replace(f", alpha={v}", f", alpha={v}[0]")
        return ([f"if all(v_ == {v}[0] for v_ in {v}):", f"    {fast}", "else:"]
                + ["    " + line for line in per_tensor.split("\n")])
    if instr.skip_zero:
        return [f"{_multi_line(instr)} if {instr.value.code} != 0 else {a[0]}"]
    if instr.op == "copy" and instr.args[1].level in (GROUP, PARAM):  # host floats: fill each tensor
        values = f"[{a[1]}] * len({a[0]})" if instr.args[1].level == GROUP else a[1]
        return [f"for x_, v_ in zip({a[0]}, {values}):", "    x_.fill_(v_)"]
    return _multi_line(instr).split("\n")


def _listed(body: str, names: list[str]) -> str:
    """`body` (code of one tensor's names + '_') for each tensor of the lists `names`, as a list."""
    if len(names) == 1:
        return f"[{body} for {names[0]}_ in {names[0]}]"
    return f"[{body} for {', '.join(n + '_' for n in names)} in zip({', '.join(names)})]"


def _whole_parts(instr: Instr) -> str:
    """The code of a reduction's results (instr.whole) for every tensor of the list, as each rank's
    parts (a DTensor's reduction over a split axis is partial), which _whole_list or _whole_lists
    makes whole: torch's foreach form where the function table names one (norm), else per tensor."""
    if instr.row.foreach and instr.args[0].tensor:
        return f"torch._foreach_{instr.row.foreach}({instr.args[0].code})"
    lists = [x for x in instr.args if x.level in (PARAM, DEVICE, TENSOR)]
    names = {x.code: f"{x.code}_" for x in lists}
    return _listed(instr.template.format(*(names.get(x.code, x.code) for x in instr.args)),
                   list(dict.fromkeys(x.code for x in lists)))


def multi_body(instrs) -> list[str]:
    """The multi-tensor lines of `instrs`, in optdsl/backends/schedule.py's order: the reductions'
    parts computed where they run, made whole by one all-reduce (_whole_lists) per stage."""
    if not any(i.whole for i in instrs):
        return [line for i in instrs for line in multi(i)]
    lines = []
    for item in schedule.order(instrs):
        if isinstance(item, tuple):  # the partial results made whole, by one all-reduce
            lines.append(f"{', '.join(item)}{',' * (len(item) == 1)} = _whole_lists({', '.join(item)})")
        else:
            lines += [f"{item.out} = {_whole_parts(item)}"] if item.whole else multi(item)
    return lines


def _multi_line(instr: Instr) -> str:
    a = [x.code for x in instr.args]
    if instr.op == "copy":
        return f"_foreach_copy_({a[0]}, {a[1]})"  # the module's: DTensors have no rule for torch's
    if instr.whole:
        return f"{instr.out} = _whole_list({_whole_parts(instr)})"
    if instr.op in ("call", "reduce", "scalar"):
        lists = [x for x in instr.args if x.level in (PARAM, DEVICE, TENSOR)]
        names = {x.code: f"{x.code}_" for x in lists}
        if instr.op == "scalar":
            body = instr.template.replace("{dtype}", "p[0].dtype")
            for name, element in names.items():
                body = _rename_word(body, name, element)
        else:
            body = instr.template.format(*(names.get(x.code, x.code) for x in instr.args))
        unique = list(dict.fromkeys(x.code for x in lists))
        if not unique:
            return f"{instr.out} = [{body}] * len(p)"
        return f"{instr.out} = {_listed(body, unique)}"
    rest = ", ".join(a[1:]) + _kwarg(instr, True, None)
    sep = ", " if rest else ""
    if instr.inplace:
        return f"torch._foreach_{instr.op}_({a[0]}{sep}{rest})"
    if instr.value is not None and instr.value.level == PARAM and instr.op != "add":  # (add: see multi)
        # one value per tensor: DTensor has no sharding rule for these overloads (_foreach_addcdiv.ScalarList)
        names = [f"{x}_" for x in a] + ["v_"]
        per_tensor = (f"[torch.{instr.op}({', '.join(names[:-1])}{_kwarg(instr, False, 'v_')}) for {', '.join(names)} "
                      f"in zip({', '.join(a)}, {instr.value.code})]")
        return (f"{instr.out} = (torch._foreach_{instr.op}({a[0]}{sep}{rest}) if not _is_sharded({a[0]}[0])\n"
                f"    else {per_tensor})")
    return f"{instr.out} = torch._foreach_{instr.op}({a[0]}{sep}{rest})"


def _rename_word(text: str, name: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(name)}\b", new, text)


# ---- the module ----
# The module-level functions the template names after the functional (adam: _single_tensor_adam, ...).
_FUNC_DERIVED = ("_single_tensor_{}", "_staged_{}", "_multi_tensor_{}", "_fused_{}", "_matrix_{}", "_shapes_{}", "{}_0")


def _functional_name(prog: ir.Program) -> str:
    """torch.optim's name for the functional form (adam for Adam), with '_' added while it is taken:
    by the class itself (an all-lowercase name), by a name the module uses (torch, len, params, group),
    by one the functions it names would take, or by a name the spec declares (AMSGrad's hyperparameter
    amsgrad is a parameter of functions beside the functional: amsgrad_)."""
    declared = {h.name for h in prog.hypers} | {k.name for k in prog.keywords} | {
        pattern.format(s.name) for s in prog.states for pattern in ("{}", *STATE_DERIVED)}

    def taken(name: str) -> bool:
        return name == prog.name or name in RESERVED or name in ir.BUILTINS or name in declared
    func = prog.name.lower()
    while keyword.iskeyword(func) or taken(func) or any(taken(f.format(func)) for f in _FUNC_DERIVED):
        func += "_"
    return func


def states_saved_map(prog: ir.Program):
    return [(s.name, s.saved_as) for s in prog.states]


def _instructions(plan: Plan) -> list[Instr]:
    """A rule's step on the torch paths, as instructions: work a branch alone reads runs inside it."""
    names = {str(s) for s in plan.inputs} | {h.name for h in plan.program.hypers} | INTERNAL_NAMES
    names |= {str(d.symbol) for d in plan.group + plan.param + plan.steps}
    return sink(Emitter(plan, names).run())


def sharded_stages(plan: Plan) -> int:
    """How many stages of reductions a rule's for-loop step hands out on DTensor parameters (on its
    longest way through its branches): all-reduces per step for all its tensors, where each stage has
    a reduction over a split axis (schedule.staged); 0 for a rule whose parameters step on owners."""
    if any(ir.needs_whole(s.shape) for s in plan.program.states):
        return 0
    return schedule.stages(schedule.staged(_instructions(plan)))


def _rule_context(plan: Plan, func: str, suffix: str, group_code: dict[str, str]) -> dict:
    """What the template prints for one rule: its states, scalars and the two step bodies."""
    prog = plan.program
    instrs = _instructions(plan)
    host = HostPrinter()
    read = set().union(*(d.expr.free_symbols for d in plan.group + plan.param + plan.steps),
                       *(e.free_symbols for _, e in plan.outputs))
    shapes = [n for n in ir.SIZES if sp.Symbol(n) in read]
    t_elem = {"t": "t_", **{n: f"{n}_" for n in shapes}, **{str(d.symbol): f"{d.symbol}_" for d in plan.param}}
    param_multi = []
    for d in plan.param:
        deps = sorted({str(s) for s in d.expr.free_symbols if str(s) in t_elem}, key=str)
        body = HostPrinter(t_elem).doprint(d.expr)
        if not deps:  # reads t only through values that cancel ((x - t) + (t - x)): one per tensor still
            param_multi.append((str(d.symbol), f"[{body} for _ in p]"))
            continue
        it = deps[0] if len(deps) == 1 else f"zip({', '.join(deps)})"
        param_multi.append((str(d.symbol), f"[{body} for {', '.join(t_elem[x] for x in deps)} in {it}]"))
    compiled = CompiledPrinter({"t"} | {str(d.symbol) for d in plan.param})  # 0-dim tensors
    state_dtype = "_state_dtype(group, p)"
    codes = quant.codes(prog)  # each float state's low-bit code (int8/int4 states)
    single_body = [line for i in instrs for line in single(i)]
    staged = schedule.staged(instrs)  # a DTensor parameter's stages, combined over the group's tensors
    matrix_states = any(ir.needs_whole(s.shape) for s in prog.states)  # sharded: stepped whole on owners
    complex_why = _not_elementwise(prog)
    min_rank, rank_why, rank_span = ranks.need(prog)
    # a factor state's kind (optdsl/axes.py): its condition, on the group where it is made, in the step where read
    made_diag = {s.name: condition_code(s.diag, prog) for s in prog.states if s.diag is not None}
    read_diag = {s.name: condition_code(s.diag, prog, local=True) for s in prog.states if s.diag is not None}
    return dict(
        min_rank=min_rank, rank_why=rank_why, rank_span=rank_span,
        # states with elements where p has none (a (2, 0) parameter's two rows): the kernels never reach them
        empty_states=[s.name for s in prog.states if s.shape not in ("full", "scalar", "bool")],
        complex_ok=not complex_why, complex_why=complex_why,
        func=func, suffix=suffix, states=[s.name for s in prog.states], uses_loss=prog.uses_loss,
        # matrix-shaped states (Gram matrices, eigenbases): sharded, the rule steps whole on an owner rank
        matrix_states=matrix_states,
        # ... except a parameter whose placement leaves all of them whole (replicated: Kron's QR of a row-split
        # matrix), where every product is of row shards and whole matrices: the indexes of those states in the
        # rule's lists, for _on_owners to check; None where some matrix work needs whole operands
        parts_states=[k for k, s in enumerate(prog.states) if ir.needs_whole(s.shape)] if _on_parts(instrs) else None,
        bool_states=[s.name for s in prog.states if s.shape == "bool"],
        lowbit_signed={name: code.signed for name, code in codes.items()},
        read_single={s.name: read_state_code(s.shape, codes[s.name].signed, f"{s.name}_list[i]", "p", read_diag.get(s.name))
                     for s in prog.states if s.name in codes},
        read_multi={s.name: f"[{read_state_code(s.shape, codes[s.name].signed, 'x_', 'y_', read_diag.get(s.name))} for x_, y_ in "
                            f"zip(device_{s.name}, p)]" for s in prog.states if s.name in codes},
        states_saved=[(s.name, s.saved_as) for s in prog.states],
        # states the step does not read under some values (torch.optim leaves them out): by key, the Python
        # condition on the group that makes them unread (RMSprop's grad_avg when not centered)
        unread=[(dict(states_saved_map(prog))[n], " or ".join(f"{group_code[h]} == 0" for h in hs))
                for n, hs in unread_when(prog).items()],
        # the update reads the step count (bias corrections, schedules): a started state without it is spoiled
        reads_step=any(n == "t" for eq in prog.eqns for n in ir.refs(eq.expr)) or (
            prog.group is not None and any(n == "t" for step in prog.group.steps
                                           for n in ir.refs(getattr(step, "expr", None) or getattr(step, "arg", None)))),
        state_inits=[(s.name, s.saved_as, _init_code(s, prog, group_code),
                      state_shape_code(s.shape, group_code, made_diag.get(s.name)), s.fed,
                      "torch.bool" if s.shape == "bool" else state_dtype) for s in prog.states],
        shape_single=[(n, ir.SIZES[n]) for n in shapes],
        shape_multi=[(n, f"[{_rename_word(ir.SIZES[n], 'p', 'x_')} for x_ in p]") for n in shapes],
        group_defs=[(str(d.symbol), host.doprint(d.expr)) for d in plan.group],
        param_single=[(str(d.symbol), host.doprint(d.expr)) for d in plan.param],
        param_compiled=[(str(d.symbol), compiled.doprint(d.expr)) for d in plan.param],
        param_multi=param_multi,
        single_body=single_body,
        # the for-loop path on DTensors, where a stage has reductions (a rule with matrix-shaped states
        # steps whole on owner ranks instead): one all-reduce per stage for all tensors, not per tensor
        staged_body=staged_body(staged) if schedule.stages(staged) and not matrix_states else [],
        random=any(d.expr.has(*RANDOM) for d in plan.steps) or any(e.has(*RANDOM) for _, e in plan.outputs),
        multi_body=multi_body(instrs),
        # compiled, t is a tensor: read where the step count or a scalar of it is used
        single_reads_t=bool(plan.param) or any(re.search(r"\bt\b", line) for line in single_body),
    )


def _not_elementwise(prog: ir.Program) -> str:
    """Why a complex parameter cannot be stepped as its real view, element by element ('' when it can):
    a reduction, matrix work or the shape would see twice the elements, or the wrong axes."""
    for s in prog.states:
        if s.shape != "full":
            return f"its state '{s.name}' is declared ': {s.shape}'"

    def first(e):
        if isinstance(e, ir.Ref) and e.name in ir.SHAPE_BUILTINS:
            return f"it reads the shape ({e.name})"
        if isinstance(e, ir.Op):
            row = TABLE.get(e.op)
            if row is not None and (row.reduction or row.axis or row.matrix):
                return f"it calls {e.op}()"
            return next((why for why in map(first, e.args) if why), "")
        return ""
    exprs = [eq.expr for eq in prog.eqns] + [s.init for s in prog.states if s.init is not None]
    return next((why for why in map(first, exprs) if why), "")


def _fused_context(rule: dict, plan: Plan, cond: str | None, multi: bool) -> dict:
    """What the Triton template prints for one rule: its kernels, or why it has none."""
    suffix = rule["suffix"]
    ctx = dict(func=rule["func"], suffix=suffix, cond=cond or "every other parameter", name=plan.program.name,
               hypers=plan.program.hypers, uses_loss=plan.program.uses_loss, group_defs=rule["group_defs"],
               avail_name=f"_fused_available{suffix}" if multi else "fused_available",
               default_name=f"_fused_by_default{suffix}" if multi else "_fused_by_default",
               unsupported=triton_backend.unsupported(plan), torch_only=False, geometry=False, segments=False, atan=False,
               matrix=None, random=rule["random"])
    if multi and ctx["unsupported"] and fusion.matrix_work(plan):
        # matrix work the kernels cannot surround: this rule runs torch's code, the other rules fused
        ctx.update(torch_only=True, why_torch=ctx["unsupported"], unsupported="")
        return ctx
    if not ctx["unsupported"]:
        ctx.update(triton_backend.kernel_context(plan))
    # low-bit states: the kernels (de)quantise those shaped like p; the launcher the smaller others
    ctx["lowbit_signed"] = rule["lowbit_signed"]
    diag = {s.name: condition_code(s.diag, plan.program, local=True) for s in plan.program.states if s.diag is not None}
    ctx["lowbit_host"] = [dict(name=s.name, kind=s.shape, read=read_state_code(s.shape, rule["lowbit_signed"][s.name], "x_", "y_",
                                                                               diag.get(s.name)),
                               whole_shape=re.sub(r"\bp\b", "w_", state_shape_code(s.shape, diag=diag.get(s.name)) or "p.shape"))
                          for s in plan.program.states if s.shape not in ("full", "scalar", "bool")]
    return ctx


def _decided_at_step(prog: ir.Program, lines: list[str], filename: str) -> list[str]:
    """'file:line: statement as written' for each statement of prog whose shapes only the parameter's
    shape decides (optdsl/shapes.py): the functional turns a torch error at step into one naming
    them (the template's _shape_error). Escaped by the template's `literals` filter."""
    shown = []
    for eq in shape_check.decided_at_step(prog):
        span = eq.span
        if span is None or not 1 <= span.line <= len(lines):
            continue
        line = lines[span.line - 1]
        text = line[span.column - 1:span.end_column - 1] if span.end_line == span.line else line[span.column - 1:]
        shown.append(f"{filename}:{span.line}: {' '.join(text.split('#')[0].split())}")
    return list(dict.fromkeys(shown))


def _refusal_text(why: str, filename: str, line: int, shown: str) -> str:
    """What a refused parameter's error says after its shape: the spec's reason, then where it stands."""
    return f"{why} ({filename}:{line}: rule {shown} refuse)"


def render(plan: Plan, source: str, filename: str, rules: tuple = (), refusals: tuple = ()) -> str:
    """The module for a spec; `rules` holds (condition code, plan, condition as written) per rule by shape,
    `refusals` (updating rules before it, condition code, why, condition as written, line) per refusing rule."""
    prog = plan.program
    rules = rules or ((None, plan, None),)
    many = len(rules) > 1 or bool(refusals)  # a refusal is a rule too: the class picks a rule per parameter
    func = _functional_name(prog)
    names_in_group = interface(prog)  # the hyperparameters are the same in every rule
    contexts = [_rule_context(p, f"{func}_{i}" if many else func, f"_{i}" if many else "",
                              names_in_group["group_code"]) for i, (_, p, _) in enumerate(rules)]
    # the statements as written, blocks ({ ... }) and inputs included; declarations are in Args.
    # Lines as the grammar ends them (\n, \r\n), not as str.splitlines() does: a comment may hold
    # U+2028 or a form feed, and what follows it is still the comment.
    lines = [line.removesuffix("\r") for line in source.strip("\n").split("\n")]
    statements = [code for code in (" ".join(line.split("#")[0].split()) for line in lines)
                  if code and not code.startswith(("optimizer ", "hyper ", "state "))]
    latex = []
    for _, p, cond in rules:
        if many:
            shown = "every other parameter" if cond is None else f"parameters with {cond}"
            latex.append(r"&\text{for " + shown.replace("_", r"\_") + "}")
        latex += statement_math(p.program, latex=True)
    for c, (_, p, _) in zip(contexts, rules):
        c["step_shapes"] = _decided_at_step(p.program, lines, filename)
        c["replay"] = step_shapes.context(p.program, lines, filename, INTERNAL_NAMES) if c["step_shapes"] else None
        # a parameter of too low a rank: the step's error shows what needs the rank as a spec error shows it
        c["rank_where"] = c["min_rank"] and (step_shapes.located(c["rank_span"], lines, filename) or c["rank_why"])
    ctx = dict(contexts[0],
        name=prog.name, doc=prog.doc, filename=filename,
        hypers=[h for h in prog.hypers if not h.computed], step_hypers=prog.hypers,
        uses_loss=any(p.program.uses_loss for _, p, _ in rules), rules=contexts,
        random=any(c["random"] for c in contexts),
        rule_conds=[cond for cond, _, _ in rules] if many else [],
        # 'refused: why (file:line: rule COND refuse)' as a Python string literal, by updating rules before it
        refusals=[(before, code, _refusal_text(why, filename, line, shown)) for before, code, why, shown, line in refusals],
        # 'file:line: rule COND' per rule as written, for the error of a parameter that no rule takes
        rule_lines=[f"{filename}:{i + 1}: {' '.join(line.split('#')[0].split()).removesuffix('{').strip()}"
                    for i, line in enumerate(lines) if line.split("#")[0].split()[:1] == ["rule"]],
        inputs=[s.name for s in prog.states if s.fed],
        bool_names=sorted({s.saved_as for _, p, _ in rules for s in p.program.states if s.shape == "bool"}),
        statements=list(dict.fromkeys(statements)), latex=latex,
        step_rules=[] if prog.name in TORCH_WITHOUT_STEP else [i for i, c in enumerate(contexts) if c["reads_step"]],
        spec_lines=lines, number=_py_number, quant=quant,
        **names_in_group,
        **group_phase.context(prog, names_in_group["group_code"]),
        **mode_code.context(prog, names_in_group["group_code"]),
    )
    # each float state's int8/int4 code by saved key, over all rules (signed if any rule says so)
    lowbit = {}
    for _, p, _ in rules:
        codes = quant.codes(p.program)
        for s in p.program.states:
            if s.name in codes and not s.fed:
                lowbit[s.saved_as] = lowbit.get(s.saved_as, False) or codes[s.name].signed
    ctx["lowbit_keys"] = lowbit
    # the class's map of old names to saved keys spans the rules (a name has one key in all of them)
    ctx["states_saved"] = list(dict.fromkeys(pair for c in contexts for pair in c["states_saved"]))
    # one line per piece: pieces glued end to start hid a call from the search below (a parameter's
    # last scalar followed by `_eye_like(` read as `c1_eye_like(`, and Shampoo-style inits lost their helper)
    host_code = "\n".join([*(e for c in contexts for _, e in c["group_defs"] + c["param_single"] if e),
                           *(code for code, _, _ in rules if code), *(code for _, code, *_ in refusals),
                           *(e for c in contexts for _, _, e, *_ in c["state_inits"] if e),
                           *(ctx["group_phase"] or ()),
                           *(line for c in contexts if c["replay"] for line in c["replay"]["body"])])
    ctx["helpers"] = [code for name, code in (HOST_HELPERS | group_phase.HELPERS).items()
                      if re.search(rf"(?<!\w){name}\(", host_code)]  # _bfloat16( is not _round_bfloat16(
    ctx["fused_rules"] = [_fused_context(c, p, cond, len(rules) > 1) for c, (_, p, cond) in zip(contexts, rules)]
    for c, fused in zip(contexts, ctx["fused_rules"]):  # each rule's functional asks its own
        # torch_fused: its fused path is the multi-tensor path's torch code (draws DTensor-aware, _random_like)
        c.update(avail_name=fused["avail_name"], default_name=fused["default_name"], torch_fused=fused["torch_only"])
    ctx["func"] = func
    ctx["matrix_states"] = any(c["matrix_states"] for c in contexts)
    ctx["sharded_loop"] = any(c["staged_body"] for c in contexts)  # a rule's for-loop path has stages on DTensors
    ctx["sharded_fused"] = any(not r["unsupported"] and not r["torch_only"] for r in ctx["fused_rules"])
    ctx["fused_code"] = environment().get_template("triton_fused.py.j2").render(**ctx)
    replays = [line for c in contexts if c["replay"] for line in c["replay"]["body"]]
    tensor_code = "\n".join(line for c in contexts for line in c["single_body"] + c["multi_body"] + replays)
    called = {name for name in LINALG_HELPERS if f"{name}(" in tensor_code + ctx["fused_code"]}
    called |= {used for name in called for used in LINALG_USES.get(name, ())}
    ctx["helpers"] += [code for name, code in LINALG_HELPERS.items() if name in called]
    return environment().get_template("torch_optimizer.py.j2").render(**ctx)


# ---- the constructor's keywords ----
# torch.optim's own flags, keyword-only in a drop-in class; it accepts those not in IMPLEMENTED_FLAGS
# at the value that turns them off. maximize=True is the template's: each path steps with -g.
TORCH_FLAGS = {"maximize": False, "capturable": False, "differentiable": False}
IMPLEMENTED_FLAGS = {"maximize"}
# torch.optim classes whose state_dict keeps no `step`: a started state of theirs loads without one
# (SGD's momentum_buffer alone; our SGD reads t only as t == 1, dampening's first step).
TORCH_WITHOUT_STEP = {"SGD"}


@dataclass(frozen=True)
class Argument:
    """One constructor keyword as the template prints it."""
    name: str
    annotation: str
    default: str             # Python code
    checks: tuple[tuple[str, str, ir.Hyper], ...]  # (code of the value in `group`, its label, hyper)


def interface(prog: ir.Program) -> dict:
    """What the template needs for the constructor, the param_groups keys and the state keys.

    A spec that names none of its interface (no `as`, tuple, flag, `only` or `eager`) gets its
    hyperparameters' names as keywords and group keys, and nothing else changes."""
    group_code = {h.name: f'values["{h.name}"]' if h.computed else f'group["{h.name}"]' for h in prog.hypers}
    ctx = dict(dropin=prog.dropin, states_saved=[(s.name, s.saved_as) for s in prog.states],
               eager=[s.saved_as for s in prog.states if s.eager])
    if not prog.dropin:  # a state_dict's groups must hold every hyperparameter but the flags and the
        # group states (made at the first step: a state_dict saved before it has none)
        return ctx | dict(group_code=group_code,
                          required_keys=[h.name for h in prog.hypers if not h.flag and not h.computed])
    hypers = {h.name: h for h in prog.hypers}
    keywords, aliases = [], {}
    for kw in prog.keywords:
        members = [hypers[m] for m in kw.members]
        if kw.is_tuple:
            for i, h in enumerate(members):
                group_code[h.name] = _optional(h, f'group["{kw.name}"][{i}]')
                aliases[h.name] = (kw.name, i)
            checks = tuple((f'group["{kw.name}"][{i}]', f"{kw.name}[{i}] ({h.name})", h)
                           for i, h in enumerate(members))
            keywords.append(Argument(kw.name, f"tuple[{', '.join(_annotation(h) for h in members)}]",
                                     f"({', '.join(_py_default(h) for h in members)})", checks))
            continue
        (h,) = members
        if kw.name != h.name:
            aliases[h.name] = (kw.name, None)
        # the math reads a flag as 1.0 or 0.0
        group_code[h.name] = f'float(group["{kw.name}"])' if h.flag else _optional(h, f'group["{kw.name}"]')
        label = kw.name if kw.name == h.name else f"{kw.name} ({h.name})"
        keywords.append(Argument(kw.name, _annotation(h), _py_default(h),
                                 ((f'group["{kw.name}"]', label, h),)))
    fixed = {h.keyword or h.name: _py_default(h) for h in prog.hypers if h.only}
    fixed |= {name: repr(value) for name, value in TORCH_FLAGS.items() if name not in IMPLEMENTED_FLAGS}
    accepted = [k.name for k in keywords] + ["foreach", "fused", "state_dtype", "reshardable", *TORCH_FLAGS]
    # None required: a key torch.optim's class lacks (Muon's adam_lr) takes this optimizer's default;
    # another optimizer's state_dict shows in its states
    required = []
    return ctx | dict(group_code=group_code, keywords=keywords, aliases=aliases, fixed=fixed,
                      torch_flags=list(TORCH_FLAGS.items()), accepted=accepted, required_keys=required)


def _py_default(h: ir.Hyper) -> str:
    if h.choices:
        return escape.literal(h.choices[0])
    if (h.only or h.count) and float(h.default).is_integer() and not h.flag:  # a count (Muon's ns_steps)
        return repr(int(h.default))
    return "None" if h.optional else repr(bool(h.default)) if h.flag else _py_number(h.default)


def _annotation(h: ir.Hyper) -> str:
    if h.choices:
        return " | ".join(dict.fromkeys("None" if c is None else "str" for c in h.choices))
    if (h.only or h.count) and float(h.default).is_integer() and not h.flag:
        return "int"
    return "bool" if h.flag else "float | None" if h.optional else "float"


def _optional(h: ir.Hyper, code: str) -> str:
    """A hyperparameter that defaults to None is, where None, the machine epsilon of the dtype of the
    parameters a step updates (`params` where the step calls the functional)."""
    if h.choices:  # the math reads a named choice as its index
        return f"float({_literals(h.choices)}.index({code}))"
    return f"_machine_eps({code}, params)" if h.optional else code


class _ConditionPrinter(HostPrinter):
    """A rule's condition reads as Python: `p.dim() >= 2`, not `float(p.dim() >= 2)`. Only a comparison
    at the top or joined by and/or prints bare: one inside another comparison or in arithmetic prints
    as a number, float(...), since bare `(a >= b) == (c == 0)` would be Python's chained
    `a >= b == c == 0` and `(a >= b) * 2` would multiply b."""

    _bare = True  # whether the expression printed next may print as a bare comparison

    def _print(self, expr, **kwargs):
        bare, self._bare = self._bare, False  # what it contains prints as numbers unless said otherwise
        try:
            row = _COMPARISON_ROWS.get(type(expr))
            if not bare or row is None:
                return super()._print(expr, **kwargs)
            if row.name in ("land", "lor"):  # Python's and/or bind as the spec's: only an `or` in an `and` needs ( )
                word, parts = ("and" if row.name == "land" else "or"), []
                for a in expr.args:
                    self._bare = True
                    text = self._print(a)
                    inner = getattr(_COMPARISON_ROWS.get(type(a)), "name", "")
                    parts.append(f"({text})" if word == "and" and inner == "lor" else text)
                return f" {word} ".join(parts)
            return row.host.format(*(self._print(a) for a in expr.args))[len("float("):-1]
        finally:
            self._bare = bare


_COMPARISON_ROWS = {row.sympy: row for row in COMPARISONS.values()}


def condition_code(cond: ir.Expr, prog: ir.Program, local: bool = False) -> str:
    """A rule's condition as Python over the parameter `p` and its `group` (under its keywords). It runs
    on host numbers (when a group is added, at each step), so each operation the declared ranges do
    not prove safe is IEEE 754's, as on the tensor paths (optdsl/ieee.py): `1 / (ndim - 2)` on a
    matrix is inf, not a ZeroDivisionError. `local`: the hyperparameters as the step's own variables (a
    factor state's kind, read in the step: ir.State.diag)."""
    from ..rewrite import scalar_env
    from ..sym import to_sympy
    group_code = interface(prog)["group_code"]
    names = [h.name for h in prog.hypers] + list(ir.SHAPE_BUILTINS) + list(ir.AXIS_SIZES)
    sizes = {sp.Symbol(n): ieee.Interval(0.0, float("inf"), True, False) for n in ir.AXIS_SIZES}
    value = ieee._Guard({**scalar_env(prog), **ieee.shape_env(), **sizes})(to_sympy(cond, {n: sp.Symbol(n) for n in names}))
    # an epsilon of None is the machine epsilon of p's dtype (the step's functional reads its `params`)
    code = {h.name: group_code[h.name].removesuffix(", params)") + ", [p])" if h.optional else group_code[h.name]
            for h in prog.hypers} | ir.SHAPE_BUILTINS | ir.AXIS_SIZES
    if local:
        code |= {h.name: h.name for h in prog.hypers}
    return _ConditionPrinter().doprint(value.xreplace({sp.Symbol(n): sp.Symbol(code[n]) for n in names}))


# The shape of a state's tensor, from p's (None: torch.zeros_like(p)).


def _py_number(x: float) -> str:
    if x == float("inf"):
        return 'float("inf")'
    if x == float("-inf"):
        return '-float("inf")'
    return repr(float(x))


def _init_code(state: ir.State, prog: ir.Program, group_code: dict[str, str]) -> str | None:
    """PyTorch code for a state's initial value from p and the group's hyperparameters
    (`group_code`: how the group holds each, e.g. group["betas"][0] for b1)."""
    if state.init is None:
        return None
    from ..backends.printers import DevicePrinter
    from ..sym import to_sympy
    env = {h.name: sp.Symbol(group_code[h.name]) for h in prog.hypers}
    env[ir.P0] = sp.Symbol("p")
    made = f'state[{state.saved_as!r}]'  # a matrix state's identity: its own shape, dtype and device
    env[ir.EYE] = sp.Symbol(f"_eye_like({made})")
    value = to_sympy(state.init, env)
    p = sp.Symbol("p")
    # a reduction of a scalar is that scalar broadcast to p's shape (functions.py), here on p's own shape
    tensor = fn.reads_tensor({p})
    value = fn.broadcast_scalars(value, lambda x: not tensor(x)).xreplace(
        {sp.Symbol(n): sp.Symbol(code) for n, code in ir.SIZES.items()})
    reductions = tuple(REDUCTIONS)
    # a matrix state's identity is a tensor: Python's arithmetic takes it, a host function or comparison
    # (float(scale >= eye / 3), math.sqrt) does not (fuzz seed 8623: ValueError at step)
    eye = env[ir.EYE]
    on_eye = any((isinstance(e, sp.Function) or (isinstance(e, sp.Pow) and not e.exp.is_Integer))
                 and eye in e.free_symbols for e in sp.preorder_traversal(value))
    if p not in value.free_symbols and not value.has(*reductions) and not on_eye:
        return HostPrinter().doprint(value)
    tensors = {p, eye}

    def host_parts(e: sp.Expr, operand: bool = False) -> sp.Expr:
        """The parts p does not reach, computed on the host and given to torch as tensors like p."""
        if not (e.free_symbols & tensors) and not e.has(*reductions) and (operand or not e.is_Number):
            return sp.Symbol(f"p.new_tensor({HostPrinter().doprint(e)})")
        if e.is_Atom:
            return e
        return e.func(*(host_parts(a, not isinstance(e, (sp.Add, sp.Mul, sp.Pow))) for a in e.args))
    return DevicePrinter().doprint(host_parts(value))
