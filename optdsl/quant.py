"""Low-bit optimizer states (state_dtype "int8", "int4"): the formats, their level maps, and the
code each state gets from the range the checker proves.

A state of a parameter stored at low bit is split into blocks of BLOCK[fmt] numbers; each block
keeps its largest |x| as a float32 scale and each number the index (its code) of the level
nearest x / scale in the format's map. Tensors of fewer than MIN_NUMEL numbers stay in float32,
as bitsandbytes does (the scales and the rounding would cost more than they save there).

The maps, by (format, signed):
  int8  the dynamic (companded) map of bitsandbytes' create_dynamic_map (Dettmers 2015, 2022):
        seven decades of levels, finer near zero, signed (both sides of 0) or unsigned (one).
  int4  signed: the dynamic map at 4 bits (three decades, torchao's choice for the first moment);
        unsigned: LINEAR4 says which, linear without zero (torchao's, after Li et al. 2023: a
        second moment rounded to zero makes m / (sqrt(v) + eps) explode) or dynamic; bench/
        lowbit_quality.py measured both on charlm (bench/results/lowbit_quality.json).

A state whose range is proven non-negative (Adam's v in [0, inf)) gets the unsigned map, whose
levels are all >= 0: with a scale >= 0 it never dequantises negative, and it spends all its levels
on one side. Every other state gets the signed map. The generated modules print these maps
(templates/lowbit.py.j2); this module is where they are decided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import ir

MIN_NUMEL = 4096                       # smaller states stay float32
BLOCK = {"int8": 2048, "int4": 256}    # numbers per scale: 8-bit as bitsandbytes; 4-bit twice torchao's 128 (1.03 B/param for AdamW)
BITS = {"int8": 8, "int4": 4}
SCALE_BYTES = 4                        # one float32 per block
LINEAR4 = True                         # unsigned int4: linear without zero (measured; see above)
# what state_dtype accepts beside None and torch.bfloat16: the format, and whether it rounds
# stochastically (from the optimizer's own generator) or to the nearest level
STATE_DTYPES = {"int8": ("int8", False), "int4": ("int4", False),
                "int8_stochastic": ("int8", True), "int4_stochastic": ("int4", True)}


def dynamic_map(signed: bool, bits: int, exponent_bits: int) -> list[float]:
    """bitsandbytes' create_dynamic_map: for each of `exponent_bits` decades 10^-k the midpoints
    of an even split of [0.1, 1] (finer in higher decades), then 0 and 1; float32, sorted."""
    data: list[float] = []
    fraction_bits = bits - 1 - exponent_bits  # 0 for the maps used here
    for i in range(exponent_bits):
        items = 2 ** (i + fraction_bits + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        decade = np.float32(10.0 ** (-(exponent_bits - 1) + i))
        data += [float(x) for x in decade * means]
        if signed:
            data += [float(-x) for x in decade * means]
    data += [0.0, 1.0]
    assert len(data) == 2 ** bits
    return sorted(float(np.float32(x)) for x in data)


def linear_map(bits: int) -> list[float]:
    """Unsigned, without zero: k / 2^bits for k = 1 .. 2^bits (torchao's 4-bit second moment)."""
    n = 2 ** bits
    return [float(np.float32(k / n)) for k in range(1, n + 1)]


LEVELS = {
    ("int8", True): dynamic_map(True, 8, 7),
    ("int8", False): dynamic_map(False, 8, 7),
    ("int4", True): dynamic_map(True, 4, 3),
    ("int4", False): linear_map(4) if LINEAR4 else dynamic_map(False, 4, 3),
}
MAP_NAMES = {("int8", True): "signed dynamic", ("int8", False): "unsigned dynamic", ("int4", True): "signed dynamic",
             ("int4", False): "unsigned linear (no zero)" if LINEAR4 else "unsigned dynamic"}


def float32_code(x: float) -> str:
    """The shortest literal that reads back as this float32 (0.0325, not 0.032499998807907104)."""
    return str(np.float32(x))


def worst_error(levels: list[float], signed: bool) -> float:
    """The largest |x - nearest level| over x in [-1, 1] (signed) or [0, 1]: half the widest gap
    between neighbours, or the distance from an end of the interval to the outermost level."""
    gaps = [(b - a) / 2 for a, b in zip(levels, levels[1:])]
    ends = [levels[0] - (-1.0 if signed else 0.0), 1.0 - levels[-1]]
    return max(gaps + ends)


def stored_bytes(numel: int, fmt: str | None, local: int | None = None) -> int:
    """Bytes a float state of `numel` numbers takes in format `fmt` (None: float32); with `local`,
    what one rank keeps of it under FSDP2, `local` being the numbers of the largest shard: at low
    bit every rank keeps as many rows of codes as that shard needs (blocks laid over each shard,
    the stored tensor split evenly: templates/lowbit.py.j2's _sharded_codes), whether the state is
    quantised being decided by the whole state's size."""
    if fmt is None or numel < MIN_NUMEL:
        return 4 * (numel if local is None else local)
    blocks = math.ceil((numel if local is None else local) / BLOCK[fmt])
    return blocks * (BLOCK[fmt] * BITS[fmt] // 8 + SCALE_BYTES)


def width(fmt: str) -> int:
    """Bytes per row of a stored state: one block's codes, then its scale."""
    return BLOCK[fmt] * BITS[fmt] // 8 + SCALE_BYTES


# Matrix states (a Gram matrix per axis, its inverse root, its eigenbasis: Shampoo's L, R, Li, Ri, SOAP's
# GL, GR, QL, QR, Kron's factors; ir.needs_whole) of MIN_NUMEL numbers or more are quantised like every
# other float state, block by block over the matrix's rows. Decided by measurement, not by default:
# bench/lowbit_matrix.py (bench/results/lowbit_matrix.md) ran Shampoo and SOAP at int8 with them
# quantised against float32 states on charlm and the small GPT: held-out loss -2.37% .. +1.33% of
# float32's (Shampoo charlm +1.33%, GPT -2.37% but train loss +9%; SOAP -2.14%, -1.67%), at a quarter
# of the bytes (GPT: 8.9 against 33.8 B per parameter for Shampoo, 10.0 against 37.8 for SOAP). They
# are nearly all of these optimizers' state, so keeping them float32 would keep nearly all the memory.
MATRIX_LOWBIT = True
MATRIX_WHY = ("measured in bench/results/lowbit_matrix.md: Shampoo/SOAP int8 held-out loss -2.4%..+1.3% of "
              "float32 states' at 1/4 the bytes")


@dataclass(frozen=True)
class Code:
    signed: bool
    why: str


def codes(prog: ir.Program) -> dict[str, Code]:
    """The code of each float state (bool states are not quantised): unsigned where the checker
    proves the state non-negative, signed otherwise (and wherever the proof cannot be run)."""
    return dict(_codes(prog))  # each backend asks it of each rule


@ir.per_program
def _codes(prog: ir.Program) -> dict[str, Code]:
    from .check import _Ranges  # the checker's induction over steps; imported here, it imports the IR

    floats = [s for s in prog.states if s.shape != "bool"]
    try:
        ranges = _Ranges(prog)
        ranges.prove_states()
        proven = {s.name: ranges.env[ranges.symbols[ir.ssa_name(s.name, 0)]] for s in floats}
    except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError, RecursionError) as err:
        why = f"signed: its range is not proven ({type(err).__name__} in the interval analysis)"
        return {s.name: Code(True, why + (f"; a matrix state, quantised as the others: {MATRIX_WHY}"
                                          if ir.needs_whole(s.shape) else "")) for s in floats}
    out = {}
    for s in floats:
        r = proven[s.name]
        out[s.name] = (Code(False, f"unsigned: proven in {r}") if r.nonnegative else
                       Code(True, f"signed: proven only in {r}"))
        if ir.needs_whole(s.shape):
            out[s.name] = Code(out[s.name].signed, f"{out[s.name].why}; a matrix state, quantised as the others "
                                                   f"(blocks over its rows): {MATRIX_WHY}")
    return out
