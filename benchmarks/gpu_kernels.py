"""GPU timings of the fused ops: dense layer vs the reference op vs the Triton kernel, one run.

    python benchmarks/gpu_kernels.py [--dtype float16] [--rows 1 4096]

Shapes: form A like a ViT-B FFF (768 -> 768, depth 8, leaf width 32) and form B like
UltraFastBERT 1x11 (768 -> 768, one tree of depth 11, 4095 neurons). "dense" is the layer of
the same training width (form A: 2^D * l hidden units; form B: the P n neurons) as two
matmuls with the activation between. Every timing is triton.testing.do_bench's median in
milliseconds on the same inputs; the Triton output is checked against the reference first.
Needs a CUDA GPU: without one it says so and exits 2.
"""
import argparse
import sys

import torch

from fffcompile import activations, reference
from fffcompile.compare import compare
from fffcompile.ops import op_arguments


def layers(dtype: torch.dtype):
    sys.path.insert(0, "tests")
    from specs import make_spec
    return {"A: 768->768, depth 8, leaf 32": make_spec(depth=8, d_in=768, d_out=768, leaf_width=32, activation="gelu",
                                                         dtype=dtype),
            "B: 768->768, 1 tree, depth 11": make_spec(form="neuron_tree", depth=11, d_in=768, d_out=768, trees=1,
                                                        activation="gelu", tie="gt", dtype=dtype)}


def dense_weights(spec):
    """(W1 (d_in, H), W2 (H, d_out)) of the dense layer of the same training width."""
    if spec.form == "leaf_mlp":
        return spec.leaf_w1.permute(1, 0, 2).reshape(spec.d_in, -1), spec.leaf_w2.reshape(-1, spec.d_out)
    return spec.node_weight.reshape(-1, spec.d_in).T, spec.out_weight.reshape(-1, spec.d_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from triton.testing import do_bench
    from fffcompile.runtime import triton_kernels

    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}; median ms (do_bench); ratios are dense / kernel")
    for name, spec in layers(dtype).items():
        spec = spec.to(device="cuda")
        run = triton_kernels.leaf_mlp_tree if spec.form == "leaf_mlp" else triton_kernels.neuron_tree
        W1, W2 = dense_weights(spec)
        for rows in args.rows:
            x = torch.randn(rows, spec.d_in, device="cuda", dtype=dtype)
            result = compare(run(x, *op_arguments(spec)), reference.hard(spec, x), exclude=reference.near_ties(spec, x))
            if not result:
                print(f"{name}, {rows} rows: the Triton kernel disagrees with the reference: {result}", file=sys.stderr)
                return 1
            dense = do_bench(lambda: activations.apply(spec.activation, x @ W1) @ W2)
            ref = do_bench(lambda: reference.hard(spec, x))
            kernel = do_bench(lambda: run(x, *op_arguments(spec)))
            print(f"{name:32s} rows {rows:5d}: dense {dense:8.4f}  reference op {ref:8.4f}  triton {kernel:8.4f}"
                  f"  dense/triton {dense / kernel:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
