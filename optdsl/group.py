"""Group statements → ir.GroupPhase: scalars of the whole parameter group, computed once per step
before any parameter is updated (the global gradient norm of clipping, Prodigy's distance estimate).

`state NAME: group [= EXPR]` is one number per parameter group, kept in its param_groups entry (so
state_dict() saves it); `group NAME = EXPR` assigns a group state or a group local. Outside a
reduction a group statement reads hyperparameters, group values, numbers and `loss`; inside `sum`,
`norm`, `mean`, `rms` or `amax` it may read one parameter's p, g, states (their step-start values),
t and shape, and the reduction runs over every tensor of the group (`norm(g)` is the norm of the
concatenated gradients). The per-parameter statements read the group values as hyperparameters.
"""
from __future__ import annotations

import keyword
from dataclasses import replace

import sympy

from . import ast, ir
from . import shapes as shape_check
from .errors import SpecError, SpecWarning
from .functions import COMPARISONS, TABLE

GROUP_REDUCTIONS = ("sum", "norm", "mean", "rms", "amax")
_BINARY = {"+": "+", "-": "-", "*": "*", "/": "/", "^": "^", "%": "mod"}


def has_group(spec: ast.Spec) -> bool:
    return any(s.shape == "group" for s in spec.states) or any(
        isinstance(a, ast.Assign) and a.group for a in spec.body)


