"""Low-bit states, fused kernels against the foreach path on one device (the GPU when there is one):
AdamW and Lion, int8 and int4 codes, awkward sizes, 20 steps; prints the largest parameter and
state differences. Run: python bench/lowbit_gpu_check.py (TRITON_INTERPRET=1 on a CPU)."""
import torch

from generated.adamw import AdamW
from generated.lion import Lion

device = "cuda" if torch.cuda.is_available() else "cpu"
for cls in (AdamW, Lion):
    for fmt in ("int8", "int4"):
        gen = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=gen) for s in [(4096,), (4097,), (1823, 781), (3, 50, 41)]]
        ps, qs = [x.clone().to(device) for x in init], [x.clone().to(device) for x in init]
        a = cls(ps, lr=1e-2, fused=True, state_dtype=fmt)
        b = cls(qs, lr=1e-2, foreach=True, state_dtype=fmt)
        for _ in range(20):
            for p, q in zip(ps, qs):
                g = torch.randn(p.shape, generator=gen).to(device)
                p.grad, q.grad = g, g.clone()
            a.step()
            b.step()
        dp = max((p - q).abs().max().item() for p, q in zip(ps, qs))
        ds = max((a.state[p][k].cpu().float() - b.state[q][k].cpu().float()).abs().max().item()
                 for p, q in zip(ps, qs) for k in a.state[p] if torch.is_tensor(a.state[p][k]))
        same = sum(torch.equal(a.state[p][k].cpu(), b.state[q][k].cpu()) for p, q in zip(ps, qs) for k in a.state[p]
                   if torch.is_tensor(a.state[p][k]))
        print(f"{device} {cls.__name__} {fmt}: max |p diff| {dp:.3e}, max stored-byte diff {ds:.0f}, "
              f"{same} states bit-equal")
