"""The instructions of a step on the torch paths (optdsl/backends/tensor_ops.py makes them from a
plan): what each computes, and what it binds, reads and writes in place, which the decisions on
their order (optdsl/backends/schedule.py) read and the printers (optdsl/backends/torch.py) print.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import functions as fn
from .. import ir
from ..sym import TENSOR


@dataclass(frozen=True)
class Operand:
    code: str
    level: int  # GROUP/PARAM/DEVICE scalars or TENSOR
    tensor_shape: frozenset | None = ir.FULL  # for a TENSOR: its shape (see ir.join)

    @property
    def tensor(self) -> bool:
        return self.level == TENSOR

    @property
    def shape(self):
        return self.tensor_shape if self.tensor else ir.ALL


@dataclass(frozen=True)
class Instr:
    op: str                     # torch method / foreach name, or "call", "reduce", "scalar", "copy",
                                # "branch", "bind" (`out` names = args) or "loop" (args[0] rounds of blocks[0])
    out: str                    # buffer written (the first operand's when in place)
    args: tuple[Operand, ...]
    inplace: bool = False
    value: Operand | None = None  # `alpha=` / `value=` scalar
    template: str = ""          # for "call"/"reduce"/"scalar": torch code with {0}, {1}, ...
    blocks: tuple = ()          # for "branch": the instructions of each branch; for "loop": of one round
    skip_zero: bool = False     # `out = a if value == 0 else a + value*b`
    row: fn.Function | None = None  # for "call"/"reduce": the function table's row it computes

    @property
    def whole(self) -> bool:
        """Whether it is a reduction, whole-tensor or over axes (the function table's row says): of a
        sharded parameter (a DTensor) a reduction over a split axis is each rank's part, which the
        printers make whole (the generated _whole: one all-reduce over the mesh)."""
        return self.row is not None and (self.row.reduction or bool(self.row.axis) or self.row.name in fn.SUMS_ALONG_AXIS)

    @property
    def binds(self) -> set[str]:
        """The names it binds (its blocks' too): not those of the tensors it writes in place."""
        own = set() if self.inplace or self.op == "copy" else {n.strip() for n in self.out.split(",")}
        return own.union(*(i.binds for block in self.blocks for i in block))  # a loop's bind: "x1, x2"

    @property
    def writes(self) -> set[str]:
        """The names of the tensors it writes in place (its blocks' too)."""
        own = {self.args[0].code} if self.inplace or self.op == "copy" else set()
        return own.union(*(i.writes for block in self.blocks for i in block))

    @property
    def reads(self) -> set[str]:
        """The values it reads (its blocks' too): its operands and scalar, each a name (a host
        expression of hyperparameters is one too: no instruction binds those)."""
        own = {a.code for a in self.args} | ({self.value.code} if self.value is not None else set())
        return own.union(*(i.reads for block in self.blocks for i in block))

    @property
    def fresh(self) -> bool:
        """Whether what it binds is new tensors: torch's out-of-place foreach ops and the reductions
        make them; another call (a view: .mT), a branch, a kept loop, a bind (x1 = x0) or a skipped
        addition (its operand itself) may return what it reads."""
        return (self.op not in ("call", "branch", "scalar", "copy", "bind", "loop") and not self.skip_zero
                or self.whole)
