"""Data-parallel (DDP), fully-sharded (FSDP2 `fully_shard`) and tensor-parallel training with
generated optimizers give the parameters of one process training on the whole batch, on every
path (for-loop, foreach, fused Triton kernels under the interpreter); checkpoints through
torch.distributed.checkpoint reshard from 2 ranks to 4 and to 1.

gloo processes on CPU; each rank takes its slice of every batch; the loss is a mean, so the
averaged gradient is the whole batch's. Under FSDP2 every parameter is a DTensor sharded by
rows, unevenly (7 rows over 2 ranks: 4 + 3; over 4: 2 + 2 + 2 + 1), and some ranks hold an empty
shard (the (1,) gain; over 4 ranks also the 3-row matrix's last). A reduction over a split axis
(nSGDA's norm, Adafactor's column means, SM3's maxima, soft clip's unit RMS, Amos's mean) must
still be the whole parameter's; matrix work (Muon) needs the whole matrix, and Shampoo's and SOAP's
matrix-shaped states step whole on an owner rank; AdaLo reads the loss, averaged over the ranks. bench/dist_matrix.py runs the whole matrix (every spec, path, dtype,
mode, 2 and 4 ranks) and prints the tally; this file runs a cross-section of it in one spawn
per world size.
"""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from bench import dist_matrix as dm

# The foreach path runs DTensor's foreach ops: those that failed before (ops without a sharding rule,
# in-place ops on partial results) and the split-dependent constructs (the whole list: bench/dist_matrix.py).
FOREACH = ["adabelief", "adamax", "amsgrad", "nadam", "adanorm", "diffgrad", "sm3", "smmf", "muon", "muon_clip",
           "lookahead_adam", "adamw_softclip", "sgd_agc", "amos", "adalo", "nsgda", "adafactor", "lamb",
           "shampoo", "soap"]
ALL = [("fsdp", name, path, "float64") for name in dm.SPECS for path in ("loop", "fused")]
ALL += [("fsdp", name, "foreach", "float64") for name in FOREACH]
ALL += [("ddp", name, path, "float64") for name in ("adalo", "muon") for path in dm.PATHS]
ALL += [("fsdp", name, "fused", "float32") for name in ("adamw", "adafactor", "muon", "sgd_agc")]
ALL += [("tp", name, path, "float64") for name in ("adamw", "lamb", "muon") for path in dm.PATHS]
# At 4 ranks shards are uneven and some empty (b's 3 rows: 1 + 1 + 1 + 0): the constructs whose
# result depends on the split, on every path (SM3's column maximum over a rank with no rows was
# refused by torch on the torch paths).
SPLIT = ["nsgda", "adafactor", "sm3", "adamw_softclip", "sgd_agc", "amos", "muon", "adalo",
         "shampoo"]  # Gram states split 1 + 1 + 1 + 0 (b's L), owners round-robin over 4 ranks
FOUR = [("fsdp", name, path, "float64") for name in SPLIT for path in dm.PATHS]
# FSDP2 over tensor parallelism on a 2-D mesh (2 x 2), as torchtitan: FSDP2 splits tensor
# parallelism's row shards again (_StridedShard); the gain lives on the data-parallel mesh alone
FOUR += [("2d", name, path, "float64") for name in ("adamw", "muon", "adafactor") for path in dm.PATHS]
BF16 = [("fsdp-bf16", "adamw", path, "float32") for path in ("loop", "fused")]  # stochastic rounding of shards
# torch.distributed.checkpoint: saved on 2 ranks after STEPS steps, loaded on 4 (and on 1), trained on
CHECKPOINTED = [(name, path) for name in ("adamw", "adafactor", "nadam", "muon") for path in ("loop", "fused")]
CHECKPOINTED += [("shampoo", "loop")]  # Gram states: row-sharded (L, Li) and replicated (R, Ri) DTensors
# The collectives of one step (CommDebugMode), at 2 ranks: every parameter row-sharded, so every whole
# reduction of each of the 5 tensors is partial. The foreach path combines each reduction of the rule
# for all tensors at once (_whole_list: one all-reduce over a flat buffer), the fused path one per
# stage; the for-loop path, one tensor at a time, leaves it to DTensor (one per tensor and reduction).
# nSGDA: norm(g); LAMB: norm(p), norm(u); SM3: the column maximum (the row one is local to a row
# shard); AGC: unit norms of g and p (a split vector's unit is the whole vector); SMMF: sums of two
# factors, whole and along each axis (4, the rows' sums of a row shard being local).
COUNTED = {"nsgda": 1, "lamb": 2, "sm3": 1, "sgd_agc": 2, "smmf": 4}
COUNTED_LOOP = {"nsgda": 5, "lamb": 10, "sm3": 2, "sgd_agc": 6, "smmf": 8}
# and with bfloat16 states (state_dtype), in float32
CHECKPOINTED_BF16 = [("adamw", "loop"), ("adamw", "fused"), ("adafactor", "fused"), ("muon", "loop")]


