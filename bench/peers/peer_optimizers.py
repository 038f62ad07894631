"""PyTorch peer for bench_optimizers: torch.optim.AdamW (1.13) step on the same shapes, per-tensor
(foreach=False) and multi-tensor (foreach=True), plus AdamW on one 4096×4096 matrix. Prints JSON
lines {"name", "seconds", "peak_rss_MiB"}; names match bench_optimizers' cases with impl pytorch."""
import json
import sys

import torch

from peer_common import setup, median_time, peak_rss_mib


def adamw_case(tensors, size, foreach, repeats):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.rand(size)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.rand(size)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                            foreach=foreach)
    opt.step()  # creates the state (exp_avg, exp_avg_sq) outside the timing
    return median_time(opt.step, repeats=repeats, warmup=1)


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    tensors, size = (4, 1 << 16) if smoke else (100, 1 << 20)
    repeats = 3 if smoke else 5
    with torch.no_grad():
        for foreach, label in ((False, "adamw"), (True, "adamwforeach")):
            t = adamw_case(tensors, size, foreach, repeats)
            print(json.dumps({"name": f"BM_optimizers_{label}/pytorch/tensors:{tensors}/size:{size}"
                                      f"/threads:{threads}",
                              "seconds": t, "peak_rss_MiB": peak_rss_mib()}))
        m = 512 if smoke else 4096
        t = adamw_case(1, m * m, False, repeats)
        print(json.dumps({"name": f"BM_optimizers_adamw_matrix/pytorch/m:{m}/n:{m}/rank:0",
                          "seconds": t, "peak_rss_MiB": peak_rss_mib()}))


if __name__ == "__main__":
    main()
