"""AST → IR: resolve names, check declarations, rename every assignment into SSA form."""
from __future__ import annotations

import builtins
import difflib
import keyword
import math
import re
from dataclasses import replace

import sympy

from . import ast, group, ir, modes
from . import shapes as shape_check
from .errors import Span, SpecError, SpecWarning
from .functions import AXIS_FUNCTIONS, COMPARISONS, INSTEAD, TABLE

# Names the generated code uses itself: a hyperparameter or state (which become Python
# names there) may not take them; a local may (it is renamed where it would clash).
RESERVED = {"params", "defaults", "foreach", "fused", "closure", "self", "state", "group", "math", "torch",
            "inf", "in", "hyper", "optimizer", "os", "triton", "tl", "libdevice", "pid", "offsets", "mask",
            "scalars", "hypers", "numels", "block_tensor", "block_start", "device", "dtype", "compute",
            "per_tensor", "param", "grads", "state_steps", "step_t", "i", "device_params", "device_grads",
            "device_steps", "grouped", "indices", "exact", "Optimizer", "LAUNCHES",
            "state_dtype", "stored", "value", "values", "_store_rounded",  # bfloat16 states, stochastic rounding
            # Python built-ins and module names the generated code calls, and its per-tensor loop variable
            "super", "dict", "float", "bool", "str", "list", "tuple", "len", "zip", "all", "range", "enumerate",
            "ValueError", "RuntimeError", "ImportError", "_EXACT", "_sign", "_sigmoid", "_softplus",
            "_default_to_fused_or_foreach", "_round_to", "_triton_type", "_BLOCK", "_BLOCK_MAPS",
            "_TRITON_TYPES", "_block_map", "_pointers", "t_", "x_", "y_", "v_",
            # the fused launcher and kernels
            "seed", "stochastic", "state_type", "hyper_values", "pointers", "args", "types", "step_ptrs",
            "P_TYPE", "S_TYPE", "C_TYPE", "T_TYPE", "STOCHASTIC", "BLOCK", "_to_state", "_upload",
            "_pointer_tables", "_hyper_table", "_POINTERS", "_HYPERS", "_NUM_WARPS", "_fused_by_default",
            "_state_dtype", "_fused_for", "indices", "shapes", "unit_rows", "units", "ubase", "ucols",
            "_shape_table", "_unit_table", "_triton_ready", "_geometry", "geometry", "totals",
            "R_", "C_", "row_", "col_", "mat_", "rows_", "cols_", "mxin", "mxout", "n_", "_add_by_segment",
            # the module's own names
            "ShapeError", "_shape_error", "_copy_state",  # a shape only the parameter decides, at step (optdsl/shapes.py)
            "operator", "_IS_SPARSE", "_IS_CUDA", "_DTYPE", "_groups", "_log", "_scratch_tables", "fused_available",
            "_step_dtype", "_torch_names", "_shape_table", "_unit_table",
            # locals of the fused kernels and launchers, where the hyperparameters are locals too
            "n", "start", "whole", "ALIGNED", "TYPE", "_load", "_store", "_pointer", "_mix32", "_one_element",
            "p_ptr", "g_ptr", "p_ptrs", "g_ptrs", "groups", "aligned", "why", "_"}
# and every Python built-in: a hyperparameter `map` would hide the one the fused launcher calls
RESERVED |= {name for name in dir(builtins) if not name.startswith("__")}
RESERVED |= set(ir.HIDDEN_SIZES)  # p's sizes the broadcast rule counts, beside the shape built-ins


class _Reserved(frozenset):
    """The names above, and the numbered ones the kernels make (acc1, uacc0, ax0_, axbase0_, r0_x, log0_, ...)."""

    _NUMBERED = re.compile(r"(u|ax)?acc\d+|axbase\d+_|(ax|unit)\d+_x?|r\d+_x|mx(in|out)\d+_ptrs|log\d+_"
                           r"|_(fused_available|fused_by_default|shape_table|unit_table|geometry|init_group)_\d+|_STATEMENTS(_\d+)?")

    def __contains__(self, name) -> bool:
        return frozenset.__contains__(self, name) or bool(self._NUMBERED.fullmatch(str(name)))


RESERVED = _Reserved(RESERVED)
_BINARY = {"+": "+", "-": "-", "*": "*", "/": "/", "^": "^", "%": "mod"}
# Names a drop-in constructor takes or uses itself (torch.optim's flags it accepts only at their
# defaults, its own, and its locals and helpers): a spec's keyword may not take them.
CONSTRUCTOR_NAMES = {"foreach", "fused", "maximize", "capturable", "differentiable", "spec_names", "unknown",
                     "_torch_names", "_step_dtype"}


