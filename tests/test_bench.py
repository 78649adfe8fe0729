"""The host benchmark runs, writes its files, and leaves the generated modules and torch as it found them."""
import json

import torch

from bench import bench_host
from generated import adamw, sgd


def test_bench_host_runs_and_restores_what_it_stubs(tmp_path):
    kernels = (adamw._adamw_0_kernel, sgd._sgd_kernel)
    torch_ops = (torch._fused_adamw_, torch._fused_sgd_, torch._foreach_add_)
    launches = adamw.LAUNCHES
    bench_host.main(["--suites", "small", "--optimizers", "adamw", "--windows", "1", "--steps", "1",
                     "--warmup", "1", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "host.json").read_text())["records"]
    assert {r["impl"] for r in records} == {"optdsl fused", "torch fused"}
    assert all(r["host_ms"] > 0 and r["tensors"] == 1000 for r in records)
    assert "| small | 1000 | adamw | optdsl fused |" in (tmp_path / "host.md").read_text()
    assert adamw.LAUNCHES > launches  # the fused path ran (its launches were counted, not run)
    assert (adamw._adamw_0_kernel, sgd._sgd_kernel) == kernels
    assert (torch._fused_adamw_, torch._fused_sgd_, torch._foreach_add_) == torch_ops
