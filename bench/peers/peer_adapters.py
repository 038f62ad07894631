"""PyTorch peer for bench_adapters: one fwd+bwd step of an adapted linear layer, written the way
peft computes it (LoRA: x@Wᵀ + s·(x@Aᵀ)@Bᵀ with autograd; DoRA: forms W + s·B@A and its row
norms, norm detached), plus the frozen-weight GEMMs alone. Same shapes and names as the C++
benchmark. Prints JSON lines {"name", "seconds", "peak_rss_MiB"}.

"seconds" is the median PROCESS CPU time of one step (time.process_time: every torch/OpenBLAS
thread), as bench_adapters measures it, because the machine is shared with other jobs and wall
time would mostly measure them. Threads: LOWMEM_PEER_THREADS (compare.py --threads).
LOWMEM_PEER_FILTER (a regex, optional) runs only the cases whose name matches, to pair with
compare.py --filter on a busy machine."""
import json
import os
import re
import statistics
import sys
import time

import torch

from peer_common import setup, peak_rss_mib


def median_time(fn, repeats=3, warmup=1):
    """Median process CPU time of fn() (all threads), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def cases(smoke):
    if smoke:
        return [(256, 256, 256, 8), (256, 256, 256, 16)]
    return [(4096, 4096, 4096, r) for r in (8, 16, 64)]


def emit(name, seconds):
    print(json.dumps({"name": name, "seconds": seconds, "peak_rss_MiB": peak_rss_mib()}),
          flush=True)


def wanted(name):
    pattern = os.environ.get("LOWMEM_PEER_FILTER", "")
    return not pattern or re.search(pattern, name) is not None


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    repeats = 3
    torch.manual_seed(0)
    done_one = set()
    for rows, n_in, n_out, r in cases(smoke):
        # bench_adapters uses manual (CPU) timing: Google Benchmark names end in /manual_time
        tag = f"rows:{rows}/in:{n_in}/out:{n_out}/r:{r}/threads:{threads}/manual_time"
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

        name = f"BM_adapters_lora/pytorch/{tag}"
        if wanted(name):
            emit(name, median_time(lora, repeats=repeats))

        # the remaining cases use one rank (16 outside smoke, the first in smoke), as in C++
        if (rows, n_in, n_out) in done_one or (not smoke and r != 16):
            continue
        done_one.add((rows, n_in, n_out))

        def frozen():
            with torch.no_grad():
                x @ W.t()
                dy @ W

        name = f"BM_adapters_frozen/pytorch/{tag}"
        if wanted(name):
            emit(name, median_time(frozen, repeats=repeats))
        m = torch.ones(n_out, requires_grad=True)

        def dora():
            x.grad = A.grad = B.grad = m.grad = None
            V = W + s * (B @ A)
            norm = V.norm(dim=1).detach()  # peft detaches the weight norm
            base = x @ W.t()
            y = (m / norm) * (base + s * ((x @ A.t()) @ B.t()))
            y.backward(dy)

        name = f"BM_adapters_dora/pytorch/{tag}"
        if wanted(name):
            emit(name, median_time(dora, repeats=repeats))

        # three rank-r adapters on one W, peft's loop (base once, each adapter added)
        As = [(torch.randn(r, n_in) * 0.02).requires_grad_() for _ in range(3)]
        Bs = [(torch.randn(n_out, r) * 0.02).requires_grad_() for _ in range(3)]

        def multi():
            x.grad = None
            for P in As + Bs:
                P.grad = None
            y = x @ W.t()
            for Ak, Bk in zip(As, Bs):
                y = y + s * ((x @ Ak.t()) @ Bk.t())
            y.backward(dy)

        name = f"BM_adapters_multi_lora/pytorch/{tag}"
        if wanted(name):
            emit(name, median_time(multi, repeats=repeats))


if __name__ == "__main__":
    main()
