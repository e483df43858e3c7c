"""The fused ops: registered schema, fake impl, numbers == reference, gradients of the hard layer."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fffcompile  # noqa: F401  (registers the ops)
from fffcompile import ops, reference
from fffcompile.compare import compare
from fffcompile.spec import DTYPES
from specs import batch_shapes, make_spec, random_input, specs


def test_schemas():
    assert str(torch.ops.fffcompile.leaf_mlp_tree.default._schema) == (
        "fffcompile::leaf_mlp_tree(Tensor x, Tensor node_weight, Tensor node_bias, Tensor leaf_w1, Tensor leaf_b1, "
        "Tensor? leaf_w2, Tensor? leaf_b2, str activation, str tie) -> Tensor")
    assert str(torch.ops.fffcompile.neuron_tree.default._schema) == (
        "fffcompile::neuron_tree(Tensor x, Tensor node_weight, Tensor node_bias, Tensor out_weight, Tensor out_bias, "
        "str activation, str tie) -> Tensor")


@given(spec=specs(), lead=batch_shapes(), seed=st.integers(0, 2 ** 31 - 1))
def test_op_equals_reference(spec, lead, seed):
    x = random_input(spec, lead, seed)
    out = ops.run_tree(spec, x)
    tree = spec.without_master() if spec.form == "leaf_mlp" else spec
    expected = reference.hard(tree, x)
    assert out.shape == (*lead, spec.d_out) and out.dtype == spec.dtype
    result = compare(out, expected, exclude=reference.near_ties(tree, x))
    assert result, result.summary()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_opcheck(form, dtype):
    spec = make_spec(form=form, depth=2, trees=2, dtype=dtype, activation="gelu")
    x = random_input(spec, (2, 3), 0)
    args = [x] + [a for a in ops.op_arguments(spec)]
    torch.library.opcheck(ops.op_for(spec), tuple(args))


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    torch.manual_seed(0)
    (out * torch.randn_like(out)).sum().backward()
    return [t.grad for t in tensors]


@settings(max_examples=25)
@given(spec=specs(dtypes=(torch.float64,), master=False, max_depth=4, max_width=8), seed=st.integers(0, 2 ** 31 - 1))
def test_gradients_equal_autograd_of_the_hardened_soft_form(spec, seed):
    """With the decisions as steps, the soft form is differentiable in x and the leaves; the op's backward must agree."""
    x = random_input(spec, (2, 5), seed)
    args = list(ops.op_arguments(spec))
    tensors = [x] + [a for a in args if isinstance(a, torch.Tensor)]
    names = ["x"] + [n for n, a in zip(("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")
                                       if spec.form == "leaf_mlp" else
                                       ("node_weight", "node_bias", "out_weight", "out_bias"), args[:-2])
                     if isinstance(a, torch.Tensor)]

    def through_op(x, *weights):
        it = iter(weights)
        call = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        return ops.op_for(spec)(x, *call)

    def through_soft(x, *weights):
        if spec.form == "neuron_tree":   # the dense-times-mask training graph (mask built without grad)
            node_w, node_b, out_w, out_b = weights
            a = torch.einsum("rd,pnd->rpn", x.reshape(-1, spec.d_in), node_w) + node_b
            nodes = reference.route(spec, x.detach()).nodes
            mask = torch.zeros_like(a).scatter_(2, nodes, 1.0)
            from fffcompile import activations
            y = torch.einsum("rpn,pno->ro", activations.apply(spec.activation, a) * mask, out_w) + out_b
            return y.reshape(*x.shape[:-1], spec.d_out)
        return reference.soft(spec.replace(**dict(zip(names[1:], weights))), x, harden=True)

    got, want = _grads(through_op, tensors), _grads(through_soft, tensors)
    if reference.near_ties(spec, x).any():
        return
    for name, g, w in zip(names, got, want):
        if name in ("node_weight", "node_bias") and spec.form == "leaf_mlp":
            assert torch.count_nonzero(g) == 0, "decisions are steps: node rows get no gradient"
            continue
        torch.testing.assert_close(g, w if w is not None else torch.zeros_like(g), rtol=1e-7, atol=1e-9, msg=name)


def test_gradcheck_float64():
    for spec in (make_spec(depth=3, d_in=4, d_out=3, leaf_width=3, dtype=torch.float64, activation="tanh"),
                 make_spec(form="neuron_tree", depth=2, trees=2, d_in=4, d_out=3, dtype=torch.float64, activation="silu")):
        args = list(ops.op_arguments(spec))
        x = random_input(spec, (5,), 3).requires_grad_(True)
        leaves = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.autograd.gradcheck(lambda x, *w: ops.op_for(spec)(x, *w),
                                        (x, *leaves), check_undefined_grad=False)


def test_fake_tensor_shapes_and_export():
    spec = make_spec(depth=3)

    class M(torch.nn.Module):
        def forward(self, x):
            return ops.run_tree(spec, x)

    batch = torch.export.Dim("batch")
    ep = torch.export.export(M(), (torch.randn(4, 6, spec.d_in),), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.fffcompile.leaf_mlp_tree.default]
    x = torch.randn(9, 6, spec.d_in)
    torch.testing.assert_close(ep.module()(x), reference.hard(spec, x))


def test_wrong_input_width_is_a_clear_error():
    spec = make_spec(depth=2, d_in=8)
    with pytest.raises(Exception, match="d_in = 8"):
        ops.run_tree(spec, torch.randn(3, 7))
