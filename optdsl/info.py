"""Memory a spec keeps per parameter, for a given shape: `optdsl info SPEC --shape 4096x4096`.

The rule a parameter of that shape takes is decided by the generated code's own condition
(evaluated on a meta tensor, so nothing is allocated); each state's size follows from its
declared shape: like p, scalar, one per row or one per column, or an n x n or m x m matrix
per matrix (gram_rows, gram_cols), or an A x B one (`matrix(nrows, rank)`, its hyperparameter sizes at
their defaults, at most the matrix's smaller side), or per axis K of p: a d_K x d_K matrix (gram(K)) or
d_K numbers (axis(K)) for the whole tensor, or a state list's factor(K), either of the two as its condition
decides for this shape at the hyperparameters' defaults (shown "factor(K) diagonal" or "factor(K) matrix").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from . import ieee, ir, quant
from .pipeline import Compiled

# state_dtype as `optdsl info` reports it: the constructor's value -> what stored_bytes takes
_STATE_DTYPES = {"None": None, "torch.bfloat16": "bfloat16", '"int8"': "int8", '"int4"': "int4"}
_HOST_NAMES = {"math": math, "float": float, "min": min, "max": max, "abs": abs}
for _code in ieee.HELPERS.values():  # a rule's condition computes in IEEE 754 (_pow, ...), as the module does
    exec(_code, _HOST_NAMES)  # noqa: S102 - optdsl's own helpers
_HOST_NAMES["_machine_eps"] = lambda value, params: torch.finfo(params[0].dtype).eps if value is None else value


def state_numel(kind: str, shape: tuple[int, ...], sizes: dict | None = None, diag: bool = False) -> int:
    """How many numbers a state of this kind holds for a parameter of this shape; `sizes` gives the
    hyperparameters a `matrix(A, B)` state's sizes name (GaLore's rank), each at most min(nrows, ncols);
    `diag`: a factor(K) state made diagonal for this parameter."""
    axis = ir.axis_kind(kind)
    if axis is not None:  # gram(K): d_K x d_K for the tensor; axis(K): d_K; factor(K): either
        return shape[axis[1]] ** (1 if axis[0] == "axis" or (axis[0] == "factor" and diag) else 2)
    dims = ir.matrix_dims(kind)
    if dims is not None:  # an A x B matrix per matrix of p (its rules take rank >= 2)
        n, m = shape[-2], shape[-1]
        known = {"nrows": n, "ncols": m}
        a, b = (known.get(d) or min(int((sizes or {})[d]), n, m) for d in dims)
        return math.prod(shape[:-2]) * a * b
    if kind == "scalar":
        return 1
    if kind == "rows":
        return math.prod(shape[:-1])
    if kind == "cols":
        return math.prod(shape[:-2]) * (shape[-1] if shape else 1)
    if kind in ("gram_rows", "gram_cols"):  # a square matrix per matrix of p (its rules take rank >= 2)
        n = shape[-2] if kind == "gram_rows" else shape[-1]
        return math.prod(shape[:-2]) * n * n
    return math.prod(shape)


def state_shape(kind: str, shape: tuple[int, ...], sizes: dict | None = None, diag: bool = False) -> tuple[int, ...]:
    """The shape of a state of this kind for a parameter of this shape (optdsl/backends/printers.py's
    STATE_SHAPE_CODE; `sizes` and `diag` as state_numel's)."""
    axis = ir.axis_kind(kind)
    if axis is not None:
        form, k = axis
        if form == "factor":  # a state list's: its diagonal (d_K,) or the d_K x d_K matrix
            return shape[k:k + 1] * (1 if diag else 2)
        return shape[k:k + 1] * 2 if form == "gram" else (1,) * k + shape[k:k + 1] + (1,) * (len(shape) - k - 1)
    dims = ir.matrix_dims(kind)
    if dims is not None:
        n, m = shape[-2], shape[-1]
        known = {"nrows": n, "ncols": m}
        return shape[:-2] + tuple(known.get(d) or min(int((sizes or {})[d]), n, m) for d in dims)
    return {"scalar": (), "rows": shape[:-1] + (1,), "cols": shape[:-2] + (1,) + shape[-1:],
            "gram_rows": shape[:-1] + shape[-2:-1], "gram_cols": shape[:-2] + shape[-1:] * 2}.get(kind, shape)


def largest_shard(state: tuple[int, ...], shape: tuple[int, ...], shards: int) -> int:
    """The numbers the largest shard of a state holds when FSDP2 splits its parameter (of `shape`)
    by rows over `shards` ranks: a state keeping the parameter's first axis is split alike
    (torch.chunk's split: the first shard the largest), any other held whole by every rank."""
    if shards > 1 and shape and len(state) == len(shape) and state[0] == shape[0]:
        return -(-shape[0] // shards) * math.prod(state[1:])
    return math.prod(state)


@dataclass(frozen=True)
class Memory:
    shape: tuple[int, ...]
    rule: str                               # the condition of the rule taken ("" without rules)
    states: tuple[tuple[str, str, int], ...]  # (key in state_dict(), kind, numbers)
    shapes: tuple[tuple[int, ...], ...] = ()  # each state's shape

    @property
    def total(self) -> int:
        return sum(n for _, _, n in self.states)

    @property
    def bytes(self) -> int:
        """In float32 (and one byte per element of a bool state)."""
        return self.stored_bytes(None)

    def stored_bytes(self, state_dtype: str | None, shards: int = 1) -> int:
        """As stored with this state_dtype (None: float32, "bfloat16", or a low-bit format of
        optdsl/quant.py: codes plus scales); a bool state takes one byte per element. With shards > 1,
        what the rank holding the most keeps when FSDP2 splits the parameter by rows over that many."""
        def size(kind: str, n: int, shape: tuple[int, ...]) -> int:
            local = largest_shard(shape, self.shape, shards) if shards > 1 else None
            if kind == "bool":
                return n if local is None else local
            if state_dtype == "bfloat16":
                return 2 * (n if local is None else local)
            return quant.stored_bytes(n, state_dtype, local)
        return sum(size(kind, n, shape) for (_, kind, n), shape in zip(self.states, self.shapes or [()] * len(self.states)))


def memory(compiled: Compiled, shape: tuple[int, ...]) -> Memory:
    program, rule = compiled.program, ""
    p = torch.empty(shape, device="meta")
    hypers = {h.name: h for h in program.hypers}  # the group as the class holds it, under its keywords
    def value(name):  # a named choice as the group holds it: its text, the first choice
        h = hypers[name]
        return h.choices[0] if h.choices else h.default
    group = {h.name: value(h.name) for h in program.hypers} | {
        k.name: tuple(map(value, k.members)) if k.is_tuple else value(k.members[0]) for k in program.keywords}
    def holds(code):
        return code is None or eval(code, {**_HOST_NAMES, "p": p, "group": group})  # noqa: S307 - our own code
    if compiled.rules:

        def refuse(i):  # a refusing rule before rule i (or after the last) that takes p
            for before, code, why, cond, _ in compiled.refusals:
                if before == i and holds(code):
                    raise ValueError(f"{program.name} refuses a parameter of shape {shape} (rule {cond}): {why}")
        for i, (code, prog, _, shown) in enumerate(compiled.rules):
            refuse(i)
            if holds(code):
                program, rule = prog, shown or "every other parameter"
                break
        else:
            refuse(len(compiled.rules))
            raise ValueError(f"no rule of {program.name} takes a parameter of shape {shape}")
    sizes = {h.name: h.default for h in program.hypers}
    from .backends.torch import condition_code  # a factor's kind: the class's own condition, at the defaults
    diag = {s.name: bool(holds(condition_code(s.diag, program))) for s in program.states if s.diag is not None}
    states = tuple((s.saved_as, _kind(s.shape, diag.get(s.name)), state_numel(s.shape, shape, sizes, diag.get(s.name, False)))
                   for s in program.states)
    return Memory(tuple(shape), rule, states, tuple(state_shape(s.shape, tuple(shape), sizes, diag.get(s.name, False))
                                                    for s in program.states))


def _kind(kind: str, diag: bool | None) -> str:
    """A state's kind as info shows it: a factor(K) as the kind it takes for this parameter (a diagonal
    d_K, or a d_K x d_K matrix)."""
    return kind if diag is None else f"{kind} {'diagonal' if diag else 'matrix'}"


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if not all(re.fullmatch(r"[+-]?[0-9]+", x.strip()) for x in parts):  # ASCII digits: int() takes '৪' as 4
        raise ValueError(f"--shape expects sizes joined by 'x', e.g. 4096x4096, got {text!r}")
    shape = tuple(int(x) for x in parts)
    if any(n < 1 for n in shape):
        raise ValueError(f"--shape sizes must be positive, got {text!r}")
    if math.prod(shape) >= 2 ** 63:  # torch's sizes are int64: larger ones overflowed in torch.empty
        raise ValueError(f"--shape {text!r} has more than 2^63 elements, which no tensor holds")
    return shape


def report(compiled: Compiled, shape: tuple[int, ...], shards: int = 1) -> str:
    m = memory(compiled, shape)
    numel = math.prod(shape)
    lines = [f"{compiled.program.name}: a parameter of shape {'x'.join(map(str, shape))} ({numel:,} elements)"]
    if m.rule:
        lines.append(f"  rule taken: {m.rule}")
    for name, kind, n in m.states:
        lines.append(f"  state {name:<12} {('like p' if kind == 'full' else kind):<8} {n:>14,} numbers")
    named = sorted({d for _, kind, _ in m.states for d in ir.matrix_dims(kind) or () if d not in ir.MATRIX_SIZES})
    if named:  # GaLore's rank: the matrix states' sizes at the hyperparameters' defaults
        defaults = {h.name: h.default for h in compiled.program.hypers}
        lines.append("  (at the default " + ", ".join(f"{d} = {defaults[d]:g}" for d in named)
                     + ", at most the matrix's smaller side)")
    per = m.total / numel
    lines.append(f"  total state: {m.total:,} numbers = {m.bytes:,} B in float32 ({per:.4g} numbers per element),"
                 " plus the step count")
    stored = ", ".join(f"{name} {m.stored_bytes(dtype):,} B ({m.stored_bytes(dtype) / numel:.4g} B per element)"
                       for name, dtype in _STATE_DTYPES.items())
    lines.append(f"  stored with state_dtype: {stored}")
    if shards > 1:
        local = ", ".join(f"{name} {m.stored_bytes(dtype, shards):,} B" for name, dtype in _STATE_DTYPES.items())
        lines.append(f"  per rank under FSDP2 over {shards} ranks (split by rows; the rank holding the most): {local}")
        lines.append("  (int8/int4: blocks laid over each rank's shard; every rank keeps the rows of codes the largest "
                     "shard needs)")
    lines.append(f"  (int8/int4: codes plus one float32 scale per {quant.BLOCK['int8']} / {quant.BLOCK['int4']} numbers; "
                 f"states under {quant.MIN_NUMEL} numbers stay float32)")
    matrices = [name for name, kind, _ in m.states if ir.needs_whole(kind.split(" ")[0]) and not kind.endswith("diagonal")]
    if matrices:  # what quant.MATRIX_WHY says of them, and which are large enough to be quantised
        big = [name for name, kind, n in m.states if ir.needs_whole(kind.split(" ")[0]) and not kind.endswith("diagonal") and n >= quant.MIN_NUMEL]
        lines.append(f"  (matrix states {', '.join(matrices)}: at int8/int4 quantised as the other states"
                     + ("" if big == matrices else f", here {', '.join(big) or 'none'} (the others under {quant.MIN_NUMEL} numbers)")
                     + f"; {quant.MATRIX_WHY})")
    return "\n".join(lines)
