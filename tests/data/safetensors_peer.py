#!/usr/bin/python3
"""Independent safetensors writer/reader (struct + json only) for lowmem's round-trip test.

    safetensors_peer.py write PATH   writes the tensors below
    safetensors_peer.py check PATH   reads PATH (as written by lowmem) and checks the same tensors
"""
import json
import struct
import sys

# name -> (dtype, shape, struct format char, values)
TENSORS = {
    "w.f32": ("F32", [2, 3], "f", [0.5, -1.25, 3.0, 1e-3, -7.5, 2.0]),
    "b.i8": ("I8", [5], "b", [-128, -1, 0, 1, 127]),
    "m.u8": ("U8", [2, 2], "B", [0, 1, 254, 255]),
    "h.bf16": ("BF16", [3], "H", [0x3F80, 0xC020, 0x0000]),  # 1.0, -2.5, 0.0
    "f.f16": ("F16", [2], "e", [1.5, -0.25]),
}
METADATA = {"format": "pt", "writer": "python"}


def write(path):
    header, blobs, offset = {"__metadata__": METADATA}, [], 0
    for name, (dt, shape, fmt, vals) in TENSORS.items():
        blob = struct.pack("<%d%s" % (len(vals), fmt), *vals)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def check(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    buf = data[8 + n:]
    assert header.get("__metadata__") == {"format": "pt", "writer": "lowmem"}, header.get("__metadata__")
    for name, (dt, shape, fmt, vals) in TENSORS.items():
        e = header[name]
        assert e["dtype"] == dt and e["shape"] == shape, (name, e)
        b, en = e["data_offsets"]
        got = list(struct.unpack("<%d%s" % (len(vals), fmt), buf[b:en]))
        want = list(struct.unpack("<%d%s" % (len(vals), fmt),
                                  struct.pack("<%d%s" % (len(vals), fmt), *vals)))  # as stored
        assert got == want, (name, got, want)
    print("python read lowmem's file: ok")


if __name__ == "__main__":
    {"write": write, "check": check}[sys.argv[1]](sys.argv[2])
