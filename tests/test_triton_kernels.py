"""The Triton kernels against the reference: every form, activation, tie rule, fp32/fp16/bf16,
batch 0 and 1, leading dims.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton) on CPU tensors; with one, on CUDA tensors, compiled. Rows whose path meets
a decision within rounding of zero are excluded (``reference.near_ties``): the kernel sums dot
products in another order than torch. Interpreter caveat: its float32 -> bfloat16 cast truncates
(the compiled kernel rounds to nearest even), so bf16 outputs may differ from the reference by
one bf16 ulp; the default bf16 tolerance (2e-2) covers that, no wider tolerance is used.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fffcompile import reference
from fffcompile.compare import compare
from fffcompile.ops import op_arguments
from fffcompile.runtime import cuda_dispatch
from specs import batch_shapes, make_spec, random_input, specs

pytest.importorskip("triton", reason="triton wheels exist for Linux only")
from fffcompile.runtime import triton_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 without a GPU"

pytestmark = pytest.mark.triton
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run_kernel(spec, x):
    launch = triton_kernels.leaf_mlp_tree if spec.form == "leaf_mlp" else triton_kernels.neuron_tree
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in op_arguments(spec)]
    return launch(x.to(DEVICE), *args).cpu()


def assert_matches_reference(spec, x):
    y = run_kernel(spec, x)
    expected = reference.hard(spec, x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    result = compare(y, expected, exclude=reference.near_ties(spec, x, dtype=spec.dtype))
    assert result, f"{spec.describe()}, {spec.dtype}, lead {tuple(x.shape[:-1])}: {result}"
    return result


@settings(max_examples=40)
@given(spec=specs(forms=("leaf_mlp",), dtypes=KERNEL_DTYPES, master=False), lead=batch_shapes(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_leaf_mlp_tree_kernel_matches_reference(spec, lead, seed):
    assert_matches_reference(spec, random_input(spec, lead, seed))


@settings(max_examples=40)
@given(spec=specs(forms=("neuron_tree",), dtypes=KERNEL_DTYPES, master=False), lead=batch_shapes(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_neuron_tree_kernel_matches_reference(spec, lead, seed):
    assert_matches_reference(spec, random_input(spec, lead, seed))


@pytest.mark.parametrize("form, linear", [("leaf_mlp", False), ("leaf_mlp", True), ("neuron_tree", False)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_many_blocks_of_rows_inputs_and_outputs(form, linear, dtype):
    # Widths above one block of the reduction and of the output, rows not a multiple of BLOCK_ROWS.
    spec = make_spec(form=form, depth=4, d_in=300, d_out=70, leaf_width=40, trees=3, activation="gelu",
                     linear_leaves=linear, dtype=dtype, seed=11)
    x = random_input(spec, (37,), seed=12)
    result = assert_matches_reference(spec, x)
    assert result.rows + result.ties_excluded == 37 and result.rows >= 30


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
@pytest.mark.parametrize("lead", [(0,), (1,), (3, 0), (2, 3)])
def test_batch_zero_one_and_leading_dims(form, lead):
    spec = make_spec(form=form, depth=2, trees=2, seed=3)
    x = random_input(spec, lead, seed=4)
    y = run_kernel(spec, x)
    assert y.shape == (*lead, spec.d_out)
    assert compare(y, reference.hard(spec, x), exclude=reference.near_ties(spec, x))


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_tie_rule_decides_exact_zero(form):
    # x = 0 and zero node biases make every logit exactly 0: "ge" goes right at every level,
    # "gt" left. The two rules must give different outputs, each the reference's.
    outputs = {}
    for tie in ("ge", "gt"):
        spec = make_spec(form=form, depth=3, trees=2, activation="sigmoid", tie=tie, seed=5)
        spec = spec.replace(node_bias=torch.zeros_like(spec.node_bias))
        x = torch.zeros(4, spec.d_in)
        outputs[tie] = run_kernel(spec, x)
        assert torch.equal(reference.route(spec, x).leaf, torch.full((4, spec.trees), 7 if tie == "ge" else 0))
        assert compare(outputs[tie], reference.hard(spec, x))
    assert not torch.allclose(outputs["ge"], outputs["gt"])


def test_cuda_dispatch_runs_the_kernel_and_falls_back_with_a_reason():
    spec = make_spec(depth=3, dtype=torch.float16, seed=6)
    x = random_input(spec, (9,), seed=7)
    assert cuda_dispatch.triton_refusal(spec) is None
    y = cuda_dispatch.leaf_mlp_tree_cuda(x.to(DEVICE), *[a.to(DEVICE) if isinstance(a, torch.Tensor) else a
                                                          for a in op_arguments(spec)]).cpu()
    assert compare(y, reference.hard(spec, x), exclude=reference.near_ties(spec, x))

    wide = make_spec(depth=1, d_in=3, leaf_width=triton_kernels.MAX_REGISTER_ROW + 1, seed=8)
    assert "leaf hidden width 1025 exceeds 1024" in cuda_dispatch.triton_refusal(wide)
    double = make_spec(form="neuron_tree", depth=2, dtype=torch.float64, seed=9)
    assert "dtype torch.float64" in cuda_dispatch.triton_refusal(double)
    x64 = random_input(double, (5,), seed=10)
    assert torch.equal(cuda_dispatch.neuron_tree_cuda(x64, *op_arguments(double)), reference.hard(double, x64))


def test_cuda_kernels_are_registered_and_importing_fffcompile_imports_no_gpu_backend():
    for op in ("fffcompile::leaf_mlp_tree", "fffcompile::neuron_tree"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    code = ("import sys, fffcompile, fffcompile.runtime; "
            "print(sorted(m for m in ('triton', 'tensorrt', 'tensorrt_rtx') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
