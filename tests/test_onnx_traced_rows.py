"""FFF regions the legacy exporter bound to the traced row count (``fffcompile.onnx.traced_rows``).

fastfeedforward's eval forward descends batched, then loops over the rows in Python for the leaves: the
legacy exporter unrolls that loop over the traced rows. A scatter tree's ``zeros_like`` becomes a constant of
the traced shape, and so does a soft tree's ``new_ones`` of the input's leading dims read as Python ints.
Such files run (or are right) only at the traced shape; the CLI rewrites the region to one
batch-generic fffcompile node, verifies the original at its traced shape only and says so. Every file here is
checked at sizes other than the traced ones against a per-row reference computed in torch from the module's
own parameters, and the original is shown to be wrong or failing there. A baked look-alike (swapped children,
rows that read each other) is left unchanged.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, seed as hypothesis_seed, settings, strategies as st
from torch import nn

from fffcompile import reference
from fffcompile.cli import main
from fffcompile.onnx.contract import attribute, is_fff_node
from fffcompile.onnx.verify import run
from fffcompile.spec import FFFSpec

TRACED_NOTE = "the original runs only at its traced shape"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def export_legacy(module: nn.Module, x: torch.Tensor, path) -> str:
    dims = dict(enumerate(["B", "S"][:x.dim() - 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": dims, "y": dims})
    return str(path)


def fff_nodes(path) -> list:
    return [n for n in onnx.load(str(path)).graph.node if is_fff_node(n)]


def original_fails_or_differs(src, x: np.ndarray, want: np.ndarray) -> bool:
    try:
        y = run(src, {"x": x})["y"]
    except Exception:
        return True
    return y.shape != want.shape or not np.allclose(y, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max())))


# ---------------------------------------------------------------- fastfeedforward's eval forward, unrolled over rows

def fastfeedforward(d_in: int, leaf: int, d_out: int, depth: int, seed: int) -> nn.Module:
    from fastfeedforward import FFF
    torch.manual_seed(seed)
    return FFF(d_in, leaf, d_out, depth).eval()


def per_row(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The module's own eval forward, one row at a time (each row its own batch of 1)."""
    rows = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        y = torch.cat([module.eval_forward(r[None]) for r in rows])
    return y.reshape(*x.shape[:-1], -1).double().numpy()


def spec_of(m) -> FFFSpec:
    """fastfeedforward's tables as a spec; its eval forward adds no leaf output bias."""
    return FFFSpec(form="leaf_mlp", depth=int(m.depth.item()), activation="relu", node_weight=m.node_weights.detach(),
                   node_bias=m.node_biases.detach()[:, 0], leaf_w1=m.w1s.detach(), leaf_b1=m.b1s.detach(),
                   leaf_w2=m.w2s.detach(), leaf_b2=torch.zeros(m.w2s.shape[0], m.w2s.shape[2]), tie="ge")


@pytest.mark.parametrize("traced, others, depth", [((3, 5, 16), [(1, 1, 16), (4, 6, 16), (2, 3, 16)], 3),
                                                   ((7, 16), [(1, 16), (13, 16), (3, 16)], 3),
                                                   # depth 1: its one node's row is gathered by a constant index
                                                   ((5, 16), [(1, 16), (9, 16)], 1)])
def test_fastfeedforward_eval_export_generalised(tmp_path, capsys, traced, others, depth):
    module = fastfeedforward(16, 4, 16, depth, seed=len(traced))
    src = export_legacy(module, torch.randn(*traced), tmp_path / "fff.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", out)
    assert code == 0, err
    assert len(fff_nodes(out)) == 1
    assert TRACED_NOTE in stdout and "verified there; the rewritten node is batch-generic" in stdout
    assert "exactness y: PASS" in stdout
    spec = spec_of(module)
    rng = np.random.default_rng(7)
    for shape in others:
        x = rng.standard_normal(shape).astype(np.float32)
        want = per_row(module, torch.from_numpy(x))
        got = run(str(out), {"x": x})["y"]
        close(got, want)
        close(got, reference.hard(spec, torch.from_numpy(x)).double().numpy())
        assert original_fails_or_differs(src, x, want)      # the file itself was bound to its traced rows


def test_fastfeedforward_trt_target_inspect_and_verify(tmp_path, capsys):
    module = fastfeedforward(12, 3, 5, 2, seed=3)
    src = export_legacy(module, torch.randn(2, 4, 12), tmp_path / "fff.onnx")
    code, stdout, err = cli(capsys, "inspect", src)
    assert code == 0 and "would rewrite" in stdout and "no reading" not in stdout, stdout
    out = tmp_path / "out.trt.onnx"
    code, stdout, err = cli(capsys, "export", src, "--target", "trt", "-o", out)
    assert code == 0, err
    nodes = fff_nodes(out)
    assert len(nodes) == 1 and attribute(nodes[0], "plugin_namespace") is not None
    x = np.random.default_rng(1).standard_normal((5, 3, 12)).astype(np.float32)
    close(run(str(out), {"x": x})["y"], per_row(module, torch.from_numpy(x)))
    code, stdout, err = cli(capsys, "verify", src, out)          # the verify subcommand finds the traced shape too
    assert code == 0 and "PASS" in stdout and TRACED_NOTE in stdout, stdout + err


