#!/usr/bin/python3
"""Prints lowmem vs naive vs PyTorch side by side for one family.

    /usr/bin/python3 bench/peers/compare.py core [--build build-bench] [--threads 1] [--smoke]

Runs build/bench/bench_<family> (Google Benchmark, JSON output, pinned with taskset to the first
`threads` cores; cases named threads:N with N > `threads` are dropped, since they would run
oversubscribed) and bench/peers/peer_<family>.py (system python3 with Debian's python3-torch,
OPENBLAS_CORETYPE and thread counts set), then prints one table: for each case name with its
`<impl>` part removed, the time of each implementation and the ratios to lowmem."""
import argparse
import json
import os
import re
import subprocess
import sys

from peer_common import cpu_coretype

HERE = os.path.dirname(os.path.abspath(__file__))


def run_bench(binary, threads, smoke, extra):
    cpus = ",".join(str(i) for i in range(threads))
    cmd = ["taskset", "-c", cpus, binary, "--benchmark_format=json", "--benchmark_repetitions=3",
           "--benchmark_report_aggregates_only=true"] + extra
    if smoke:
        cmd.append("--benchmark_min_time=0.01")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if smoke:
        env["LOWMEM_BENCH_SMOKE"] = "1"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    rows = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        m = re.search(r"/threads:(\d+)", b["run_name"])
        if m and int(m.group(1)) > threads:
            continue  # would run oversubscribed on the `threads` pinned cores: not a fair figure
        rows[b["run_name"]] = {"seconds": b["real_time"] * scale,
                               "peak_MiB": b.get("peak_MiB"), "flops": b.get("flops")}
    return rows


def run_peer(family, threads, smoke):
    script = os.path.join(HERE, f"peer_{family}.py")
    if not os.path.exists(script):
        return {}
    env = dict(os.environ, LOWMEM_PEER_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    # Debian's torch calls the system libblas.so.3: the netlib reference BLAS unless OpenBLAS is
    # installed (libopenblas0-pthread). Put OpenBLAS first so matmul peers are not flattering.
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread"
    if os.path.isdir(openblas):
        env["LD_LIBRARY_PATH"] = openblas + ":" + env.get("LD_LIBRARY_PATH", "")
    else:
        print("warning: OpenBLAS not installed (apt-get install libopenblas0-pthread): PyTorch "
              "matmuls use the reference BLAS and are far slower than they should be",
              file=sys.stderr)
    core = cpu_coretype()
    if core:
        env["OPENBLAS_CORETYPE"] = core
    cmd = ["/usr/bin/python3", script] + (["--smoke"] if smoke else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=HERE).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[r["name"]] = r
    return rows


def case_key(name):
    # BM_<family>_<op>/<impl>/<shape...>  ->  (BM_<family>_<op>/<shape...>, impl)
    parts = name.split("/")
    if len(parts) >= 2 and parts[1] in ("lowmem", "naive", "pytorch"):
        return "/".join([parts[0]] + parts[2:]).replace("/real_time", ""), parts[1]
    return name, "lowmem"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("family")
    ap.add_argument("--build", default="build-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    binary = os.path.join(args.build, "bench", f"bench_{args.family}")
    extra = [f"--benchmark_filter={args.filter}"] if args.filter else []
    table = {}
    for name, r in run_bench(binary, args.threads, args.smoke, extra).items():
        key, impl = case_key(name)
        table.setdefault(key, {})[impl] = r
    for name, r in run_peer(args.family, args.threads, args.smoke).items():
        key, impl = case_key(name)
        table.setdefault(key, {})[impl] = r
    print(f"{'case':60s} {'lowmem s':>10s} {'naive s':>10s} {'pytorch s':>10s} "
          f"{'naive/lm':>9s} {'torch/lm':>9s} {'lm MiB':>8s}")
    for key in sorted(table):
        row = table[key]
        lm = row.get("lowmem", {}).get("seconds")
        nv = row.get("naive", {}).get("seconds")
        pt = row.get("pytorch", {}).get("seconds")
        mib = row.get("lowmem", {}).get("peak_MiB")
        f = lambda x: f"{x:10.4g}" if x is not None else f"{'-':>10s}"
        ratio = lambda x: f"{x / lm:9.2f}" if (x is not None and lm) else f"{'-':>9s}"
        print(f"{key:60s} {f(lm)} {f(nv)} {f(pt)} {ratio(nv)} {ratio(pt)} "
              f"{(f'{mib:8.2f}' if mib is not None else '       -')}")


if __name__ == "__main__":
    sys.exit(main())