class _GroupLowering:
    def __init__(self, spec: ast.Spec, reserved):
        self.spec = spec
        self.reserved = reserved
        self.hypers = {h.name for h in spec.hypers}
        self.group_states = [s for s in spec.states if s.shape == "group"]
        self.param_states = {s.name for s in spec.states if s.shape != "group"}
        self.version: dict[str, int] = {s.name: 0 for s in self.group_states}
        self.steps: list[ir.Eqn | ir.GroupReduce] = []
        self.reads: set[str] = set()      # per-parameter states a reduction reads
        self.read_names: set[str] = set()  # group names read by group statements
        self.read_hypers: set[str] = set()
        # what a reduction reads, by name: p, g and each state's step-start value in their declared shapes
        self.param_state_decls = tuple(s for s in spec.states if s.shape != "group")
        self.shapes = {ir.P0: ir.FULL, ir.G0: ir.FULL} | {
            ir.ssa_name(s.name, 0): ir.state_shape(s.shape) for s in self.param_state_decls}

    @staticmethod
    def ssa(name: str, version: int) -> str:
        return f"{name}.{version}"  # a key of the generated code's dict of group values, never a Python name

    def expr(self, e: ast.Expr, inside: bool, init: bool = False) -> ir.Expr:
        if isinstance(e, ast.Num):
            return ir.Const(e.value, e.span)
        if isinstance(e, ast.Name):
            return self.name(e, inside, init)
        if isinstance(e, ast.Neg):
            return ir.Op("neg", (self.expr(e.operand, inside, init),), e.span)
        if isinstance(e, ast.BinOp):
            args = (self.expr(e.left, inside, init), self.expr(e.right, inside, init))
            return ir.Op(_BINARY.get(e.op) or COMPARISONS[e.op].name, args, e.span)
        fn = TABLE.get(e.func)
        if fn is None:
            raise SpecError(f"unknown function '{e.func}'", e.func_span,
                            hint="the functions are listed in docs/language.md")
        if len(e.args) != fn.arity:
            raise SpecError(f"{e.func}() takes {fn.arity} argument{'s' if fn.arity != 1 else ''}, got {len(e.args)}",
                            e.span, hint=f"call it as {e.func}(...)")
        if fn.random:
            raise SpecError(f"{e.func}() cannot stand in a group statement: a draw is shaped like p", e.span,
                            hint="draw in a per-parameter statement, e.g. 'z = randn()'")
        if inside or not (fn.reduction or fn.axis or fn.matrix):
            args = tuple(self.expr(a, inside, init) for a in e.args)
            if fn.reduction or fn.axis:  # as the per-parameter statements keep it (optdsl/lower.py)
                return ir.Op(e.func, args, e.span, operand=self.operand(args[0], e))
            return ir.Op(e.func, args, e.span)
        if init or e.func not in GROUP_REDUCTIONS:
            raise SpecError(f"{e.func}() cannot stand here: a group value is one number for the group", e.span,
                            hint="reduce over the group's tensors with sum, norm, mean, rms or amax "
                                 "(e.g. 'group gnorm = norm(g)')")
        arg = self.expr(e.args[0], True)
        out = f"{e.func}#{sum(isinstance(s, ir.GroupReduce) for s in self.steps)}"
        self.steps.append(ir.GroupReduce(out, e.func, arg, e.span, operand=self.operand(arg, e, group=True)))
        return ir.Ref(out, e.span)

    def operand(self, arg: ir.Expr, e: ast.Call, group: bool = False) -> int | tuple:
        """The shape of a reduction's operand as written (optdsl/shapes.py operand). A group reduction
        counts a number on zeros of that shape per tensor (optdsl/backends/group_phase.py): matrix work's
        sizes it does not make, so such an operand is refused where SymPy reads it as a number."""
        code = shape_check.operand(arg, self.shapes, (), self.param_state_decls)
        if group and isinstance(code, tuple):
            from .sym import to_sympy  # sym imports optdsl/lower.py, which imports this module

            class Names(dict):
                def __missing__(self, name):
                    return sympy.Symbol(name)
            if to_sympy(arg, Names()).is_number:
                raise SpecError(f"{e.func}() over the group of a ({code[0]} x {code[1]}) value that is a number "
                                "wherever it is computed", e.span,
                                hint="write the number the reduction gives, or reduce it in a per-parameter statement")
        return code

    def name(self, e: ast.Name, inside: bool, init: bool) -> ir.Expr:
        n = e.id
        if n in TABLE:
            raise SpecError(f"'{n}' is a function; call it as {n}(...)", e.span, hint=f"write {n}(x)")
        if n in self.hypers:
            self.read_hypers.add(n)
            return ir.Ref(n, e.span)
        if init:
            raise SpecError(f"a group state's initial value cannot use '{n}'", e.span,
                            hint="a group state starts from hyperparameters and numbers only")
        if n in self.version:
            self.read_names.add(n)
            return ir.Ref(self.ssa(n, self.version[n]), e.span)
        per_param = n in ("p", "g", "t") or n in self.param_states or n in ir.SHAPE_BUILTINS
        if per_param and not inside:
            raise SpecError(f"'{n}' differs from parameter to parameter: a group statement reads it only "
                            "inside a reduction over the group", e.span,
                            hint=f"reduce it with sum, norm, mean, rms or amax, e.g. sum({n} * {n})")
        if n in ("p", "g"):
            return ir.Ref(ir.ssa_name(n, 0), e.span)
        if n in self.param_states:
            self.reads.add(n)
            return ir.Ref(ir.ssa_name(n, 0), e.span)
        if n == "t" or n in ir.SHAPE_BUILTINS:
            return ir.Ref(n, e.span)
        if n == "loss":
            raise SpecError("a group statement cannot read the loss yet", e.span,
                            hint="read 'loss' in the per-parameter statements")
        raise SpecError(f"unknown name '{n}'", e.span,
                        hint="a group statement reads hyperparameters, group values assigned above it, numbers "
                             "and loss, and inside a reduction p, g, t and the parameter's states")

    def statement(self, a: ast.Assign) -> None:
        n = a.target
        if sum(isinstance(s, ir.Eqn) for s in self.steps) >= MAX_GROUP_STATEMENTS:
            raise SpecError(f"more than {MAX_GROUP_STATEMENTS} group statements", a.span,
                            hint="a group phase computes a few numbers per step (the largest shipped one has 8)")
        if n in self.hypers:
            raise SpecError(f"cannot assign the hyperparameter '{n}'", a.target_span,
                            hint=f"assign a group local instead, e.g. 'group {n}_eff = ...'")
        if n in ir.BUILTINS or n in ir.SHAPE_BUILTINS or n in self.param_states:
            raise SpecError(f"'{n}' is per parameter, so a group statement cannot assign it", a.target_span,
                            hint="a group statement assigns a group state ('state NAME: group') or a group local")
        if n in TABLE or keyword.iskeyword(n) or n in self.reserved or n.endswith("_list") or n.startswith("__"):
            raise SpecError(f"'{n}' is reserved and cannot name a group value", a.target_span,
                            hint=f"choose another name, e.g. '{n}_'")
        value = self.expr(a.value, False)
        self.version[n] = self.version.get(n, 0) + 1
        self.steps.append(ir.Eqn(self.ssa(n, self.version[n]), n, ir.SCALAR, value, a.span))


