"""ir.GroupPhase → the body of the generated `_group_phase` method: host floats of the group,
reductions over its tensors (one sync each), group states read from and written to param_groups."""
from __future__ import annotations

import sympy as sp

from .. import functions as fn
from .. import ieee, ir, quant
from ..functions import TABLE
from ..sym import to_sympy
from .printers import CompiledPrinter, HostPrinter, read_state_code
from .schedule import group_order

# How one reduction over the group is computed: each tensor's part (torch code of {0}), and how the
# parts combine into a host float ({0}: the list of parts, whole; `p`: the group's parameters). A part
# of a sharded parameter (a DTensor) is the whole tensor's: _parts, the sharding template's, combines
# the shards' of all the group's tensors, for every reduction of a stage (schedule.group_order), by one
# all-reduce (numel() of a DTensor is the whole tensor's).
_COMBINE = {
    "sum": ("torch.sum({0})", "_group_sum({0})"),
    "mean": ("torch.sum({0})", "_group_mean(_group_sum({0}), sum({count} for x_ in p))"),
    "norm": ("torch.linalg.vector_norm({0})", "_group_norm({0})"),
    "rms": ("torch.sum(torch.square({0}))", "math.sqrt(_group_mean(_group_sum({0}), sum({count} for x_ in p)))"),
    "amax": ("_amax({0}, None)", "_group_max({0})"),
}

HELPERS = {
    "_group_sum": (
        "def _group_sum(parts):\n"
        '    """One number per tensor of a group, added on the first one\'s device in float64 (one sync)."""\n'
        "    return float(torch.stack([x.to(parts[0].device, torch.float64) for x in parts]).sum()) if parts else 0.0"),
    "_group_norm": (
        "def _group_norm(parts):\n"
        '    """The norm of all tensors of a group from their norms, as torch.nn.utils.clip_grad_norm_."""\n'
        "    if not parts:\n"
        "        return 0.0\n"
        "    return float(torch.linalg.vector_norm(torch.stack([x.to(parts[0].device, torch.float64) for x in parts])))"),
    "_group_mean": (
        "def _group_mean(total, count):\n"
        '    """A sum over a group\'s elements divided by their number: nan for a group of empty tensors, as\n'
        '    torch.mean of an empty tensor (a ZeroDivisionError on the host otherwise)."""\n'
        "    return total / count if count else math.nan"),
    "_group_max": (
        "def _group_max(parts):\n"
        '    """The largest of one number per tensor of a group (one sync)."""\n'
        '    return float(torch.stack([x.to(parts[0].device, torch.float64) for x in parts]).amax()) if parts else -float("inf")'),
}


