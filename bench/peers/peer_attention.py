"""PyTorch peer for bench_attention: the same shapes in PyTorch 1.13 (no fused attention on CPU in
1.13: S = scale·Q Kᵀ, masked_fill for causal, softmax, P V; autograd for the backward; GQA by
repeat_interleave of K and V). Prints JSON lines {"name", "seconds", "peak_rss_MiB"} with names
matching bench_attention's (BM_attention_<op>/pytorch/N:../d:../causal:../hkv:../threads:..).
N = 8192 (6.6 GB per fwd+bwd) only with --full; LOWMEM_PEER_MAX_N=<n> caps N (PyTorch linked with
the reference netlib BLAS needs minutes per case at N = 4096)."""
import json
import math
import os
import sys

import torch

from peer_common import setup, median_time, peak_rss_mib

H = 8


def attention(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = q.shape[2]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    full = "--full" in sys.argv
    sizes = [512] if smoke else ([512, 1024, 2048, 4096] + ([8192] if full else []))
    max_n = int(os.environ.get("LOWMEM_PEER_MAX_N", "0"))
    if max_n > 0:
        sizes = [n for n in sizes if n <= max_n]
    torch.manual_seed(0)
    for n in sizes:
        for d in (64, 128):
            for causal in (0, 1):
                for hkv in ((8, 2) if d == 64 else (8,)):
                    q = torch.rand(1, H, n, d) * 2 - 1
                    k = torch.rand(1, hkv, n, d) * 2 - 1
                    v = torch.rand(1, hkv, n, d) * 2 - 1
                    do = torch.rand(1, H, n, d) * 2 - 1
                    args = f"N:{n}/d:{d}/causal:{causal}/hkv:{hkv}/threads:{threads}"
                    reps = 3 if (smoke or n >= 4096) else 5

                    def fwd():
                        with torch.no_grad():
                            attention(q, k, v, causal)

                    def fwdbwd():
                        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
                        attention(qq, kk, vv, causal).backward(do)

                    for op, fn in (("forward", fwd), ("fwdbwd", fwdbwd)):
                        t = median_time(fn, repeats=reps)
                        print(json.dumps({"name": f"BM_attention_{op}/pytorch/{args}",
                                          "seconds": t, "peak_rss_MiB": peak_rss_mib()}),
                              flush=True)


if __name__ == "__main__":
    main()
