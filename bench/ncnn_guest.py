"""Run an ncnn model once and count its instructions: the guest half of bench/peers_arm.py.

Runs in an arm64 Python under qemu-aarch64 with edgec's counting plugin (no
edgec, no torch there: ncnn's aarch64 wheel and numpy only), one thread:

    qemu-aarch64 -L ROOT -cpu cortex-a53 -plugin libedgec-icount.so ROOT/usr/bin/python3.11 \\
        ncnn_guest.py GUEST_COUNTER_PY MODEL.ncnn.param MODEL.ncnn.bin INPUT.npy OUTPUT.npy

INPUT.npy is the (1, C, H, W) float32 input; OUTPUT.npy gets ncnn's output
(batch axis restored) for the host to check against PyTorch; stdout gets one
JSON line: runtimes/guest_counter.count_calls of one inference (an extractor,
the input, the extraction: what an ncnn user calls per inference), counted
twice after one uncounted run.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np


def main() -> None:
    counter_path, param, weights, input_path, output_path = sys.argv[1:6]
    spec = importlib.util.spec_from_file_location("guest_counter", counter_path)
    guest_counter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guest_counter)

    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    if net.load_param(param) != 0 or net.load_model(weights) != 0:
        raise SystemExit(f"ncnn cannot load {param} / {weights}")
    x = np.ascontiguousarray(np.load(input_path)[0], dtype=np.float32)
    image = ncnn.Mat(x)
    result = {}

    def infer() -> None:
        extractor = net.create_extractor()
        extractor.input("in0", image)
        status, output = extractor.extract("out0")
        if status != 0:
            raise RuntimeError(f"ncnn extract failed with status {status}")
        result["output"] = output

    counts = guest_counter.count_calls(infer, number=1, repeat=2)
    np.save(output_path, np.array(result["output"])[np.newaxis])
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