def context(prog: ir.Program, group_code: dict[str, str]) -> dict:
    """What the template prints for the group phase: the states lists it takes and its lines."""
    phase = prog.group
    if phase is None:
        return dict(group_phase=None)
    env = {h.name: sp.Symbol(group_code[h.name]) for h in prog.hypers if not h.computed}
    lines = []
    reads_t = any(isinstance(s, ir.GroupReduce) and _reads(s.arg, "t") for s in phase.steps)
    lines.append("p = [x_ if x_.dtype in _EXACT else x_.float() for x_ in params]")
    lines.append("g = [y_.to(x_.dtype) for x_, y_ in zip(p, grads)]")
    codes, shapes = quant.codes(prog), {s.name: s.shape for s in prog.states}
    for s in phase.reads:
        lines.append(f"{s} = [{read_state_code(shapes[s], codes[s].signed, 'y_', 'x_')} for x_, y_ in zip(p, {s}_list)]")
    if reads_t:
        lines.append("t = [s_.item() + 1 for s_ in state_steps]  # the step about to be taken")
    lines.append("values = {}")
    host = HostPrinter()
    # the hyperparameters' declared ranges; group values and states unknown (any float)
    guard_env = {sp.Symbol(code): iv for code, iv in
                 ((str(env[h.name]), ieee.scalar_env(prog).get(sp.Symbol(h.name))) for h in prog.hypers
                  if h.name in env) if iv is not None}
    for s in phase.states:
        init = host.doprint(to_sympy(s.init, env)) if s.init is not None else "0.0"
        lines.append(f'values["{s.name}.0"] = group.get("{s.name}", {init})')
        env[f"{s.name}.0"] = sp.Symbol(f'values["{s.name}.0"]')
    # one tensor's values inside a reduction
    items = ["p", "g", *phase.reads] + (["t"] if reads_t else [])
    inner = {ir.P0: sp.Symbol("p_"), ir.G0: sp.Symbol("g_"), "t": sp.Symbol("t_")}
    inner.update({ir.ssa_name(s, 0): sp.Symbol(f"{s}_") for s in phase.reads})
    inner.update({n: sp.Symbol(code.replace("p.", "p_.")) for n, code in ir.SIZES.items()})
    tensors = {"p_", "g_", *(f"{s}_" for s in phase.reads)}
    reads = fn.reads_tensor({sp.Symbol(n) for n in tensors})
    sizes = {sp.Symbol(n): code for n, code in inner.items() if n in ir.SIZES}
    for item in group_order(phase.steps):
        if isinstance(item, tuple):  # a stage's reductions: their parts made whole by one all-reduce
            loops = []
            for step in item:
                # a reduction inside it of a scalar: that scalar over its operand's shape (functions.py's
                # rule, as in a step), counted in this tensor's sizes
                arg = fn.broadcast_scalars(to_sympy(step.arg, env | inner), lambda x: not reads(x)).xreplace(sizes)
                body = CompiledPrinter(tensors).doprint(arg)
                if not reads(arg):  # a scalar counts once per element of its shape as written (p's, or a
                    # reduced one where SymPy simplified the value: r - r - 2 of a rows state)
                    body = f"({body}) + {_zeros(step.operand)}"
                loops.append(f"[{_COMBINE[step.func][0].format(body)} for {', '.join(i + '_' for i in items)} "
                             f"in zip({', '.join(items)})]")
            if len(item) > 1:
                lines.append(f"parts_ = _parts({', '.join(loops)})")
            for k, step in enumerate(item):
                parts = f"parts_[{k}]" if len(item) > 1 else f"_parts({loops[0]})[0]"
                combined = _COMBINE[step.func][1].format(parts, count=_count(step.operand, env))
                lines.append(f'values["{step.out}"] = {combined}')
                env[step.out] = sp.Symbol(f'values["{step.out}"]')
        else:  # host floats: IEEE 754 where the ranges do not prove an operation safe (optdsl.ieee)
            code = host.doprint(ieee._Guard(dict(guard_env))(to_sympy(item.expr, env)))
            lines.append(f'values["{item.out}"] = {code}')
            env[item.out] = sp.Symbol(f'values["{item.out}"]')
    for name, ssa in phase.outputs:
        lines.append(f'group["{name}"] = values["{ssa}"]')
    returned = ", ".join(f'"{n}": values["{ssa}"]' for n, ssa in phase.values)
    lines.append(f"return {{{returned}}}")
    return dict(group_phase=lines, group_reads=list(phase.reads))


# the axes a value of each reduced shape (ir.operand_code) has reduced, in the order the zeros reduce them
_AXES = {0: (), 1: ("row_sum",), 2: ("col_sum",), 3: ("row_sum", "col_sum"), 4: ("unit_norm",),
         5: ("col_sum", "unit_norm")}


def _zeros(operand: int) -> str:
    """Torch code of zeros of a value's shape as written (ir.GroupReduce.operand) over one tensor p_ of
    the group: sums (a norm over the units) of p's zeros keep the reduced axes with size 1 (a mean of a
    parameter's empty axis would be nan: a (2, 3, 0) parameter's rows). optdsl/group.py refuses the
    number of matrix work's sizes (a tuple), which no zeros of p's shape give."""
    code = "torch.zeros_like(p_)"
    for name in _AXES[operand] if isinstance(operand, int) else ():
        code = TABLE[name].tensor.format(code)
    return code


def _count(operand, env: dict) -> str:
    """Host code of the elements of a value of that shape as written, per tensor x_ of the group: what
    mean and rms divide by (p's numel for p's shape; a rows state's rows)."""
    tagged = to_sympy(ir.Op("sum", (ir.Const(0.0),), operand=operand), env | {
        n: sp.Symbol(code.replace("p.", "x_.")) for n, code in ir.SIZES.items()})
    counted = fn.extent(tagged).numel.xreplace({sp.Symbol(n): sp.Symbol(code.replace("p.", "x_."))
                                                for n, code in ir.SIZES.items()})
    return HostPrinter().doprint(counted)


def _reads(e: ir.Expr, name: str) -> bool:
    if isinstance(e, ir.Ref):
        return e.name == name
    return isinstance(e, ir.Op) and any(_reads(a, name) for a in e.args)
