#!/usr/bin/python3
"""Checks a peft-format LoRA/DoRA adapter directory written by lowmem's ViT demo, with the
standard library only (struct + json; peft itself is not installed on the test machine).

usage: peft_adapter_check.py DIR [--dora]

Verifies: adapter_model.safetensors parses (8-byte little-endian header length, JSON header,
contiguous non-overlapping F32 data), every key is under base_model.model., each target module in
adapter_config.json has lora_A.weight [r, in] and lora_B.weight [out, r] (and, with use_dora,
lora_magnitude_vector [out]), the config carries peft's LoRA fields, and the trained B is not all
zeros (peft initialises B = 0, so a trained adapter must have moved it). Prints one summary line.
"""
import json
import math
import os
import struct
import sys


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    data = blob[8 + n :]
    tensors = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        begin, end = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        assert end - begin == 4 * count, name
        assert 0 <= begin <= end <= len(data), name
        spans.append((begin, end))
        tensors[name] = (info["shape"], struct.unpack("<%df" % count, data[begin:end]))
    spans.sort()
    for (b0, e0), (b1, e1) in zip(spans, spans[1:]):
        assert e0 <= b1, "overlapping tensors"
    return header.get("__metadata__", {}), tensors


def main():
    d = sys.argv[1]
    dora = "--dora" in sys.argv[2:]
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
                "use_dora", "use_rslora", "task_type", "base_model_name_or_path",
                "modules_to_save", "fan_in_fan_out", "inference_mode", "init_lora_weights"):
        assert key in cfg, "adapter_config.json lacks " + key
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == dora
    assert cfg["task_type"] is None and cfg["fan_in_fan_out"] is False
    meta, t = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    assert meta.get("format") == "pt"
    r = cfg["r"]
    moved = 0
    for mod in cfg["target_modules"]:
        p = "base_model.model." + mod
        a_shape, _ = t[p + ".lora_A.weight"]
        b_shape, b = t[p + ".lora_B.weight"]
        assert a_shape[0] == r and b_shape[1] == r, mod
        assert all(math.isfinite(v) for v in b)
        moved += any(v != 0.0 for v in b)
        if dora:
            m_shape, m = t[p + ".lora_magnitude_vector"]
            assert m_shape == [b_shape[0]] and all(v > 0 for v in m), mod
    for mod in cfg["modules_to_save"] or []:
        assert "base_model.model." + mod + ".weight" in t, mod
    for k in t:
        assert k.startswith("base_model.model."), k
    assert moved == len(cfg["target_modules"]), "some lora_B still zero"
    print("peft adapter OK: %d tensors, %d target modules, r=%d, use_dora=%s"
          % (len(t), len(cfg["target_modules"]), r, dora))


if __name__ == "__main__":
    main()