def _did_you_mean(name: str, candidates, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return f"did you mean '{close[0]}'?" if close else ""


# Names the generated code makes from a state's name (the state `m` has m_list, device_m, m_ptrs and
# m_ptr): no declared name may be one of them, and none of them a name the code uses itself.
STATE_DERIVED = {"{}_list": "the step functions' list of state '{}'",
                 "device_{}": "the multi-tensor step's list of state '{}' on one device",
                 "{}_ptrs": "the fused kernel's pointer table of state '{}'",
                 "{}_ptr": "the fused kernel's pointer to state '{}'"}


def _python_special(name: str) -> bool:
    """A name Python itself treats apart: a dunder (`__class__`, `__debug__`, `__builtins__`) has a meaning
    of its own, and `__x` inside a class body is mangled to `_Class__x`, so a keyword `__x` is never accepted."""
    return name.startswith("__")


_SPECIAL_HINT = "Python reserves names that start with '__' (dunders, and private names it mangles in a class)"


def _check_declarations(spec: ast.Spec) -> None:
    if keyword.iskeyword(spec.name) or not spec.name.isidentifier() or _python_special(spec.name):
        raise SpecError(f"'{spec.name}' cannot be a class name", spec.name_span,
                        hint="name the optimizer with a word that is not a Python keyword and does not start "
                             "with '__', e.g. MyAdam")
    if spec.name in RESERVED:
        raise SpecError(f"'{spec.name}' is a name the generated module uses itself", spec.name_span,
                        hint=f"the class would hide it; choose another name, e.g. '{spec.name}Opt'")
    if len(spec.hypers) > MAX_HYPERS:
        raise SpecError(f"{len(spec.hypers)} hyperparameters; a spec may declare at most {MAX_HYPERS}",
                        spec.hypers[MAX_HYPERS].span, hint="keep fewer (the most a shipped spec has is 17)")
    states = spec.states + tuple(s for r in spec.rules for s in r.states)
    if len(states) > MAX_STATES:  # compile time grows faster than the states (200: 7 s)
        raise SpecError(f"{len(states)} states; a spec may declare at most {MAX_STATES}", states[MAX_STATES].span,
                        hint="keep fewer states (the largest shipped spec has 6 per rule)")
    seen: dict[str, str] = {}
    derived: dict[str, str] = {}  # name the code makes from a state's -> what it is
    for s in spec.states:
        if f"{s.name}_list" in derived and derived[f"{s.name}_list"] == STATE_DERIVED["{}_list"].format(s.name):
            continue  # a state declared twice: said below
        if s.name in ir.BUILTINS or s.name in ir.SHAPE_BUILTINS or s.name in RESERVED:
            continue  # refused below, as what it is
        for pattern, what in STATE_DERIVED.items():
            name, what = pattern.format(s.name), what.format(s.name)
            if name in RESERVED or name in derived:
                taken = "a name the generated code uses itself" if name in RESERVED else derived[name]
                raise SpecError(f"state '{s.name}' would make '{name}' ({what}), but that is {taken}", s.span,
                                hint=f"rename the state, e.g. '{s.name}_'")
            derived[name] = what
    for kind, decl in [("hyper", h) for h in spec.hypers] + [("state", s) for s in spec.states]:
        name = decl.name
        if name in derived:
            raise SpecError(f"'{name}' is the name of {derived[name]}", decl.span, hint=f"rename it, e.g. '{name}_'")
        if name in ir.BUILTINS or name in ir.SHAPE_BUILTINS:
            raise SpecError(f"'{name}' is a built-in name and cannot be declared", decl.span,
                            hint="p, g, t, loss, ndim, numel, nrows, ncols and nunits are provided by optdsl; "
                                 "choose another name")
        if name in TABLE:
            raise SpecError(f"'{name}' is a function and cannot be declared as a {kind}", decl.span,
                            hint=f"rename the {kind}, e.g. '{name}_'")
        if keyword.iskeyword(name) or name in RESERVED:
            raise SpecError(f"'{name}' is reserved and cannot be a {kind} name", decl.span,
                            hint=f"rename it, e.g. '{name}_'")
        if _python_special(name):
            raise SpecError(f"'{name}' cannot be a {kind} name", decl.span,
                            hint=f"{_SPECIAL_HINT}; rename it, e.g. '{name.lstrip('_')}'")
        if name in seen:
            raise SpecError(f"'{name}' is declared twice (already a {seen[name]})", decl.span,
                            hint="remove one of the declarations or rename it")
        seen[name] = kind
    hyper_names = {h.name for h in spec.hypers}
    for st in spec.states:
        if ir.axis_kind(st.shape) is not None and (ir.axis_kind(st.shape)[0] != "factor" or st.diag is not None):
            continue  # gram(K), axis(K): K a whole number (the grammar's NUMBER); factor(K) a state list's only
        dims = ir.matrix_dims(st.shape)
        if dims is not None or st.shape.startswith("matrix("):
            bad = [d for d in dims or () if d not in ir.MATRIX_SIZES and d not in hyper_names]
            if dims is None or bad:
                raise SpecError(f"unknown size '{bad[0]}' of a matrix state" if bad else
                                f"unknown state shape '{st.shape}'", st.shape_span,
                                hint="a matrix state is 'matrix(A, B)', each size nrows, ncols or a hyperparameter "
                                     "(a rank), e.g. ': matrix(nrows, rank)'")
            continue
        if st.shape not in ir.STATE_SHAPES and st.shape != "group":
            raise SpecError(f"unknown state shape '{st.shape}'", st.shape_span,
                            hint="a state is shaped like p unless declared ': scalar', ': rows', ': cols', ': bool' "
                                 "or ': group' (one number per parameter group), or a matrix of each matrix of p: "
                                 "': gram_rows' (nrows x nrows), ': gram_cols' (ncols x ncols) or ': matrix(A, B)' (A, B: nrows, "
                                 "ncols or a hyperparameter), or per axis K of p (a whole number, 0 the first): ': gram(K)' "
                                 "(d_K x d_K), ': axis(K)' (one value per index of axis K)")
    for h in spec.hypers:
        r = h.range
        if r is None:
            continue
        if r.lo > r.hi or (r.lo == r.hi and not (r.lo_closed and r.hi_closed)):
            raise SpecError(f"the range {r} of '{h.name}' is empty", r.span,
                            hint="write the lower bound first; a one-point range needs [a, a]")
        if not r.contains(h.default):
            raise SpecError(f"the default {h.default!r} of '{h.name}' is outside its range {r}", h.span,
                            hint="change the default or widen the range")


class _Lowering:
    def __init__(self, spec: ast.Spec, computed: set[str] = frozenset(), group_reads: set[str] = frozenset()):
        self.spec = spec
        self.computed = computed  # group values (optdsl/group.py), read here as hyperparameters
        self.group_reads = group_reads  # states the group statements read
        self.hypers = {h.name for h in spec.hypers}
        self.fed = {i.name for i in spec.inputs}
        self.states = {s.name for s in spec.states}
        self.version: dict[str, int] = {"p": 0, "g": 0, **{s: 0 for s in self.states}}
        self.retired: dict[str, int] = {}  # a block's local no longer visible: the last version it took
        self.kind: dict[str, str] = {}  # SSA name -> TENSOR/SCALAR
        self.shape: dict[str, frozenset | None] = {}  # SSA name -> shape (see ir.join)
        self.via_matrix: set[str] = set()  # SSA names of shape None through matrix work (optdsl/shapes.py's to check)
        self.declared = {s.name: ir.state_shape(s.shape) for s in spec.states}
        self.eqns: list[ir.Eqn] = []
        self.read: set[str] = set()     # spec names read by some statement
        self.uses_loss = False
        self.assigned_later = set(_targets(spec.body))
        self.warnings: list[SpecWarning] = []
        self.unrolling = 0  # how many `repeat` blocks of more than one round enclose the statement
        self.loops = 0    # kept loops lowered so far (optdsl/ir.py's LOOP): each is numbered
        self.looping = 0  # 1 inside a kept loop's body (kept loops do not nest: an inner one is unrolled)
        self.draws = 0  # randn()/rand() calls lowered so far: each is a draw of its own
        self.random_where = ""  # where a draw cannot stand (a state's initial value, a mode block): why
        for base in self.version:
            shape = self.declared.get(base, ir.FULL)
            self.kind[ir.ssa_name(base, 0)] = ir.SCALAR if shape == ir.ALL else ir.TENSOR
            self.shape[ir.ssa_name(base, 0)] = shape
            if shape is None:  # a matrix state
                self.via_matrix.add(ir.ssa_name(base, 0))

    def ssa(self, n: str, version: int) -> str:
        """The SSA name of a version; a later one steps aside for a hyperparameter (hyper b1, local b)."""
        name = ir.ssa_name(n, version)
        while version and name in self.hypers:
            name += "_"  # no SSA name ends with '_'
        return name

    # ---- expressions ----
    def visible(self) -> set[str]:
        return set(self.version) | self.hypers | {"t", "loss"} | set(ir.SHAPE_BUILTINS)

    def expr(self, e: ast.Expr, allowed: set[str] | None = None) -> ir.Expr:
        if isinstance(e, ast.Num):
            return ir.Const(e.value, e.span)
        if isinstance(e, ast.Name):
            return self.name(e, allowed)
        if isinstance(e, ast.Neg):
            return ir.Op("neg", (self.expr(e.operand, allowed),), e.span)
        if isinstance(e, ast.BinOp):
            args = (self.expr(e.left, allowed), self.expr(e.right, allowed))
            op = _BINARY.get(e.op) or COMPARISONS[e.op].name
            return ir.Op(op, args, e.span)
        return self.call(e, allowed)

    def name(self, e: ast.Name, allowed: set[str] | None) -> ir.Expr:
        n = e.id
        if allowed is not None and n not in allowed:
            if n in self.visible() or n in self.assigned_later:
                raise SpecError(f"a state's initial value cannot use '{n}'", e.span,
                                hint="a state starts from p, hyperparameters and numbers only "
                                     "(it is set before the first gradient is seen)")
        if n == ir.EYE and allowed is not None and ir.EYE in allowed:
            return ir.Ref(n, e.span)
        if n in TABLE:
            raise SpecError(f"'{n}' is a function; call it as {n}(...)", e.span,
                            hint=f"write {n}(x)")
        if n in self.hypers:
            self.read.add(n)
            return ir.Ref(n, e.span)
        if n in ("t", "loss") or n in ir.SHAPE_BUILTINS or n in ir.AXIS_SIZES:
            self.uses_loss |= n == "loss"
            return ir.Ref(n, e.span)
        if n in self.version:
            self.read.add(n)
            return ir.Ref(self.ssa(n, self.version[n]), e.span)
        if n in self.assigned_later:
            raise SpecError(f"local '{n}' is read before it is assigned", e.span,
                            hint=f"assign '{n}' on an earlier line, or declare 'state {n}' "
                                 "to keep its value across steps")
        hint = _did_you_mean(n, self.visible() | self.assigned_later)
        raise SpecError(f"unknown name '{n}'", e.span,
                        hint=hint or "declare it with 'hyper' or 'state', or assign it before use")

    def call(self, e: ast.Call, allowed: set[str] | None) -> ir.Expr:
        fn = TABLE.get(e.func)
        if fn is None:
            hint = INSTEAD.get(e.func) or _did_you_mean(e.func, TABLE, cutoff=0.75)
            raise SpecError(f"unknown function '{e.func}'", e.func_span,
                            hint=hint or "the functions are listed in docs/language.md")
        if len(e.args) != fn.arity:
            plural = "s" if fn.arity != 1 else ""
            raise SpecError(f"{e.func}() takes {fn.arity} argument{plural}, got {len(e.args)}", e.span,
                            hint=f"call it as {e.func}({', '.join('xyz'[:fn.arity]) if fn.arity <= 3 else '...'})")
        if fn.random:
            return self.draw(e, allowed)
        op = ir.Op(e.func, tuple(self.expr(a, allowed) for a in e.args), e.span)
        if fn.axis and fn.axis in (self.shape_of(op.args[0]) or ()):
            # a value of size 1 along the axes it reduces (a rows state under row_sum): the value itself,
            # its absolute value for a norm; said here, where its shape is known, since SymPy would read
            # a reduced value that simplifies to a number (r - r - 2) as a scalar, broadcast to p's shape
            return ir.Op("abs", op.args, e.span) if fn.name == "unit_norm" else op.args[0]
        if fn.reduction or fn.axis:  # the operand's shape as written, which SymPy may simplify away
            code = shape_check.operand(op.args[0], self.shape, self.eqns, self.spec.states)
            if isinstance(code, tuple) and any(str(s).startswith("d[") for s in code) and self._a_number(op.args[0]):
                raise SpecError(f"{e.func}() of a ({code[0]} x {code[1]}) value that is a number wherever it is "
                                "computed: optdsl counts matrices per matrix of p, not per axis", e.span,
                                hint=f"write the number the reduction gives (a sum: the value times {code[0]}^2)")
            op = ir.Op(e.func, op.args, e.span, operand=code)
        if fn.scalars:  # a matrix function's parameters (inv_root's k): numbers and hyperparameters
            for a, arg in zip(op.args[-fn.scalars:], e.args[-fn.scalars:]):
                if self.kind_of(a) != ir.SCALAR or self._reads_step_values(a):
                    raise SpecError(f"the last argument{'s' if fn.scalars > 1 else ''} of {e.func}() must be a "
                                    "number or a hyperparameter", arg.span or e.span,
                                    hint=f"e.g. {e.func}(L, 4)")
            k = op.args[-1]
            if e.func in AXIS_FUNCTIONS and not (isinstance(k, ir.Const) and k.value >= 0
                                                           and k.value == int(k.value)):
                raise SpecError(f"the axis of {e.func}() must be a whole number, 0 the first axis",
                                e.args[-1].span or e.span, hint=f"e.g. {e.func}({', '.join(['x'] * (fn.arity - 1))}, 0)")
            if e.func == "inv_root" and isinstance(op.args[-1], ir.Const) and op.args[-1].value == 0:
                raise SpecError("inv_root(a, k) takes a^(-1/k): k cannot be 0", e.args[-1].span or e.span,
                                hint="take a root such as 4 (Shampoo's a^(-1/4))")
        kinds = [self.kind_of(a) == ir.SCALAR for a in op.args[:len(op.args) - fn.scalars]]
        if fn.matrix and all(kinds):
            raise SpecError(f"{e.func}() of scalars: matrix work takes tensors", e.span,
                            hint="multiply scalars with '*'; a transpose of a scalar is the scalar")
        if fn.matrix and any(kinds):  # torch.matmul takes no 0-dim operand
            arg = e.args[kinds.index(True)]
            raise SpecError(f"{e.func}() of a scalar: matrix work takes two tensors", arg.span or e.span,
                            hint="multiply by a scalar with '*' instead")
        return op

    def draw(self, e: ast.Call, allowed: set[str] | None) -> ir.Expr:
        """randn()/rand(): one draw shaped like p, numbered so that each call (each round of a
        `repeat` too) is a draw of its own; a value assigned once and read twice is one draw."""
        why = "a state's initial value is set before the first step" if allowed is not None else self.random_where
        if why:
            raise SpecError(f"{e.func}() cannot stand here: {why}", e.span,
                            hint="draw in a per-parameter statement of the step, e.g. 'z = randn()'")
        self.draws += 1
        return ir.Op(e.func, (ir.Ref(ir.P0, e.span), ir.Const(float(self.draws - 1), e.span)), e.span)

    def kind_of(self, e: ir.Expr) -> str:
        if isinstance(e, ir.Const):
            return ir.SCALAR
        if isinstance(e, ir.Ref):
            return self.kind.get(e.name, ir.SCALAR)
        if e.op in TABLE and TABLE[e.op].reduction:
            return ir.SCALAR
        return ir.TENSOR if any(self.kind_of(a) == ir.TENSOR for a in e.args) else ir.SCALAR

    def shape_of(self, e: ir.Expr):
        """The value's shape (ir.FULL, ir.ALL, axes reduced, or None when not p's)."""
        return shape_check.written(e, self.shape)

    # ---- statements ----
    def statement(self, item: ast.Assign | ast.Block) -> None:
        if isinstance(item, ast.Assign):
            self.assign(item)
        elif item.kind == "repeat":
            self.repeat(item)
        else:
            self.every(item)

    def repeat(self, block: ast.Block) -> None:
        """A bounded loop is unrolled: its count is a whole number written in the spec, or a
        hyperparameter whose declared range bounds it (`repeat ns_steps {` with `in [0, 16]`):
        then every round past the range's lower bound is unrolled up to its upper bound and
        guarded, each value it assigns becoming where(count >= round, new, old). A loop counted by
        a hyperparameter whose body does matrix work is kept as a loop instead (see loop)."""
        if isinstance(block.arg, ast.Name) and self._keeps_loop(block):
            return self.loop(block)
        if isinstance(block.arg, ast.Name):
            low, count = self._repeat_bounds(block.arg)
        else:
            low = count = block.arg.value
            if not _whole_rounds(count):
                raise SpecError(f"'repeat' takes a whole number of rounds from 1 to {MAX_REPEAT}, got {count:g}",
                                block.arg.span, hint="write the count as a number, e.g. 'repeat 5 {'")
        size = _unrolled_size([block], self._repeat_tops())
        if low != count:  # guards: the names visible before the loop (all, once an unguarded round ran)
            targets = set(_targets(block.body))
            guards = len(targets if low else targets & set(self.version))
            size = int(count) * _unrolled_size(block.body, self._repeat_tops()) + int(count - low) * guards
        if len(self.eqns) + size > MAX_STATEMENTS:  # compile time grows with the statements unrolled
            raise SpecError(f"this 'repeat' unrolls to {size} statements, {len(self.eqns) + size} in all; "
                            f"a rule may have at most {MAX_STATEMENTS}", block.arg.span,
                            hint="use fewer rounds, or nest fewer loops" if low == count else
                                 f"lower the upper bound of '{getattr(block.arg, 'id', '')}''s range")
        self.unrolling += count > 1
        for round_ in range(1, int(count) + 1):
            before = dict(self.version)
            for item in block.body:
                self.statement(item)
            if round_ > low:  # a round the count may skip
                self.read.add(block.arg.id)
                due = ir.Op("ge", (ir.Ref(block.arg.id, block.arg.span), ir.Const(float(round_), block.arg.span)),
                            block.span)
                self._guard(block, before, due)
        self.unrolling -= count > 1

    def _keeps_loop(self, block: ast.Block) -> bool:
        """Whether a `repeat` counted by a hyperparameter is kept as a loop (optdsl/ir.py's loop-carried
        form), not unrolled to its range's bound: when its body does matrix work (the backends run it in
        Python, between kernels on the fused path), draws nothing (each round's draws would be the same
        draw) and sits in no other kept loop."""
        calls = [TABLE.get(c.func) for c in _calls(block.body)]
        return (not self.looping and any(f is not None and f.matrix for f in calls)
                and not any(f is not None and f.random for f in calls))

    def loop(self, block: ast.Block) -> None:
        """`repeat COUNT { ... }` as a loop: COUNT rounds of the body (none when COUNT <= 0, as Python's
        range), in the loop-carried form of optdsl/ir.py. Each name the body assigns that was visible
        before it is carried from round to round; a local of the body alone is not visible after it."""
        name = block.arg
        decl = next((h for h in self.spec.hypers if h.name == name.id), None)
        if decl is None or name.id in self.computed or decl.flag or decl.choices or decl.optional:
            raise SpecError(f"the count of 'repeat' must be a number or a hyperparameter, not '{name.id}'",
                            name.span, hint=f"declare it as a whole number, e.g. 'hyper {name.id} = 5 in [0, 99]'")
        self.read.add(name.id)
        k = self.loops
        self.loops += 1
        starts = {}
        for j, n in enumerate(n for n in dict.fromkeys(_targets(block.body)) if n in self.version):
            old = self.ssa(n, self.version[n])
            value = ir.Op(ir.LOOP, (ir.Const(float(k)), ir.Const(float(j)), ir.Ref(name.id, name.span),
                                    ir.Ref(old, block.span)), block.span)
            starts[n] = self._define(n, value, self.kind[old], self.shape[old], block.span)
        before = dict(self.version)
        self.looping += 1
        self.unrolling += 1  # each value of the body gets a name: it runs as written, once per round
        for item in block.body:
            self.statement(item)
        self.unrolling -= 1
        self.looping -= 1
        for n in dict.fromkeys(_targets(block.body)):
            if n not in before:  # a local of the body alone: not visible after it, its names not reused
                self.retired[n] = self.version.pop(n)
        for n, start in starts.items():
            end = self.ssa(n, self.version[n])
            value = ir.Op(ir.LOOP_END, (ir.Ref(start, block.span), ir.Ref(end, block.span)), block.span)
            self._define(n, value, self.kind[start], self.shape[start], block.span)

    def _define(self, n: str, value: ir.Expr, kind: str, shape, span) -> str:
        """Append the next version of n, of this kind and shape; its SSA name."""
        self.version[n] += 1
        out = self.ssa(n, self.version[n])
        self.kind[out], self.shape[out] = kind, shape
        self.eqns.append(ir.Eqn(out, n, kind, value, span, self.unrolling > 0))
        return out

    def _repeat_tops(self) -> dict[str, int]:
        """The most rounds of each hyperparameter that may count a `repeat` (its range's upper bound)."""
        tops = {}
        for h in self.spec.hypers:
            if h.range is not None and not h.flag and not h.choices and not h.optional and h.hi_whole():
                tops[h.name] = h.hi_whole()
        return tops

    def _repeat_bounds(self, name: ast.Name) -> tuple[int, int]:
        """The fewest and most rounds a hyperparameter that counts a `repeat` may ask for."""
        decl = next((h for h in self.spec.hypers if h.name == name.id), None)
        hint = (f"declare it with a bounded range, e.g. 'hyper {name.id} = 5 in [0, 16]': the loop is "
                "unrolled up to the upper bound")
        if decl is None or name.id in self.computed:
            raise SpecError(f"the count of 'repeat' must be a number or a hyperparameter, not '{name.id}'",
                            name.span, hint=hint)
        if decl.flag or decl.choices or decl.optional or decl.range is None:
            raise SpecError(f"'{name.id}' counts a 'repeat' but has no range to bound it", name.span, hint=hint)
        top = decl.hi_whole()
        if not top or top > MAX_REPEAT:
            raise SpecError(f"'{name.id}' counts a 'repeat', so its range {decl.range} must end at a whole "
                            f"number from 1 to {MAX_REPEAT}", decl.range.span, hint=hint)
        r = decl.range
        low = max(0, math.ceil(r.lo) if r.lo_closed or r.lo != math.ceil(r.lo) else int(r.lo) + 1)
        return min(low, top), top

    def every(self, block: ast.Block) -> None:
        """Periodic work: each value the block assigns becomes where(t % k == 0, new, old)."""
        period = self.expr(block.arg)
        if self.kind_of(period) != ir.SCALAR or self._reads_step_values(period):
            raise SpecError("the period of 'every' must be a number or a hyperparameter", block.arg.span,
                            hint="write e.g. 'every k {' with 'hyper k = 5 in [1, inf)'")
        before = dict(self.version)
        for item in block.body:
            self.statement(item)
        due = ir.Op("eq", (ir.Op("mod", (ir.Ref("t", block.span), period), block.span), ir.Const(0.0)), block.span)
        self._guard(block, before, due)

    def _guard(self, block: ast.Block, before: dict[str, int], due: ir.Expr) -> None:
        """Each value a block assigned becomes where(due, new, old); a local of the block alone is
        not visible after it."""
        for n in dict.fromkeys(_targets(block.body)):
            if n not in before:  # a local of the block alone: not visible after it, its names not reused
                self.retired[n] = self.version.pop(n)
                continue
            value = ir.Op("where", (due, ir.Ref(self.ssa(n, self.version[n])), ir.Ref(self.ssa(n, before[n]))),
                          block.span)
            self.version[n] += 1
            out = self.ssa(n, self.version[n])
            self.kind[out] = self.kind_of(value)
            self.shape[out] = self.shape[self.ssa(n, self.version[n] - 1)]
            if self.ssa(n, self.version[n] - 1) in self.via_matrix:
                self.via_matrix.add(out)
            self.eqns.append(ir.Eqn(out, n, self.kind[out], value, block.span, self.unrolling > 0))

    def _a_number(self, e: ir.Expr) -> bool:
        """Whether SymPy reads e, after the statements so far, as a number (x - x + 1)."""
        from .sym import to_sympy  # sym imports this module

        class Names(dict):
            def __missing__(self, name):
                return sympy.Symbol(name)

        env = Names()
        try:
            for eq in self.eqns:
                env[eq.out] = to_sympy(eq.expr, env)
            return bool(to_sympy(e, env).is_Number)
        except (SpecError, TypeError, ValueError, KeyError):
            return False

    def _reads_step_values(self, e: ir.Expr) -> bool:
        if isinstance(e, ir.Ref):
            return e.name not in self.hypers
        return isinstance(e, ir.Op) and any(self._reads_step_values(a) for a in e.args)

    def assign(self, a: ast.Assign) -> None:
        n = a.target
        if len(self.eqns) >= MAX_STATEMENTS:  # as for an unrolled repeat: compile time grows with them
            raise SpecError(f"more than {MAX_STATEMENTS} statements in one rule (loops unrolled)", a.span,
                            hint="split the work into fewer, larger statements (the largest shipped rule has 23)")
        if n in self.computed:
            raise SpecError(f"'{n}' is a group value: only a group statement assigns it", a.target_span,
                            hint=f"write 'group {n} = ...' above the per-parameter statements, or assign a "
                                 f"local, e.g. '{n}_p = ...'")
        if n in self.hypers:
            raise SpecError(f"cannot assign the hyperparameter '{n}'", a.target_span,
                            hint="hyperparameters are read-only; assign a local instead, e.g. "
                                 f"'{n}_eff = ...'")
        if n in ("t", "loss") or n in ir.SHAPE_BUILTINS:
            raise SpecError(f"cannot assign the built-in '{n}'", a.target_span,
                            hint=f"'{n}' is read-only; assign a local with another name")
        if n in self.fed:
            raise SpecError(f"cannot assign the input '{n}'", a.target_span,
                            hint="an input is set by the training loop (optimizer.feed); assign a local instead")
        if n in TABLE:
            raise SpecError(f"cannot assign '{n}': it is a function", a.target_span,
                            hint=f"choose another name, e.g. '{n}_'")
        if keyword.iskeyword(n):
            raise SpecError(f"'{n}' is reserved and cannot be assigned", a.target_span,
                            hint=f"choose another name, e.g. '{n}_'")
        if n == "inf":  # the grammar reads every later `inf` as the number: the local would never be read
            raise SpecError("'inf' is the number infinity and cannot be assigned", a.target_span,
                            hint="choose another name, e.g. 'inf_'")
        value = self.expr(a.value)
        if a.op != "=":
            if n not in self.version:
                raise SpecError(f"'{n}' is updated with '{a.op}' before it is assigned", a.target_span,
                                hint=f"assign '{n} = ...' first, or declare 'state {n}'")
            old = ir.Ref(self.ssa(n, self.version[n]), a.target_span)
            self.read.add(n)
            value = ir.Op(a.op[0], (old, value), a.span)
        version = self.version.get(n, self.retired.get(n, 0)) + 1
        self.version[n] = version
        out = self.ssa(n, version)
        kind = self.kind_of(value)
        shape = self.shape_of(value)
        want = self.declared.get(n)
        if shape is None and self._via_matrix(value):
            self.via_matrix.add(out)  # matrix work: optdsl/shapes.py knows its sizes and checks the assignment
        elif want is not None and want != ir.FULL and shape != want and shape != ir.ALL:
            decl = next(s for s in self.spec.states if s.name == n)
            raise SpecError(f"state '{n}' is declared ': {decl.shape}' but this value is "
                            f"{ir.shape_text(shape)}", a.span,
                            hint="reduce the value to the state's shape (norm, mean, row_mean, col_mean, ...) "
                                 "or declare the state without a shape")
        if n in self.declared and want == ir.ALL:
            kind = ir.SCALAR
        self.shape[out] = ir.FULL if n == "p" else shape if want is None else want
        self.kind[out] = kind
        self.eqns.append(ir.Eqn(out, n, kind, value, a.span, self.unrolling > 0))

    def _via_matrix(self, e: ir.Expr) -> bool:
        """Whether e reads matrix work (a product, a matrix state, a value made from one)."""
        if isinstance(e, ir.Ref):
            return e.name in self.via_matrix
        if isinstance(e, ir.Op):
            row = TABLE.get(e.op)
            return (row is not None and row.matrix) or any(self._via_matrix(a) for a in e.args)
        return False

    def run(self) -> ir.Program:
        spec = self.spec
        states = []
        init_names = {"p"} | self.hypers
        for s in spec.states:
            square = (s.shape in ir.MATRIX_STATES or len(set(ir.matrix_dims(s.shape) or ())) == 1
                      or (ir.axis_kind(s.shape) or ("",))[0] in ("gram", "factor"))
            allowed = init_names | ({ir.EYE} if square else set())
            init = self.expr(s.init, allowed=allowed) if s.init is not None else None
            diag = rule_condition(s.diag, spec) if s.diag is not None else None  # a factor's kind (optdsl/axes.py)
            states.append(ir.State(s.name, init, s.span, s.shape, s.name in self.fed, key=s.key, eager=s.eager,
                                   diag=diag))
        self.read -= self.states  # reading p in an initial value does not use a state
        self.read |= self.group_reads
        for a in spec.body:
            self.statement(a)
        if self.version["p"] == 0:
            raise SpecError(f"'{spec.name}' never assigns p, so it would never update a parameter",
                            spec.name_span, hint="add an update such as 'p -= lr * g'")
        assigned = {e.target for e in self.eqns}
        for s in spec.states:
            if s.name in self.fed:  # an input a rule has no use for: the training loop may still feed it
                continue
            if s.name not in self.read and s.name not in assigned:
                raise SpecError(f"state '{s.name}' is declared but never used", s.span,
                                hint=f"use '{s.name}' in the update or remove it from the 'state' line")
            if s.name not in self.read:
                self.warnings.append(SpecWarning(
                    f"state '{s.name}' is written but never read: it cannot change the update", s.span,
                    hint="read it in an update, or drop it to save memory"))
        for h in spec.hypers:
            if h.name not in self.read and not h.only:  # an `only` keyword is there for torch.optim's sake
                self.warnings.append(SpecWarning(f"hyperparameter '{h.name}' is never used", h.span,
                                                 hint="use it or remove it"))
        last_reads = self._local_reads()
        for eq in self.eqns:
            if eq.target not in self.version or eq.target in ("p", "g") or eq.target in self.states:
                continue
            if eq.out not in last_reads:
                self.warnings.append(SpecWarning(f"'{eq.target}' is assigned here but this value is never read",
                                                 eq.span, hint="remove the assignment or use the value"))
        outputs = (("p", self.ssa("p", self.version["p"])),) + tuple(
            (s.name, self.ssa(s.name, self.version[s.name])) for s in spec.states)
        hypers = tuple(ir.Hyper(h.name, h.default,
                                *((h.range.lo, h.range.hi, h.range.lo_closed, h.range.hi_closed)
                                  if h.range else (0.0, 1.0, True, True) if h.flag
                                  else (float("-inf"), float("inf"), False, False)), span=h.span,
                                keyword=h.keyword, flag=h.flag, only=h.only,
                                optional=h.optional, choices=h.choices, count=h.count)
                       for h in spec.hypers)
        return ir.Program(spec.name, spec.doc, hypers, tuple(states), tuple(self.eqns), outputs,
                          self.uses_loss)

    def _local_reads(self) -> set[str]:
        reads: set[str] = set()

        def walk(e: ir.Expr) -> None:
            if isinstance(e, ir.Ref):
                reads.add(e.name)
            elif isinstance(e, ir.Op):
                for x in e.args:
                    walk(x)
        for eq in self.eqns:
            walk(eq.expr)
        return reads


def _keywords(spec: ast.Spec, named: bool = False) -> tuple[ir.Keyword, ...]:
    """The constructor's keywords, in declaration order, a tuple where its first member stands;
    () for a spec that names none of its interface (its keywords are its hyperparameters)."""
    named = named or spec.tuples or any(h.keyword or h.flag or h.only or h.optional or h.choices
                                                    for h in spec.hypers) or any(
        s.key or s.eager for s in spec.states)
    if not named:
        return ()
    hypers = {h.name: h for h in spec.hypers}
    owner: dict[str, ast.HyperTuple] = {}
    for tup in spec.tuples:
        for member, span in zip(tup.members, tup.member_spans):
            if member not in hypers:
                hint = _did_you_mean(member, hypers)
                raise SpecError(f"'{member}' in the tuple '{tup.keyword}' is not a hyperparameter", span,
                                hint=hint or f"declare it first, e.g. 'hyper {member} = 0.9 in [0, 1)'")
            if member in owner:
                where = "twice" if owner[member] is tup else f"already in '{owner[member].keyword}'"
                raise SpecError(f"'{member}' is passed {where}", span,
                                hint="a hyperparameter belongs to one tuple keyword at most")
            if hypers[member].keyword:
                raise SpecError(f"'{member}' has its own keyword '{hypers[member].keyword}', so it cannot "
                                f"also be passed in '{tup.keyword}'", span,
                                hint=f"remove 'as {hypers[member].keyword}' or take it out of the tuple")
            owner[member] = tup
    keywords, seen = [], {}  # public name or alias -> where it is declared

    def claim(name: str, span: Span, what: str) -> None:
        if keyword.iskeyword(name) or name in RESERVED or name in CONSTRUCTOR_NAMES:
            raise SpecError(f"'{name}' is reserved and cannot be a keyword", span,
                            hint="the generated constructor uses it itself; choose another name")
        if _python_special(name):
            raise SpecError(f"'{name}' cannot be a keyword", span,
                            hint=f"{_SPECIAL_HINT}; choose another name, e.g. '{name.lstrip('_')}'")
        if name in seen:
            raise SpecError(f"'{name}' would name two keywords ({seen[name]} and {what})", span,
                            hint="a keyword, and a hyperparameter's own name when it is passed under "
                                 "another, must each be unique")
        seen[name] = what

    for h in spec.hypers:  # a hyperparameter passed under another name stays accepted under its own
        if h.keyword or h.name in owner:
            claim(h.name, h.span, f"the alias of '{h.name}'")
    for h in spec.hypers:
        tup = owner.get(h.name)
        if tup is None:
            public = h.keyword or h.name
            claim(public, h.keyword_span or h.span, f"'{h.name}'")
            keywords.append(ir.Keyword(public, (h.name,)))
        elif h.name == tup.members[0]:
            claim(tup.keyword, tup.span, f"the tuple of {', '.join(tup.members)}")
            keywords.append(ir.Keyword(tup.keyword, tup.members, is_tuple=True))
    return tuple(keywords)


def _check_keys(spec: ast.Spec) -> None:
    """Each state's key in state_dict() (`as KEY`, else its name): its own, not 'step', and not another
    state's name (load_state_dict reads a state_dict saved under the spec's names too, so
    `state m as v, v as m` would swap the two states on load)."""
    keys: dict[str, ast.State] = {}
    names = {s.name: s for s in spec.states}
    for s in spec.states:
        key = s.key or s.name
        if key == "step" or not key.isidentifier():
            raise SpecError(f"'{key}' cannot be a state's key", s.key_span or s.span,
                            hint="state_dict() keeps the step count under 'step'; choose another key")
        if key in keys:
            raise SpecError(f"states '{keys[key].name}' and '{s.name}' are both saved as '{key}'",
                            s.key_span or s.span, hint="give each state its own key with 'as KEY'")
        if key in names and names[key] is not s:
            raise SpecError(f"state '{s.name}' is saved as '{key}', the name of another state", s.key_span or s.span,
                            hint=f"a state_dict saved under the spec's names would load '{key}' into "
                                 f"'{s.name}'; choose a key that names no other state")
        keys[key] = s


# Keys of a param_group that are not the spec's keywords: the parameters, torch.optim's flags, the
# mode code's, and what torch's LR schedulers add.
GROUP_KEYS = {"params", "train_mode", "initial_lr"} | CONSTRUCTOR_NAMES


def _check_group_keys(spec: ast.Spec, keywords: tuple[ir.Keyword, ...]) -> None:
    """A group state lives in its param_group under its name, beside the keywords: a name one of them
    has would be overwritten by the other (a tuple keyword `betas` and `state betas: group`)."""
    taken = {k.name: "a keyword of the constructor" for k in keywords}
    taken.update((k, "a key torch.optim or its LR schedulers keep in each param_group") for k in GROUP_KEYS)
    for s in spec.states:
        if s.shape == "group" and s.name in taken:
            raise SpecError(f"the group state '{s.name}' is kept in each param_group under its name, but "
                            f"'{s.name}' is {taken[s.name]} there", s.span, hint=f"rename the state, e.g. '{s.name}_'")


MAX_REPEAT = 64
MAX_STATEMENTS = 128  # statements of a rule once its loops are unrolled: compiles in under 2 s
MAX_STATES = 64       # states of a spec, all rules together: 60 compile in about 1 s (5,000 statements took 35 s)
MAX_HYPERS = 128      # hyperparameters, each read: 128 compile in 0.4 s, 256 in 1.1 s (60,000 took 328 s)
# Every rule is checked, planned and printed on its own, so a spec's compile time grows with its rules and
# their statements together. A state-list rule unrolls to a rule per rank and one refusing the ranks past
# them (optdsl/axes.py: MAX_RANK + 1 = 9), so several of them, or many written rules, made a legal-looking
# spec take minutes: at most these, refusals included.
MAX_RULES = 64
MAX_SPEC_STATEMENTS = 1536  # statements over all rules, loops unrolled


def _whole_rounds(count: float) -> bool:
    """Whether a repeat count is a whole number from 1 to MAX_REPEAT (compared first: int() of
    1e400, an infinity, raises)."""
    return 1 <= count <= MAX_REPEAT and count == int(count)


def _unrolled_size(body, tops: dict[str, int]) -> int:
    """How many equations a body makes once its loops are unrolled (an `every`, or a round of a
    `repeat` a hyperparameter counts, adds one per name); tops: the most rounds of each such count."""
    size = 0
    for item in body:
        if isinstance(item, ast.Assign):
            size += 1
        elif item.kind == "repeat" and isinstance(item.arg, ast.Name):
            size += tops.get(item.arg.id, 0) * (_unrolled_size(item.body, tops) + len(set(_targets(item.body))))
        elif item.kind == "repeat":
            size += int(item.arg.value) * _unrolled_size(item.body, tops) if _whole_rounds(item.arg.value) else 0
        else:
            size += _unrolled_size(item.body, tops) + len(set(_targets(item.body)))
    return size


def _calls(body):
    """Every function call in a body, blocks and nested calls included."""
    def walk(e):
        if isinstance(e, ast.Call):
            yield e
            for a in e.args:
                yield from walk(a)
        elif isinstance(e, ast.BinOp):
            yield from walk(e.left)
            yield from walk(e.right)
        elif isinstance(e, ast.Neg):
            yield from walk(e.operand)
    for item in body:
        if isinstance(item, ast.Assign):
            yield from walk(item.value)
        else:
            yield from walk(item.arg)
            yield from _calls(item.body)


def _targets(body):
    """Every name a body assigns, blocks included, in order."""
    for item in body:
        if isinstance(item, ast.Assign):
            yield item.target
        else:
            yield from _targets(item.body)


def lower(spec: ast.Spec, named: bool = False) -> tuple[ir.Program, list[SpecWarning]]:
    """Resolve names and build the SSA program; raises SpecError on the first problem.
    named: the spec names its interface elsewhere (a saved key in another rule)."""
    if spec.rules:
        raise SpecError("this spec has rules: lower it with lower_rules", spec.name_span)
    # An input is a scalar state the step reads and never writes; the training loop sets it.
    spec = replace(spec, states=spec.states + tuple(
        ast.State(i.name, ast.Num(i.default, i.span), i.span, "scalar") for i in spec.inputs))
    _check_declarations(spec)
    _check_keys(spec)
    keywords = _keywords(spec, named)
    _check_group_keys(spec, keywords)
    if not group.has_group(spec):
        lowering = _Lowering(replace(spec, modes=()))
        program = replace(lowering.run(), keywords=keywords)
        return replace(program, modes=modes.lower_modes(spec, _Lowering, program)), lowering.warnings
    phase, rest, grouping = group.lower_group(spec, RESERVED)
    lowering = _Lowering(replace(rest, modes=()), {n for n, _ in phase.values}, set(phase.reads))
    program, warnings = group.finish(phase, replace(lowering.run(), keywords=keywords), lowering.read, grouping,
                                     lowering.warnings)
    return replace(program, modes=modes.lower_modes(rest, _Lowering, program)), warnings


def lower_rules(spec: ast.Spec) -> tuple[list[tuple[ir.Expr | None, ir.Program]], list[SpecWarning]]:
    """One program per rule, each with its condition on the parameter's shape (None: any).

    A spec without rules is one rule that takes every parameter.
    """
    refusing = [r for r in spec.rules if r.refuse is not None]
    rules = tuple(r for r in spec.rules if r.refuse is None) or (ast.Rule(None, spec.states, spec.body, spec.name_span),)
    if refusing and not spec.body and not any(r.refuse is None for r in spec.rules):
        raise SpecError("every rule of this spec refuses its parameters, so it updates none", refusing[0].span,
                        hint="add a rule with statements, e.g. 'rule { p -= lr * g }' last")
    last = next((i for i, r in enumerate(spec.rules) if r.cond is None), None)
    late = [r for i, r in enumerate(spec.rules) if last is not None and i > last]
    if late and late[0].refuse is not None:
        raise SpecError("a rule without a condition takes every parameter, so this refusal never applies",
                        late[0].span, hint="put the 'refuse' rule above the rule without a condition")
    keys: dict[str, ast.State] = {}  # a state's name -> its declaration with a key, across the rules
    for rule in spec.rules:
        for s in rule.states:
            if s.eager:  # which rule a parameter takes is known at its step, not at construction
                raise SpecError(f"'{s.name}' is a rule's state, so it cannot be 'eager'", s.span,
                                hint="eager states are for specs without rules; remove it")
            other = keys.setdefault(s.name, s)
            if (other.key or s.name) != (s.key or s.name):  # one name, one key, whichever rule made it
                raise SpecError(f"state '{s.name}' is saved as '{s.key or s.name}' here and as "
                                f"'{other.key or s.name}' in another rule", s.key_span or s.span,
                                hint="give a state of the same name the same 'as KEY' in every rule")
    if len(spec.rules) > MAX_RULES:  # the first rule past the limit (an unrolled rule: its state-list rule)
        unrolled = sum(r.unrolled is not None for r in spec.rules)
        raise SpecError(f"{len(spec.rules)} rules" + (f" once state lists are unrolled ({unrolled} from state lists: "
                        "one per rank)" if unrolled else "")
                        + f"; a spec may have at most {MAX_RULES}", spec.rules[MAX_RULES].span,
                        hint="a state list unrolls to a rule per rank: give its rule a condition on ndim that keeps "
                             "fewer ranks, or use fewer state lists" if unrolled else
                        "merge rules that do the same work (a condition can hold for several shapes), "
                        "or split the spec into several optimizers")
    # a key in any rule makes the class a drop-in: every rule then has the same interface
    named = any(s.key for rule in spec.rules for s in rule.states)
    out, warnings, unused = [], [], []
    total = 0
    for i, rule in enumerate(rules):
        if rule.cond is None and i < len(rules) - 1:
            raise SpecError("a rule without a condition takes every parameter, so the rules after it never run",
                            rule.span, hint="put the rule without a condition last")
        program, found = lower(replace(spec, states=rule.states, body=rule.body, rules=()), named=named)
        total += len(program.eqns)
        if total > MAX_SPEC_STATEMENTS:  # compile time grows with the statements of all rules together
            raise SpecError(f"the rules have {total} statements up to this one (loops and state lists unrolled); "
                            f"a spec may have at most {MAX_SPEC_STATEMENTS} over all its rules", rule.span,
                            hint="share work between rules (fewer, more general rules), or shorten the loops")
        hyper = [w for w in found if w.message.startswith("hyperparameter '")]
        unused.append({w.message: w for w in hyper})
        warnings += [w for w in found if w not in hyper]
        out.append((rule_condition(rule.cond, spec), program))
    read = {f"hyperparameter '{n.id}' is never used" for rule in spec.rules + rules for n in _names(rule.cond)}
    common = set.intersection(*(set(u) for u in unused)) - read  # a hyperparameter no rule (or condition) reads
    warnings += [w for m, w in unused[0].items() if m in common]
    return out, warnings


def refusals(spec: ast.Spec) -> list[tuple[int, ir.Expr, str, Span]]:
    """`rule COND refuse "why"`: per refusing rule, how many updating rules come before it (a parameter
    one of those takes is not refused), its condition, its text and where it stands."""
    out, before = [], 0
    for rule in spec.rules:
        if rule.refuse is None:
            before += 1
        else:
            out.append((before, rule_condition(rule.cond, spec), rule.refuse, rule.span))
    return out


def _names(e):
    """The names an expression reads (a rule's condition; None reads none)."""
    if isinstance(e, ast.Name):
        yield e
    for child in (getattr(e, "args", ()) or ()) + tuple(
            x for x in (getattr(e, "left", None), getattr(e, "right", None), getattr(e, "operand", None)) if x):
        yield from _names(child)


def rule_condition(cond: ast.Expr | None, spec: ast.Spec) -> ir.Expr | None:
    if cond is None:
        return None
    allowed = set(ir.SHAPE_BUILTINS) | set(ir.AXIS_SIZES) | {h.name for h in spec.hypers}

    for n in _names(cond):
        if n.id not in allowed:
            raise SpecError(f"a rule's condition cannot read '{n.id}'", n.span,
                            hint="it is decided per parameter from its shape (ndim, numel, nrows, ncols) "
                                 "and the hyperparameters")
    lowering = _Lowering(replace(spec, states=(), body=(), rules=()))
    lowering.random_where = "a rule's condition picks the rule by the parameter's shape"
    return lowering.expr(cond)