@pytest.fixture(scope="module")
def results():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available on this platform")
    with tempfile.TemporaryDirectory() as tmp:
        dm.CHECKPOINTS = tmp  # before the forks: every rank writes and reads there
        out = {2: dm.run(ALL + BF16 + [("save", n, p, "float64") for n, p in CHECKPOINTED]
                         + [("count", n, p, "float64") for n in [*COUNTED, "shampoo"] for p in dm.PATHS]
                         + [("save-bf16", n, p, "float32") for n, p in CHECKPOINTED_BF16], 2),
               4: dm.run(FOUR + [("load", n, p, "float64") for n, p in CHECKPOINTED]
                         + [("load-bf16", n, p, "float32") for n, p in CHECKPOINTED_BF16], 4)}
        out[1] = {(n, p): dm.resumed(n, p, torch.float64) for n, p in CHECKPOINTED}
        yield out


# Strict: a pass says the mark can go.
NOT_YET = {"kron": "no sharded stream of randn() draws yet: on the torch paths randn() of a DTensor is refused at "
                   "step; fused, the vectors' kernel hashes each shard's local offsets, so its probes (and the "
                   "parameters, by 1e-5 at 2 ranks) differ from one process's"}


def _marked(world, scenario):
    why = NOT_YET.get(scenario[1])
    return (world, scenario) if why is None else pytest.param(
        world, scenario, marks=pytest.mark.xfail(reason=why, strict=True))


@pytest.mark.parametrize("world, scenario", [_marked(2, s) for s in ALL] + [_marked(4, s) for s in FOUR],
                         ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_sharded_training_matches_one_process(results, world, scenario):
    mode, name, path, dtype = scenario
    # SOAP: one process on the ranks' averaged gradient (its eigenbases turn with the last bit of it: dm.AVERAGED)
    expected = dm.one_process(name, path, dm.DTYPES[dtype], dm.HIDDEN.get(mode, 7),
                              world if mode in ("ddp", "fsdp") else 1)
    assert not torch.equal(expected[0], dm.net(dm.DTYPES[dtype]).a.weight)  # training moved them
    assert dm.compare(results[world][scenario], expected, dm.DTYPES[dtype]) == ""


def test_shard_norm_would_differ():
    """What the nSGDA cases guard against: the norm of one shard is not the whole norm."""
    w = dm.net(torch.float64).a.weight
    assert abs(torch.linalg.vector_norm(w[:4]).item() - torch.linalg.vector_norm(w).item()) > 0.1


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_sharded_bfloat16_states_train_like_float32_states(results, path):
    # Stochastic rounding draws its own noise on each rank: close to the float32-state run, not equal.
    got = results[2][("fsdp-bf16", "adamw", path, "float32")]
    assert not isinstance(got, str), got
    expected = dm.one_process("adamw", path, torch.float32)
    moved = max((p - q).abs().max().item() for p, q in zip(expected, dm.net(torch.float32).parameters()))
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=0, atol=0.02 * moved)


def test_every_reduction_says_how_it_combines():
    """A reduction the fused kernels make on shards is finished by the sharding plan's all-reduce:
    each one in the function table has its row there (a new one must say how its parts combine)."""
    from optdsl import functions as fn
    from optdsl.backends import sharding
    reductions = {name for name, row in fn.TABLE.items() if row.reduction or row.axis}
    assert reductions == set(sharding.COMBINE)


