#!/usr/bin/env python
"""What each generated kernel costs per thread, read from its PTX: no GPU needed.

Triton compiles a kernel to PTX for an NVIDIA architecture on any machine (the LLVM backend ships
with it); only running it needs the GPU. This counts the kernel's PTX instructions (straight-line
code, except that with ALIGNED a load or store has two forms: unmasked for whole blocks, masked
for a tensor's last block; both are counted), and its global loads and stores by width:
``ld.global.v4.b32`` moves 16 bytes, ``ld.global.b32`` four. It is a static count of the code, not
a timing; bench/bench_gpu.py measures time on a GPU.

Run it from the repository root::

    python bench/ptx_count.py [--specs adamw,lion,sgd,lamb] [--arch 90] [--lowbit] [--registers] [--out bench/results]

Each kernel is compiled the way the launcher calls it for float32 parameters and states, bfloat16
parameters with float32 states, and bfloat16 states (stochastic rounding), with its tensors
aligned on 16 bytes (ALIGNED=True, as torch's allocator gives them) and not (ALIGNED=False).
With ``--lowbit`` also with int8 and int4 states (blocks and warps as the launcher picks them), with
``--registers`` the registers per thread and spilled bytes that ptxas (shipped with Triton) reports.
Results: ``<out>/ptx.json`` and ``<out>/ptx.md``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real @triton.jit kernels, compiled for the target below

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# The launcher's arguments by name (see optdsl/templates/triton_fused.py.j2), as Triton types.
_FIXED = {"numels": "*i64", "block_tensor": "*i32", "block_start": "*i64", "hypers": "*fp64",
          "seed": "i32", "shapes": "*fp64", "unit_rows": "*i64", "geometry": "*i64", "place_table": "*i64"}
CONFIGS = {  # name: (P_TYPE, S_TYPE, STOCHASTIC, low-bit format or None)
    "fp32": (tl.float32, tl.float32, False, None),
    "bf16 params": (tl.bfloat16, tl.float32, False, None),
    "bf16 states": (tl.float32, tl.bfloat16, True, None),
    "int8 states": (tl.float32, tl.float32, False, "int8"),
    "int4 states": (tl.float32, tl.float32, False, "int4"),
}
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(\.v[248])?\.b(\d+)")


def signature(kernel, p_type, s_type, stochastic, aligned, block, amp=False, bits=0, qblock=None):
    """The kernel's argument types and constexprs as the launcher passes them (bits, qblock: low-bit
    states' bits per code and numbers per scale; 0 for float states)."""
    types, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            constexprs[(index,)] = dict(P_TYPE=p_type, S_TYPE=s_type, F_TYPE=tl.uint8 if bits else s_type,
                                        C_TYPE=tl.float32, T_TYPE=tl.float32, STOCHASTIC=stochastic,
                                        ALIGNED=aligned, BLOCK=block, BITS=bits, QBLOCK=qblock or block,
                                        Q_STOCHASTIC=False, PLACED=False, SCALED=amp, CHECK_INF=amp)[name]
        elif name in _FIXED:
            types[name] = _FIXED[name]
        elif name.endswith("_ptrs"):
            types[name] = "*i64"
        else:  # accumulators of reductions, in the arithmetic dtype
            types[name] = "*fp32"
    return types, constexprs


def registers(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes, from the ptxas Triton ships (the newest of its two,
    which reads the PTX version Triton writes); {} where it cannot tell."""
    import subprocess
    import tempfile
    for name in ("ptxas-blackwell", "ptxas"):
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if not tool.exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            out = subprocess.run([str(tool), f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
        used = re.search(r"Used (\d+) registers", out)
        if used:
            spills = re.search(r"(\d+) bytes spill stores", out)
            return dict(registers=int(used.group(1)), spill_bytes=int(spills.group(1)) if spills else 0)
    return {}


def count(ptx: str) -> dict:
    lines = [x.strip() for x in ptx.splitlines()]
    instructions = [x for x in lines if x and not x.startswith(("//", ".", "$", "{", "}", ")", "("))]
    accesses = {}
    for op, vec, bits in _ACCESS.findall(ptx):
        width = int(bits) // 8 * (int(vec[2:]) if vec else 1)
        key = f"{op} {width}B"
        accesses[key] = accesses.get(key, 0) + 1
    return dict(instructions=len(instructions), accesses=dict(sorted(accesses.items())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="adamw,lion,sgd,lamb", help="modules of generated/")
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--amp", action="store_true", help="as a GradScaler calls them (grad_scale, found_inf)")
    ap.add_argument("--lowbit", action="store_true", help="also with int8 and int4 states")
    ap.add_argument("--registers", action="store_true", help="also registers per thread and spills (ptxas)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    records = []
    for spec in args.specs.split(","):
        module = importlib.import_module(f"generated.{spec}")
        func = module.__all__[1]  # the functional form's name: kernels are _<func>_<kernel>
        kernels = {name: k for name, k in vars(module).items()
                   if isinstance(k, triton.runtime.JITFunction) and name.startswith(f"_{func}_")}
        for name, kernel in sorted(kernels.items()):
            for config, (p_type, s_type, stochastic, fmt) in CONFIGS.items():
                if fmt and not (args.lowbit and "lowbit_maps" in [x.name for x in kernel.params]):
                    continue
                bits, qblock = module._LOWBIT[fmt] if fmt else (0, None)
                block = max(module._BLOCK, qblock or 0)  # as the launcher: a block holds whole scale blocks,
                warps = module._NUM_WARPS * block // module._BLOCK  # with warps in proportion
                for aligned in (True, False):
                    types, constexprs = signature(kernel, p_type, s_type, stochastic, aligned, block,
                                                  args.amp, bits, qblock)
                    src = triton.compiler.ASTSource(fn=kernel, signature=types, constexprs=constexprs)
                    ptx = triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]
                    row = dict(spec=spec, kernel=name, config=config, aligned=aligned, warps=warps, **count(ptx),
                               **(registers(ptx, args.arch) if args.registers else {}))
                    records.append(row)
                    print(f"{spec:8} {name:24} {config:12} aligned={aligned!s:5} {row['instructions']:5} "
                          f"instructions {row.get('registers', '?')} registers  {row['accesses']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(triton=triton.__version__, arch=f"sm_{args.arch}",
                command=" ".join(["python bench/ptx_count.py", *(argv if argv is not None else sys.argv[1:])]))
    (args.out / "ptx.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    md = ["# PTX of the generated kernels (static counts, no GPU)", "",
          f"Triton {meta['triton']}, {meta['arch']}, `{meta['command']}`. Instructions: PTX instructions of "
          "the kernel, per thread (BLOCK elements over the block's threads); with ALIGNED they include both "
          "forms of each load and store (unmasked for whole blocks, masked for the last). Accesses: global "
          "loads (ld) and stores (st) in the code, by bytes per instruction.", "",
          "| spec | kernel | config | aligned | warps | instructions | registers (spilled bytes) | accesses |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['spec']} | {r['kernel']} | {r['config']} | {r['aligned']} | {r['warps']} | {r['instructions']} | "
           f"{r.get('registers', '-')} ({r.get('spill_bytes', '-')}) | "
           + ", ".join(f"{k}: {v}" for k, v in r["accesses"].items()) + " |" for r in records]
    (args.out / "ptx.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
