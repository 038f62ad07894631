"""PyTorch peer for bench_quant: the same cases written with torch ops, as bitsandbytes' CPU
fallback would (block-64 absmax, NF4 by nearest level with argmin, packing with shifts), FP8 e4m3
rounding emulated with torch ops (torch 1.13 has no float8 dtype), a butterfly FWHT, and fp32 /
dequantize-then-matmul linear layers. Prints JSON lines {"name", "seconds"}; names match
bench_quant's with impl = pytorch."""
import json
import sys

import torch

from peer_common import setup, median_time, peak_rss_mib

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
CHUNK = 1 << 22


def int8_quant(x):
    b = x.view(-1, 64)
    s = b.abs().amax(1, keepdim=True) / 127.0
    q = torch.round(b / torch.where(s > 0, s, torch.ones_like(s))).to(torch.int8)
    return q, s


def int8_dequant(q, s):
    return (q.float() * s).view(-1)


def nf4_quant(x):
    out = torch.empty(x.numel() // 2, dtype=torch.uint8)
    absmax = torch.empty(x.numel() // 64)
    for c in range(0, x.numel(), CHUNK):
        b = x[c:c + CHUNK].view(-1, 64)
        am = b.abs().amax(1, keepdim=True)
        absmax[c // 64:(c + b.numel()) // 64] = am.view(-1)
        v = (b / torch.where(am > 0, am, torch.ones_like(am))).view(-1, 1)
        q = torch.argmin((v - NF4).abs(), dim=1).to(torch.uint8)
        out[c // 2:(c + b.numel()) // 2] = (q[0::2] << 4) | q[1::2]
    return out, absmax


def nf4_dequant(packed, absmax):
    hi = NF4[(packed >> 4).long()]
    lo = NF4[(packed & 15).long()]
    return (torch.stack((hi, lo), dim=1).view(-1, 64) * absmax.view(-1, 1)).view(-1)


def fp8_e4m3_round(x):  # value-level emulation of fp32 -> e4m3 (RNE, saturating)
    a = x.abs().clamp(max=448.0)
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=-6.0)
    step = torch.pow(2.0, e - 3.0)
    return torch.sign(x) * torch.clamp(torch.round(a / step) * step, max=448.0)


def fwht_rows(x):
    rows, n = x.shape
    h = 1
    while h < n:
        v = x.view(rows, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        x = torch.stack((a + b, a - b), dim=2).view(rows, n)
        h *= 2
    return x / (n ** 0.5)


def emit(name, t, **extra):
    print(json.dumps(dict({"name": name, "seconds": t}, **extra)), flush=True)


def main():
    threads = setup()
    smoke = "--smoke" in sys.argv
    reps = 3
    n = (1 << 20) if smoke else 100000000
    torch.manual_seed(0)
    x = torch.randn(n)
    gb = lambda t: n * 4 / t / 1e9
    t = median_time(lambda: int8_quant(x), reps)
    emit(f"BM_quant_int8_quantize/pytorch/n:{n}", t, GBps=gb(t))
    q, s = int8_quant(x)
    t = median_time(lambda: int8_dequant(q, s), reps)
    emit(f"BM_quant_int8_dequantize/pytorch/n:{n}", t, GBps=gb(t))
    del q, s
    t = median_time(lambda: nf4_quant(x), 1 if not smoke else reps, warmup=0 if not smoke else 1)
    emit(f"BM_quant_nf4_quantize/pytorch/n:{n}", t, GBps=gb(t))
    p, am = nf4_quant(x)
    t = median_time(lambda: nf4_dequant(p, am), reps)
    emit(f"BM_quant_nf4_dequantize/pytorch/n:{n}", t, GBps=gb(t))
    del p, am
    t = median_time(lambda: fp8_e4m3_round(x), reps)
    emit(f"BM_quant_fp8_encode/pytorch/n:{n}", t, GBps=gb(t))
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8)
    lut = torch.randn(256)
    t = median_time(lambda: lut[codes.long()], reps)
    emit(f"BM_quant_fp8_decode/pytorch/n:{n}", t, GBps=gb(t))
    del codes, x
    rows = 64 if smoke else 4096
    xr = torch.randn(rows, 4096)
    t = median_time(lambda: fwht_rows(xr), reps)
    emit(f"BM_quant_fwht/pytorch/rows:{rows}/n:4096", t, GBps=rows * 4096 * 4 / t / 1e9)
    del xr
    # linear: fp32 and dequantize-then-matmul (what a torch-op fallback does)
    for op, (M, d) in (("gemv", (1, 512 if smoke else 4096)),
                       ("gemm", (256, 256) if smoke else (4096, 4096))):
        W = torch.randn(d, d) * 0.02
        xin = torch.randn(M, d)
        f = (lambda: torch.mv(W, xin[0])) if M == 1 else (lambda: xin @ W.t())
        t = median_time(f, reps)
        emit(f"BM_quant_{op}_fp32/pytorch/M:{M}/out:{d}/in:{d}", t, flops=2 * M * d * d / t)
        pw, aw = nf4_quant(W.reshape(-1))
        qw, sw = int8_quant(W.reshape(-1))
        deq = {"nf4": lambda: nf4_dequant(pw, aw).view(d, d),
               "int8": lambda: int8_dequant(qw, sw).view(d, d)}
        for fmt, dq in deq.items():
            g = (lambda: torch.mv(dq(), xin[0])) if M == 1 else (lambda: xin @ dq().t())
            t = median_time(g, reps)
            emit(f"BM_quant_{op}_{fmt}/pytorch/M:{M}/out:{d}/in:{d}", t,
                 flops=2 * M * d * d / t)
        if M == 1:  # PyTorch's own dynamic int8 linear (fbgemm): int8 W, x quantized per call
            try:
                lin = torch.nn.Linear(d, d, bias=False)
                lin.weight.data.copy_(W)
                qlin = torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
                with torch.no_grad():
                    t = median_time(lambda: qlin(xin), reps)
                emit(f"BM_quant_gemv_int8dyn/pytorch/M:1/out:{d}/in:{d}/threads:1", t,
                     flops=2 * d * d / t)
            except Exception as e:  # quantized engine missing in this build
                print(f"# dynamic int8 linear unavailable: {e}", file=sys.stderr)
    print(f"# peer peak RSS {peak_rss_mib():.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
