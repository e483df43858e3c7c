"""PTX for a named GPU target (sm_90) from the Triton kernels, on a machine without a GPU.

The PTX is generated in a subprocess without TRITON_INTERPRET (the interpreter's kernels cannot
be compiled), then assembled here with the ptxas that ships with Triton: the PTX is valid for
sm_90a, its entry takes exactly the declared arguments (tensors, row count, output: what
TensorRT's ahead-of-time plugin passes), and the kernels do not spill registers.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="triton wheels exist for Linux only")

from fffcompile.errors import InternalError  # noqa: E402

pytestmark = pytest.mark.triton
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

# name: (form, dtype, config arguments, declared parameters)
KERNELS = {
    "leaf_mlp_fp32": ("leaf_mlp", "float32", (768, 32, 768, 8, "gelu", "ge", True), 9),
    "leaf_mlp_bf16": ("leaf_mlp", "bfloat16", (768, 32, 768, 8, "gelu", "ge", True), 9),
    "leaf_linear_fp16": ("leaf_mlp", "float16", (13, 5, 5, 3, "identity", "gt", False), 7),
    "neuron_tree_fp16": ("neuron_tree", "float16", (768, 768, 1, 11, "gelu", "gt"), 7),
    "neuron_tree_fp32": ("neuron_tree", "float32", (64, 32, 4, 5, "tanh", "ge"), 7),
}

GENERATE = textwrap.dedent("""
    import json, sys, torch
    from fffcompile.runtime import triton_kernels as tk, triton_ptx as tp
    out, kernels = sys.argv[1], json.loads(sys.argv[2])
    summary = {}
    for name, (form, dtype, args, _) in kernels.items():
        compile_, config = ((tp.compile_leaf_mlp_tree, tk.LeafMLPConfig) if form == "leaf_mlp"
                            else (tp.compile_neuron_tree, tk.NeuronTreeConfig))
        k = compile_(getattr(torch, dtype), config(*args), arch=90)
        open(f"{out}/{name}.ptx", "w").write(k.ptx)
        summary[name] = dict(entry=k.name, threads=k.threads, shared=k.shared_bytes, block_rows=k.block_rows,
                             parameters=k.parameters)
    json.dump(summary, open(f"{out}/summary.json", "w"))
""")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", GENERATE, str(out), json.dumps(KERNELS)], env=env, check=True, timeout=600)
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_ptx_for_sm90_assembles_with_exactly_the_declared_parameters(generated, name, tmp_path):
    out, summary = generated
    ptx = (out / f"{name}.ptx").read_text()
    meta = summary[name]
    assert re.search(r"^\.target sm_90a$", ptx, re.M)
    entry = re.search(r"\.entry\s+" + meta["entry"] + r"\s*\(([^)]*)\)", ptx).group(1)
    declared = KERNELS[name][3]
    assert entry.count(".param") == meta["parameters"] == declared
    assert meta["threads"] == 128 and meta["block_rows"] >= 1
    result = subprocess.run([PTXAS, "-arch=sm_90a", "-v", str(out / f"{name}.ptx"), "-o", str(tmp_path / "k.cubin")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "0 bytes spill stores" in result.stderr and (tmp_path / "k.cubin").stat().st_size > 0


def test_hidden_parameters_are_removed_only_when_unused():
    from fffcompile.runtime.triton_ptx import entry_parameters, strip_hidden_parameters
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n{ ld.param.u64 %rd1, [k_param_0]; }"
    stripped = strip_hidden_parameters(ptx, "k", 2, 0, 0)
    assert entry_parameters(stripped, "k") == ["k_param_0", "k_param_1"]
    assert stripped.endswith("{ ld.param.u64 %rd1, [k_param_0]; }")
    with pytest.raises(InternalError, match="scratch memory"):
        strip_hidden_parameters(ptx, "k", 2, 16, 0)
    with pytest.raises(InternalError, match="reads its hidden parameters"):
        strip_hidden_parameters(ptx, "k", 0, 0, 0)