def test_fastfeedforward_inside_a_model(tmp_path, capsys):
    """The bound region reads a LayerNorm's output: the whole model is verified where that value has the traced rows."""
    layer = fastfeedforward(16, 4, 16, 3, seed=1)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), layer, nn.GELU(), nn.Linear(16, 5)).eval()
    src = export_legacy(model, torch.randn(2, 3, 16), tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", out)
    assert code == 0, err
    assert len(fff_nodes(out)) == 1 and TRACED_NOTE in stdout and "exactness y: PASS" in stdout
    x = np.random.default_rng(0).standard_normal((4, 5, 16)).astype(np.float32)
    with torch.no_grad():
        h = model[1](model[0](torch.from_numpy(x)))
        want = model[4](model[3](torch.from_numpy(per_row(layer, h)).float())).double().numpy()
    close(run(str(out), {"x": x})["y"], want)


@settings(max_examples=3, deadline=None)
@hypothesis_seed(20261124)
@given(depth=st.integers(1, 3), lead=st.sampled_from([(2,), (5,), (1, 3), (2, 2), (3, 2)]), seed=st.integers(0, 99))
def test_traced_shapes_property(tmp_path_factory, depth, lead, seed):
    """Any traced shape and depth: one node, right at other sizes (the CLI's API underneath, same code path)."""
    from fffcompile.onnx.onnx_frontend import optimize_onnx
    module = fastfeedforward(6, 2, 4, depth, seed)
    path = tmp_path_factory.mktemp("p") / "fff.onnx"
    src = export_legacy(module, torch.randn(*lead, 6), path)
    optimized, report = optimize_onnx(onnx.load(src))
    assert sum(is_fff_node(n) for n in optimized.graph.node) == 1, str(report)
    assert any(TRACED_NOTE in n for n in report.notes)
    x = np.random.default_rng(seed).standard_normal((4, 2, 6)[-len(lead) - 1:]).astype(np.float32)
    close(run(optimized, {"x": x})["y"], per_row(module, torch.from_numpy(x)))


# ---------------------------------------------------------------- a scatter tree whose zeros_like is a baked constant

class MultiTreeScatter(nn.Module):
    """Form B, P trees: decisions on linear_in's outputs seen as (..., P, n); the visited nodes by gather from a
    zeros_like root; one scatter of the visited nodes into a mask; relu; linear_out."""

    def __init__(self, d, o, depth, P):
        super().__init__()
        self.depth, self.P, self.n = depth, P, 2 ** (depth + 1) - 1
        self.linear_in, self.linear_out = nn.Linear(d, P * self.n), nn.Linear(P * self.n, o)

    def forward(self, x):
        a = self.linear_in(x).unflatten(-1, (self.P, self.n))
        dec = (a > 0).long()
        node = torch.zeros_like(dec[..., :1])
        visited = [node]
        for _ in range(self.depth):
            node = 2 * node + 1 + dec.gather(-1, node)
            visited.append(node)
        with torch.no_grad():
            mask = torch.zeros_like(a).scatter(-1, torch.cat(visited, -1), 1.0)
        return self.linear_out((F.relu(a) * mask).flatten(-2))

    def hard_row(self, x):
        """One row, in float64: every tree's path, its neurons' relu times their output columns."""
        W, b = self.linear_in.weight.double(), self.linear_in.bias.double()
        V, c = self.linear_out.weight.double(), self.linear_out.bias.double()
        a, y = W @ x.double() + b, c.clone()
        for p in range(self.P):
            k = 0
            for _ in range(self.depth + 1):
                j = p * self.n + k
                y = y + F.relu(a[j]) * V[:, j]
                k = 2 * k + (2 if a[j] > 0 else 1)
        return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_tree_with_a_baked_zeros_like(tmp_path, capsys, dtype):
    torch.manual_seed(5)
    module = MultiTreeScatter(10, 6, 2, 2).to(dtype)
    src = export_legacy(module, torch.randn(2, 3, 10).to(dtype), tmp_path / "scatter.onnx")
    x_other = np.zeros((4, 6, 10), module.linear_in.weight.detach().numpy().dtype)
    with pytest.raises(Exception, match="failed to run"):      # its root index is a constant of (2, 3, 2, 1)
        run(src, {"x": x_other})
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", out)
    assert code == 0, err
    assert len(fff_nodes(out)) == 1
    assert f"{TRACED_NOTE} (2, 3, 10)" in stdout
    rng = np.random.default_rng(3)
    for shape in [(1, 1, 10), (4, 6, 10), (3, 1, 10)]:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
        with torch.no_grad():
            want = torch.stack([module.hard_row(r) for r in x.reshape(-1, 10)]).reshape(*shape[:-1], -1).numpy()
        close(run(str(out), {"x": x.numpy()})["y"], want, rtol=1e-4 if dtype == torch.float32 else 2e-3)


# ---------------------------------------------------------------- a soft tree whose path products start from a baked constant

class SoftTreeBakedOnes(nn.Module):
    """Soft form A: mu starts as ones of the input's leading dims read as Python ints (a constant of the traced
    shape in a legacy export), then level by level outer products with [1 - p, p]; silu leaves by einsum."""

    def __init__(self, d, o, depth, width):
        super().__init__()
        nodes, leaves = 2 ** depth - 1, 2 ** depth
        self.depth = depth
        self.router = nn.Linear(d, nodes)
        self.w1 = nn.Parameter(torch.randn(leaves, d, width) / d ** 0.5)
        self.b1 = nn.Parameter(torch.randn(leaves, width) * 0.1)
        self.w2 = nn.Parameter(torch.randn(leaves, width, o) / width ** 0.5)
        self.b2 = nn.Parameter(torch.randn(leaves, o) * 0.1)

    def forward(self, x):
        p = torch.sigmoid(self.router(x))
        mu = x.new_ones([int(v) for v in x.shape[:-1]] + [1])
        for k in range(self.depth):
            level = p[..., 2 ** k - 1:2 ** (k + 1) - 1]
            mu = (mu.unsqueeze(-1) * torch.stack([1 - level, level], -1)).flatten(-2)
        h = F.silu(torch.einsum("...d,ldh->...lh", x, self.w1) + self.b1)
        return (mu.unsqueeze(-1) * (torch.einsum("...lh,lho->...lo", h, self.w2) + self.b2)).sum(-2)

    def hard_row(self, x):
        """One row, in float64: the descent [z >= 0] through the router, the reached leaf's MLP."""
        z = self.router.weight.double() @ x.double() + self.router.bias.double()
        n = 0
        for _ in range(self.depth):
            n = 2 * n + (2 if z[n] >= 0 else 1)
        j = n - (2 ** self.depth - 1)
        h = F.silu(x.double() @ self.w1[j].double() + self.b1[j].double())
        return h @ self.w2[j].double() + self.b2[j].double()


def test_soft_tree_with_a_baked_constant(tmp_path, capsys):
    torch.manual_seed(9)
    module = SoftTreeBakedOnes(8, 5, 3, 4).train()
    src = export_legacy(module, torch.randn(2, 3, 8), tmp_path / "soft.onnx")
    with pytest.raises(Exception, match="failed to run"):
        run(src, {"x": np.zeros((3, 7, 8), np.float32)})
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", out)
    assert code == 0, err
    assert len(fff_nodes(out)) == 1 and f"{TRACED_NOTE} (2, 3, 8)" in stdout and "exactness y: PASS" in stdout
    rng = np.random.default_rng(4)
    for shape in [(1, 1, 8), (3, 7, 8)]:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        with torch.no_grad():
            want = torch.stack([module.hard_row(r) for r in x.reshape(-1, 8)]).reshape(*shape[:-1], -1).numpy()
        close(run(str(out), {"x": x.numpy()})["y"], want)


# ---------------------------------------------------------------- look-alikes, baked the same way: left unchanged

def _look_alike(kind: str):
    from fastfeedforward import FFF

    class LookAlike(FFF):
        def eval_forward(self, x):
            shape = x.shape
            x = x.view(-1, x.shape[-1])
            nodes = torch.zeros((x.shape[0],), dtype=torch.long)
            for i in range(self.depth.item()):
                z = (x * self.node_weights.index_select(0, nodes)).sum(-1) + self.node_biases.index_select(0, nodes)[:, 0]
                step = (z >= 0).long()
                nodes = nodes * 2 + (2 - step if kind == "swapped_children" else 1 + step)
            leaves = nodes - (2 ** self.depth.item() - 1)
            out = torch.empty((x.shape[0], self.output_width))
            for i in range(leaves.shape[0]):
                row = x[(i + 1) % x.shape[0]] if kind == "neighbour_rows" else x[i]
                h = torch.relu(row[None] @ self.w1s[leaves[i]] + self.b1s[leaves[i]])
                out[i] = (h @ self.w2s[leaves[i]])[0]
            return out.view(*shape[:-1], self.output_width)

    torch.manual_seed(11)
    return LookAlike(8, 3, 5, 2).eval()


@pytest.mark.parametrize("kind", ["plain", "swapped_children", "neighbour_rows"])
def test_baked_look_alikes_left_unchanged(tmp_path, capsys, kind):
    module = _look_alike(kind)
    src = export_legacy(module, torch.randn(2, 3, 8), tmp_path / "look.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", out)
    assert code == 0, err
    if kind == "plain":         # the same builder, no look-alike: rewritten (so what the others lack is the tree)
        assert len(fff_nodes(out)) == 1 and TRACED_NOTE in stdout
        x = np.random.default_rng(2).standard_normal((3, 7, 8)).astype(np.float32)
        close(run(str(out), {"x": x})["y"], per_row(module, torch.from_numpy(x)))
        return
    assert "no reading of its weights reproduces its output" in stdout      # a candidate, refused by the numbers
    assert not fff_nodes(out) and "nothing to rewrite" in stdout and TRACED_NOTE not in stdout
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == [n.op_type for n in onnx.load(src).graph.node]
