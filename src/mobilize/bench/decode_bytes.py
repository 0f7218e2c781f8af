"""Benchmark: what decode time a head layout costs. ONNX Runtime's MatMulNBits on one token, in the layouts mobilize
and the GenAI builder store Gemma 3 270M's head, timed in one run (layouts interleaved, medians), against their bytes.

    python -m mobilize.bench.decode_bytes [--threads 2] [--rounds 7] [--packages DIR ...] [--json FILE]

The head (640 -> 262,144: the tied table) is 60% of what a token reads. Random codes, accuracy level 4 (int8
activations) as both tools write it. Time follows bytes, at a rate that depends on the block (blocks of 32 pay per
block): which bits a recipe keeps decides decode speed. `--packages` adds up, for ONNX packages, the bytes every
MatMulNBits reads per token (codes, scales, zero points: the head included, the embedding lookup not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

# A head layout: its MatMulNBits parts (input channels, bits, block, zero points), summed by an Add when two
HEADS = {
    "builder int4: 4-bit blocks of 32 (fp32 scales)": [(640, 4, 32, False)],
    "mobilize int4: 256 channels 8-bit blocks of 128 + 384 4-bit blocks of 64 with zero points": [
        (256, 8, 128, False), (384, 4, 64, True)],
    "split, 128 channels 8-bit + 512 4-bit blocks of 64 with zero points": [(128, 8, 128, False), (512, 4, 64, True)],
    "int4-head8: 8-bit blocks of 128": [(640, 8, 128, False)],
    "4-bit blocks of 64 with zero points": [(640, 4, 64, True)],
    "4-bit blocks of 128": [(640, 4, 128, False)],
    "8-bit blocks of 32": [(640, 8, 32, False)],
}  # fmt: skip
N = 262144  # Gemma 3's vocabulary: the head's rows


def _matmul(rng, name: str, k: int, bits: int, block: int, zero_points: bool):
    from onnx import helper, numpy_helper

    blocks = k // block
    arrays = [rng.integers(0, 256, size=(N, blocks, block * bits // 8), dtype=np.uint8),
              (rng.random(N * blocks, dtype=np.float32) * 0.01).astype(np.float32)]  # fmt: skip
    if zero_points:
        arrays.append(np.full(N * -(-blocks // (8 // bits)), 0x88 if bits == 4 else 128, dtype=np.uint8))
    names = [f"{name}_{part}" for part in ("codes", "scales", "zero_points")[: len(arrays)]]
    node = helper.make_node("MatMulNBits", [f"{name}_x", *names], [f"{name}_y"], domain="com.microsoft", K=k, N=N,
                            bits=bits, block_size=block, accuracy_level=4)  # fmt: skip
    tensors = [numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True)]
    return node, tensors, sum(a.nbytes for a in arrays)


def _model(parts, seed: int = 0) -> tuple[bytes, int]:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, inputs, size = [], [], [], 0
    for i, (k, bits, block, zero_points) in enumerate(parts):
        node, arrays, nbytes = _matmul(rng, f"p{i}", k, bits, block, zero_points)
        nodes.append(node)
        inits += arrays
        size += nbytes
        inputs.append(helper.make_tensor_value_info(f"p{i}_x", TensorProto.FLOAT, [1, 1, k]))
    outs = [n.output[0] for n in nodes]
    nodes.append(helper.make_node("Add" if len(outs) == 2 else "Identity", outs, ["y"]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])],
                              inits)  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString(), size


def matmul_bytes(package: str) -> int:
    """Bytes of every MatMulNBits input initializer (codes, scales, zero points) of an ONNX package's model."""
    import onnx

    model = onnx.load(f"{package}/model.onnx", load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    return sum(sizes.get(i, 0) for node in model.graph.node if node.op_type == "MatMulNBits" for i in node.input[1:])


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per form per round (their median)")
    ap.add_argument("--packages", nargs="*", default=[], help="ONNX package directories: their matmuls' bytes")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions, sizes, feeds = {}, {}, {}
    rng = np.random.default_rng(1)
    for name, parts in HEADS.items():
        blob, sizes[name] = _model(parts)
        sessions[name] = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        feeds[name] = {f"p{i}_x": rng.random((1, 1, p[0]), dtype=np.float32) for i, p in enumerate(parts)}
    times: dict[str, list[float]] = {name: [] for name in HEADS}
    for r in range(args.rounds):
        for name in list(HEADS)[:: 1 if r % 2 == 0 else -1]:  # alternate the order: drift hits all alike
            s, feed = sessions[name], feeds[name]
            for _ in range(3):
                s.run(None, feed)
            calls = []
            for _ in range(args.calls):
                t = time.perf_counter()
                s.run(None, feed)
                calls.append(time.perf_counter() - t)
            times[name].append(statistics.median(calls))
    result = {"head": [640, N], "threads": args.threads, "rounds": args.rounds, "heads": {}}
    print(f"a 640 -> {N} head in MatMulNBits, one token, {args.threads} threads, medians of {args.rounds} rounds")
    print(f"{'layout':92}{'MB':>7}{'ms':>7}{'GB/s':>6}")
    for name in HEADS:
        ms = statistics.median(times[name]) * 1e3
        gbs = sizes[name] / ms / 1e6
        result["heads"][name] = {"bytes": sizes[name], "ms": ms, "gb_per_s": gbs, "samples_ms": times[name]}
        print(f"{name:92}{sizes[name] / 1e6:7.1f}{ms:7.3f}{gbs:6.1f}")
    if args.packages:
        result["packages"] = {p: matmul_bytes(p) for p in args.packages}
        for p, b in result["packages"].items():
            print(f"{p}: MatMulNBits read {b / 1e6:.1f} MB per token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
