"""PyTorch peer for bench_core: RNG fill throughput (torch.Tensor.normal_ / uniform_) on the same
sizes as bench_core. Prints JSON lines {"name", "seconds", "items_per_second"}."""
import json
import sys
import time

import torch

from peer_common import setup, median_time


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    sizes = [1 << 20] if smoke else [1 << 20, 1 << 24]
    for n in sizes:
        out = torch.empty(n, dtype=torch.float32)
        for dist, fill in (("normal", lambda: out.normal_()), ("uniform", lambda: out.uniform_())):
            t = median_time(fill, repeats=3 if smoke else 7)
            print(json.dumps({"name": f"BM_core_{dist}/pytorch/n:{n}/threads:{threads}",
                              "seconds": t, "items_per_second": n / t}))


if __name__ == "__main__":
    main()
