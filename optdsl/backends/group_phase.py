"""ir.GroupPhase → the body of the generated `_group_phase` method: host floats of the group,
reductions over its tensors (one sync each), group states read from and written to param_groups."""
from __future__ import annotations

import sympy as sp

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
    "mean": ("torch.sum({0})", "(_group_sum({0}) / sum(x_.numel() for x_ in p))"),
    "norm": ("torch.linalg.vector_norm({0})", "_group_norm({0})"),
    "rms": ("torch.sum(torch.square({0}))", "math.sqrt(_group_sum({0}) / sum(x_.numel() for x_ in p))"),
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
    for item in group_order(phase.steps):
        if isinstance(item, tuple):  # a stage's reductions: their parts made whole by one all-reduce
            loops = []
            for step in item:
                arg = to_sympy(step.arg, env | inner)
                body = CompiledPrinter(tensors).doprint(arg)
                if not any(s.name in tensors for s in arg.free_symbols):  # a scalar counts once per element
                    # of p, or of the value's shape as written where SymPy simplified it (r - r - 2 of a rows state)
                    body = f"({body}) + {_zeros(_shape(step.arg, shapes))}"
                loops.append(f"[{_COMBINE[step.func][0].format(body)} for {', '.join(i + '_' for i in items)} "
                             f"in zip({', '.join(items)})]")
            if len(item) > 1:
                lines.append(f"parts_ = _parts({', '.join(loops)})")
            for k, step in enumerate(item):
                parts = f"parts_[{k}]" if len(item) > 1 else f"_parts({loops[0]})[0]"
                lines.append(f'values["{step.out}"] = {_COMBINE[step.func][1].format(parts)}')
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


def _shape(e: ir.Expr, kinds: dict[str, str]):
    """The language's shape of a value a group reduction reads (ir.join's tags), from its operands as written."""
    if isinstance(e, ir.Ref):
        if e.name in (ir.P0, ir.G0):
            return ir.FULL
        state = next((s for s in kinds if ir.ssa_name(s, 0) == e.name), None)
        if state is None or kinds[state] == "group":
            return ir.ALL
        return None if ir.is_matrix(kinds[state]) else ir.state_shape(kinds[state])
    if isinstance(e, ir.Const):
        return ir.ALL
    return ir.result_shape(TABLE.get(e.op), [_shape(a, kinds) for a in e.args])


def _zeros(shape) -> str:
    """Torch code of zeros of that shape over one tensor p_ of the group (p's where not a reduced one)."""
    code = "torch.zeros_like(p_)"
    if shape is None or shape == ir.ALL:
        return code
    # sums (a norm over the units) of zeros are zeros of the reduced shape; a mean of a parameter's empty
    # axis is nan (a (2, 3, 0) parameter's rows)
    for axis, name in (("-1", "row_sum"), ("-2", "col_sum"), ("unit", "unit_norm")):
        if axis in shape:
            code = TABLE[name].tensor.format(code)
    return code


def _reads(e: ir.Expr, name: str) -> bool:
    if isinstance(e, ir.Ref):
        return e.name == name
    return isinstance(e, ir.Op) and any(_reads(a, name) for a in e.args)
