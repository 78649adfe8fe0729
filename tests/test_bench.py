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


def _bench_rank(code: str) -> dict:
    """Run one rank of a distributed bench in its own interpreter (it opens a fake process group)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", f"import json, sys; sys.path.insert(0, {root!r}); {code}"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dist_bytes_runs_on_the_generated_muon():
    """The bench calls the generated matrix work by its signature: it broke silently when Muon's loop renamed
    the momentum argument. The owner plan must move fewer bytes than DTensor's redistribution at every product."""
    ops = _bench_rank("from bench import dist_bytes; print(json.dumps(dist_bytes.one_rank(1)))")
    moved = {how: sum(row[1] for row in rows.values()) for how, rows in ops.items()}
    assert set(ops["owner"]) == {"gather_", "scatter_"}, ops["owner"]
    assert 0 < moved["owner"] < moved["dtensor"] / 4, moved


def test_dist_reductions_runs_on_the_generated_adafactor():
    ops = _bench_rank("from bench import dist_reductions as d; print(json.dumps(d.one_rank(1, d.EMBEDDING)))")
    moved = {how: sum(row[1] for row in rows.values()) for how, rows in ops.items()}
    assert 0 < moved["partial"] < moved["dtensor"] / 100, moved


def test_dist_reductions_for_loop_path_makes_one_all_reduce_per_stage():
    """A block's 4 matrices on one rank: the for-loop path's 3 stages (rms(p) with the means of g^2, the
    column mean of r, rms(u)) take 3 all-reduces for all 4, as the foreach path's; one per tensor and
    reduction was 16 (the row mean of a row shard is local), the same bytes in more calls."""
    ops = _bench_rank("from bench import dist_reductions as d; print(json.dumps(d.one_rank(1, d.SHAPES)))")
    calls = {how: sum(row[0] for row in rows.values()) for how, rows in ops.items()}
    moved = {how: sum(row[1] for row in rows.values()) for how, rows in ops.items()}
    assert calls["loop"] == calls["partial"] == 3 and calls["loop per tensor"] == 16, calls
    assert moved["loop"] == moved["partial"] == moved["loop per tensor"], moved


def test_dist_kron_measures_the_generated_plans():
    """bench/dist_kron.py calls the generated code: the owner plan gathers each matrix's p, g and split states,
    scatters p and those states back and broadcasts the replicated ones; as generated, the embedding (dL and a
    replicated QR) steps on its shards, with all-reduces of QR's partial Gram sums alone, far fewer bytes."""
    ops = _bench_rank("from bench import dist_kron as d; print(json.dumps(d.one_rank(1)))")
    assert set(ops["default block"]["owner"]) == set(ops["default wte"]["owner"]) == {"gather_", "scatter_", "broadcast_"}
    assert ops["default block"]["generated"] == ops["default block"]["owner"]  # QL split by rows: on owners still
    assert set(ops["default wte"]["generated"]) == {"all_reduce"}, ops["default wte"]
    moved = {how: sum(row[1] for row in rows.values()) for how, rows in ops["default wte"].items()}
    assert 0 < moved["generated"] < moved["owner"] / 10, moved
