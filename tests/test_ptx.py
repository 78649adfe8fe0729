"""Every kernel of every spec compiles for an H100 (sm_90), without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python; it does not type-check them as the
compiler does. bench/ptx_count.py compiles each kernel to PTX the way the launcher calls it
(float32; bfloat16 parameters; bfloat16 states; aligned or not), so a kernel that would not compile
on a GPU fails here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(p.stem for p in (ROOT / "generated").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("spec", SPECS)
def test_every_kernel_compiles_to_ptx(spec, tmp_path):
    done = subprocess.run([sys.executable, "bench/ptx_count.py", "--specs", spec, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "ptx.json").read_text())["records"]
    kernels = {r["kernel"] for r in records}
    assert kernels and len(records) == 6 * len(kernels)  # three dtype settings, aligned or not
    # the kernels that stream p move 16 bytes per access on whole blocks of aligned tensors
    assert any("ld 16B" in r["accesses"] for r in records if r["aligned"])
    assert not any("ld 16B" in r["accesses"] for r in records if not r["aligned"])


@pytest.mark.parametrize("spec", ["adamw", "adafactor"])
def test_low_bit_kernels_compile_to_ptx_without_spilling(spec, tmp_path):
    """The low-bit kernels (int8 codes in blocks of 2048 numbers, int4 of 256) compile for an H100 as
    the launcher calls them, and keep their registers: 8-bit blocks at 4 warps took 156 registers
    per thread, so the launcher gives a block warps in proportion to its numbers."""
    done = subprocess.run([sys.executable, "bench/ptx_count.py", "--specs", spec, "--lowbit", "--registers",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "ptx.json").read_text())["records"]
    lowbit = [r for r in records if r["config"] in ("int8 states", "int4 states")]
    assert {r["config"] for r in lowbit} == {"int8 states", "int4 states"}
    assert {r["warps"] for r in lowbit if r["config"] == "int8 states"} == {8}
    if "registers" not in records[0]:
        pytest.skip("Triton's ptxas did not report registers here")
    for r in lowbit:
        if r["aligned"]:  # as torch's allocator gives tensors: as many numbers per thread as the float kernels
            assert r["spill_bytes"] == 0, r
            floats = next(f["registers"] for f in records
                          if (f["kernel"], f["config"], f["aligned"]) == (r["kernel"], "fp32", True))
            assert r["registers"] <= floats + 32, r
