"""PyTorch peer for bench_zeroth_order.

* MeZO step exactly as MeZO's trainer does it (github.com/princeton-nlp/MeZO, zo_perturb_parameters
  and zo_update): torch.manual_seed(seed) then torch.normal per parameter for each of the four
  passes (+eps, -2eps, +eps, update), parameters as 100 tensors of 1M floats (100M in total).
* EGGROLL batched forward for population 64 on a 4096x4096 matrix, rank 1, the low-rank way in
  torch: Y = X W^T + sigma * (X a_j) b_j^T with a, b drawn per member.
Prints JSON lines {"name", "seconds"} with the names of the C++ cases."""
import json
import sys

import torch

from peer_common import setup, median_time, peak_rss_mib


def mezo_step(params, seed, eps=1e-3, lr=1e-6, wd=0.0):
    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    perturb(1)
    l1 = float(params[0][0])  # stands in for the user's forward
    perturb(-2)
    l2 = float(params[0][0])
    projected_grad = (l1 - l2) / (2 * eps)
    perturb(1)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
        p.data = p.data - lr * (projected_grad * z + wd * p.data)


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    n, spans = (2_000_000, 4) if smoke else (100_000_000, 100)
    params = [torch.full((n // spans,), 0.01) for _ in range(spans)]
    seed = [0]

    def step():
        seed[0] += 1
        mezo_step(params, seed[0])

    t = median_time(step, repeats=3)
    print(json.dumps({"name": f"BM_zeroth_order_step/pytorch/n:{n}/spans:{spans}/threads:{threads}"
                              f"/q:1/rademacher:0", "seconds": t, "peak_rss_MiB": peak_rss_mib()}))
    del params

    pop, rows, d_in, d_out, rank = (8, 1, 256, 256, 1) if smoke else (64, 1, 4096, 4096, 1)
    x = torch.randn(pop * rows, d_in)
    w = torch.randn(d_out, d_in)
    sigma = 0.01

    def forward():
        g = torch.Generator().manual_seed(7)
        a = torch.randn(pop, d_in, rank, generator=g)
        b = torch.randn(pop, d_out, rank, generator=g)
        y = x @ w.t()
        xa = torch.bmm(x.view(pop, rows, d_in), a)  # [pop, rows, rank]
        y += sigma * torch.bmm(xa, b.transpose(1, 2)).reshape(pop * rows, d_out)
        return y

    t = median_time(forward, repeats=5)
    print(json.dumps({"name": f"BM_zeroth_order_eggroll_forward/pytorch/pop:{pop}/rows:{rows}"
                              f"/in:{d_in}/out:{d_out}/rank:{rank}/threads:{threads}", "seconds": t}))


if __name__ == "__main__":
    main()