@pytest.mark.parametrize("name, path", CHECKPOINTED)
def test_checkpoint_saved_on_two_ranks_resumes_on_four_and_on_one(results, name, path):
    """Training resumed from a checkpoint, resharded from 2 ranks to 4 (or to one process), goes on
    exactly as it would have without the interruption: states of every shape (Adafactor's rows and
    columns, NAdam's scalar product, Muon's momentum) come back where each rank needs them."""
    expected = dm.one_process_twice(name, path, torch.float64)
    saved, loaded = results[2][("save", name, path, "float64")], results[4][("load", name, path, "float64")]
    assert not isinstance(saved, str), saved
    assert not isinstance(loaded, str), loaded
    assert dm.compare(saved[0], dm.one_process(name, path, torch.float64), torch.float64) == ""
    _same_states(saved[1], loaded[1])
    assert dm.compare(loaded[0], expected, torch.float64) == ""
    assert dm.compare(results[1][(name, path)], expected, torch.float64) == ""


@pytest.mark.parametrize("name", COUNTED)
def test_each_reduction_is_one_all_reduce_for_all_tensors(results, name):
    """The foreach path's partial reductions are combined by one all-reduce per reduction over all the
    group's tensors (5 here), not one per tensor; the fused path's by one per stage; nothing else is
    communicated (no all-gather of a shard)."""
    got = {path: results[2][("count", name, path, "float64")] for path in dm.PATHS}
    for path, result in got.items():
        assert not isinstance(result, str), result
        assert dm.compare(result[0], dm.one_process(name, path, torch.float64), torch.float64) == ""
    assert got["foreach"][1] == {"allreduce": COUNTED[name]}
    assert got["fused"][1] == {"allreduce": 1}
    assert got["loop"][1] == {"allreduce": COUNTED_LOOP[name]}


def test_matrix_states_step_on_owners(results):
    """Shampoo under FSDP2 at 2 ranks, per step: each of the 2 matrices (7 x 5 and 3 x 7) gathers to its
    owner p, g, the momentum and the two Gram states split by rows (L, Li: 5 gathers), and scatters back
    p, the momentum, L and Li (4); R and Ri, replicated, are broadcast from the owner (2). No all-reduce
    and no all-gather: no rank but the owner holds a whole matrix."""
    for path in dm.PATHS:
        result = results[2][("count", "shampoo", path, "float64")]
        assert not isinstance(result, str), result
        assert dm.compare(result[0], dm.one_process("shampoo", path, torch.float64), torch.float64) == ""
        assert result[1] == {"gather": 10, "scatter": 8, "broadcast": 4}


def _same_states(saved, loaded):
    """The states as loaded on 4 ranks are the states saved on 2, number for number and in their dtype."""
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert loaded[key].dtype == saved[key].dtype, key
        assert torch.equal(loaded[key], saved[key]), key


@pytest.mark.parametrize("name, path", CHECKPOINTED_BF16)
def test_bfloat16_states_saved_on_two_ranks_load_on_four(results, name, path):
    """bfloat16 states (state_dtype) saved on 2 ranks come back on 4 as the same bfloat16 numbers, and
    training goes on near the uninterrupted run with float32 states: stochastic rounding draws its own
    noise on each rank, so not equal (the tolerance: test_sharded_bfloat16_states_train_like_float32_states')."""
    saved, loaded = results[2][("save-bf16", name, path, "float32")], results[4][("load-bf16", name, path, "float32")]
    assert not isinstance(saved, str), saved
    assert not isinstance(loaded, str), loaded
    assert any(s.dtype == torch.bfloat16 for s in saved[1].values())
    _same_states(saved[1], loaded[1])
    expected = dm.one_process_twice(name, path, torch.float32)
    moved = max((p - q).abs().max().item() for p, q in zip(expected, dm.net(torch.float32).parameters()))
    for p, q in zip(loaded[0], expected):
        torch.testing.assert_close(p, q, rtol=0, atol=0.02 * moved)