# Group statements are host scalars, each checked and printed: 400 statements each a max of the one
# before took 6.9 s to compile, 120 of them 1.9 s. A spec's group phase is a few statements.
MAX_GROUP_STATEMENTS = 64


def lower_group(spec: ast.Spec, reserved) -> tuple[ir.GroupPhase, ast.Spec, set[str]]:
    """The group phase, the spec the per-parameter lowering sees (the group values as hyperparameters,
    without the group states and statements), and the names of those values."""
    lowering = _GroupLowering(spec, reserved)
    states = []
    for s in lowering.group_states:
        if s.key or s.eager:
            raise SpecError(f"group state '{s.name}' cannot take '{'as ' + s.key if s.key else 'eager'}'",
                            s.key_span or s.span, hint="a group state is kept in param_groups under its own name")
        init = lowering.expr(s.init, False, init=True) if s.init is not None else None
        states.append(ir.State(s.name, init, s.span, "group"))
    body = [a for a in spec.body if isinstance(a, ast.Assign) and a.group]
    for a in body:
        lowering.statement(a)
    names = dict.fromkeys(list(lowering.version))
    computed = tuple(ast.Hyper(n, 1.0, None, next((s.span for s in spec.states if s.name == n), None)
                               or next(a.target_span for a in body if a.target == n)) for n in names)
    phase = ir.GroupPhase(tuple(states), tuple(lowering.steps),
                          tuple((s.name, lowering.ssa(s.name, lowering.version[s.name])) for s in states),
                          tuple((n, lowering.ssa(n, lowering.version[n])) for n in names),
                          tuple(sorted(lowering.reads)))
    rest = replace(spec, hypers=spec.hypers + computed, states=tuple(s for s in spec.states if s.shape != "group"),
                   body=tuple(a for a in spec.body if not (isinstance(a, ast.Assign) and a.group)))
    return phase, rest, lowering


def finish(phase: ir.GroupPhase, program: ir.Program, read: set[str], lowering: _GroupLowering,
           warnings: list[SpecWarning]) -> tuple[ir.Program, list[SpecWarning]]:
    """Keep the group values the per-parameter statements read (as computed hyperparameters)."""
    computed = {n for n, _ in phase.values}
    for s in phase.states:
        if s.name not in read and s.name not in lowering.read_names:
            warnings.append(SpecWarning(f"group state '{s.name}' is never read", s.span,
                                        hint="read it in a statement, or remove it"))
    hypers = tuple(replace(h, computed=True) if h.name in computed else h for h in program.hypers
                   if h.name not in computed or h.name in read)
    phase = replace(phase, values=tuple((n, ssa) for n, ssa in phase.values if n in read))
    quiet = computed | lowering.read_hypers  # hyperparameters the group statements read are used
    kept = [w for w in warnings if not any(w.message == f"hyperparameter '{n}' is never used" for n in quiet)]
    return replace(program, hypers=hypers, group=phase), kept
