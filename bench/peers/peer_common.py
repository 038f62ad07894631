"""Shared set-up for the PyTorch peers (Debian python3-torch 1.13 under /usr/bin/python3).

Debian's OpenBLAS 0.3.21 does not recognise recent Xeons/EPYCs and falls back to slow SSE3
kernels: the runner sets OPENBLAS_CORETYPE (SkylakeX on AVX-512 CPUs, Haswell on AVX2-only ones)
before torch is imported, and fixes the thread count, or the comparison would flatter lowmem."""
import os
import statistics
import time


def cpu_coretype():
    flags = open("/proc/cpuinfo").read()
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    return ""


def setup():
    """Call before heavy work; returns the thread count in use (env LOWMEM_PEER_THREADS, default 1)."""
    import torch
    threads = int(os.environ.get("LOWMEM_PEER_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def median_time(fn, repeats=7, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
