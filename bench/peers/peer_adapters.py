"""PyTorch peer for bench_adapters: one fwd+bwd step of an adapted linear layer, written the way
peft computes it (LoRA: x@Wᵀ + s·(x@Aᵀ)@Bᵀ with autograd; DoRA: forms W + s·B@A and its row
norms, norm detached), plus the frozen-weight GEMMs alone. Same shapes and names as the C++
benchmark. Prints JSON lines {"name", "seconds", "peak_rss_MiB"}."""
import json
import sys

import torch

from peer_common import setup, median_time, peak_rss_mib


def cases(smoke):
    if smoke:
        return [(256, 256, 256, 8), (256, 256, 256, 16)]
    return [(4096, 4096, 4096, r) for r in (8, 16, 64)]


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    repeats = 3
    torch.manual_seed(0)
    done_one = set()
    for rows, n_in, n_out, r in cases(smoke):
        tag = f"rows:{rows}/in:{n_in}/out:{n_out}/r:{r}/threads:{threads}"
        x = torch.randn(rows, n_in, requires_grad=True)
        W = (torch.randn(n_out, n_in) * 0.02)
        A = (torch.randn(r, n_in) * 0.02).requires_grad_()
        B = (torch.randn(n_out, r) * 0.02).requires_grad_()
        dy = torch.randn(rows, n_out)
        s = 16.0 / r

        def lora():
            x.grad = A.grad = B.grad = None
            y = x @ W.t() + s * ((x @ A.t()) @ B.t())
            y.backward(dy)

        t = median_time(lora, repeats=repeats)
        print(json.dumps({"name": f"BM_adapters_lora/pytorch/{tag}", "seconds": t,
                          "peak_rss_MiB": peak_rss_mib()}), flush=True)

        # the remaining cases use one rank (16 outside smoke, the first in smoke), as in C++
        if (rows, n_in, n_out) in done_one or (not smoke and r != 16):
            continue
        done_one.add((rows, n_in, n_out))

        def frozen():
            with torch.no_grad():
                x @ W.t()
                dy @ W

        t = median_time(frozen, repeats=repeats)
        print(json.dumps({"name": f"BM_adapters_frozen/pytorch/{tag}", "seconds": t,
                          "peak_rss_MiB": peak_rss_mib()}), flush=True)
        m = torch.ones(n_out, requires_grad=True)

        def dora():
            x.grad = A.grad = B.grad = m.grad = None
            V = W + s * (B @ A)
            norm = V.norm(dim=1).detach()  # peft detaches the weight norm
            base = x @ W.t()
            y = (m / norm) * (base + s * ((x @ A.t()) @ B.t()))
            y.backward(dy)

        t = median_time(dora, repeats=repeats)
        print(json.dumps({"name": f"BM_adapters_dora/pytorch/{tag}", "seconds": t,
                          "peak_rss_MiB": peak_rss_mib()}), flush=True)


if __name__ == "__main__":
    main()
