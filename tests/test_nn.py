"""fffcompile.nn: training forward = the soft form, eval forward = the fused op, auxiliary losses."""
import pytest
import torch

from fffcompile import FFFSpec, reference
from fffcompile.nn import FFF, NeuronTree, auxiliary_loss


def fff_spec(layer: FFF, source="soft") -> FFFSpec:
    master = {}
    if layer.master_width:
        master = dict(master_w1=layer.master_w1, master_b1=layer.master_b1, master_w2=layer.master_w2,
                      master_b2=layer.master_b2, master_logit=layer.master_logit, master_activation=layer.activation)
    return FFFSpec("leaf_mlp", layer.depth, layer.activation, layer.node_weight, layer.node_bias, layer.leaf_w1,
                   layer.leaf_b1, layer.leaf_w2, layer.leaf_b2, tie=layer.tie, source=source, **master).detached()


@pytest.mark.parametrize("master", [0, 5])
def test_fff_forward_is_soft_in_training_and_hard_in_eval(master):
    torch.manual_seed(0)
    layer = FFF(12, 7, depth=3, leaf_width=6, activation="gelu", master_width=master)
    x = torch.randn(4, 5, 12)
    spec = fff_spec(layer)
    torch.testing.assert_close(layer.train()(x), reference.soft(spec, x))
    torch.testing.assert_close(layer.eval()(x), reference.hard(spec, x))
    layer.train_hardened = True
    torch.testing.assert_close(layer.train()(x), reference.hard(spec, x))


def test_neuron_tree_training_and_eval_agree_with_the_reference():
    torch.manual_seed(0)
    layer = NeuronTree(10, 6, depth=3, trees=2)
    x = torch.randn(3, 4, 10)
    spec = FFFSpec("neuron_tree", 3, "gelu", layer.in_weight, layer.in_bias, out_weight=layer.out_weight,
                   out_bias=layer.out_bias, tie="gt", source="hard").detached()
    torch.testing.assert_close(layer.train()(x), reference.hard(spec, x))
    torch.testing.assert_close(layer.eval()(x), reference.hard(spec, x))


def test_auxiliary_losses_follow_the_published_formulas():
    torch.manual_seed(0)
    layer = FFF(8, 3, depth=2, leaf_width=4)
    x = torch.randn(32, 8)
    layer.train()(x)
    spec = fff_spec(layer)
    mu = reference.leaf_weights(spec, x)
    leaf = reference.route(spec, x).leaf[:, 0]
    counts = torch.bincount(leaf, minlength=4).float()
    expected_balance = 4 / 32 ** 2 * (mu.sum(0) * counts).sum()
    torch.testing.assert_close(layer.load_balancing_loss(), expected_balance)
    p = torch.sigmoid(x @ spec.node_weight.T + spec.node_bias)
    expected_entropy = (-(p * p.log()) - (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(layer.hardening_loss(), expected_entropy)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), FFF(3, 3, depth=1, leaf_width=2))
    model(x)
    total = auxiliary_loss(model, balance=0.5, hardening=2.0)
    parts = sum(0.5 * m.load_balancing_loss() + 2.0 * m.hardening_loss() for m in model if isinstance(m, FFF))
    torch.testing.assert_close(total, parts)
    total.backward()
    assert layer.node_weight.grad is not None and layer.node_weight.grad.abs().sum() > 0


def _train(hardening: float):
    torch.manual_seed(0)
    layer = FFF(4, 1, depth=2, leaf_width=4)
    x = torch.randn(256, 4)
    target = (x[:, :1] > 0).float() * 2 - (x[:, 1:2] > 0).float()
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        task = torch.nn.functional.mse_loss(layer.train()(x), target)
        (task + auxiliary_loss(layer, balance=0.01, hardening=hardening)).backward()
        opt.step()
        losses.append(task.item())
    return losses, layer.hardening_loss().item()


def test_training_with_the_hardening_loss_hardens_the_tree():
    soft_losses, soft_entropy = _train(hardening=0.0)
    hard_losses, hard_entropy = _train(hardening=0.5)
    assert soft_losses[-1] < 0.5 * soft_losses[0] and hard_losses[-1] < 0.5 * hard_losses[0]
    assert hard_entropy < 0.7 * soft_entropy


def test_layers_capture_in_training_mode_without_side_effects():
    layer = FFF(8, 8, depth=2, leaf_width=4).train()
    ep = torch.export.export(layer, (torch.randn(5, 8),))
    assert layer._aux is None
    assert any(n.target == torch.ops.aten.sigmoid.default for n in ep.graph.nodes)
    ep_eval = torch.export.export(layer.eval(), (torch.randn(5, 8),))
    assert [n.target for n in ep_eval.graph.nodes if n.op == "call_function"] == [torch.ops.fffcompile.leaf_mlp_tree.default]


def test_hardened_model_can_be_fine_tuned():
    torch.manual_seed(0)
    layer = FFF(6, 2, depth=2, leaf_width=3).eval()
    x = torch.randn(64, 6)
    target = torch.randn(64, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.node_weight.grad.abs().sum() == 0 and layer.leaf_w2.grad.abs().sum() > 0


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation"):
        FFF(4, 4, 2, 2, activation="swish")
    with pytest.raises(ValueError, match="tie"):
        NeuronTree(4, 4, 2, tie="maybe")


# ---------------------------------------------------------------------- the C++ fast path in eval mode
def _layers():
    torch.manual_seed(3)
    return [FFF(12, 7, depth=3, leaf_width=5, activation="gelu"), FFF(12, 7, depth=2, leaf_width=4, master_width=5),
            NeuronTree(12, 7, depth=3, trees=2, out_bias=True)]


def _op(layer, x):
    """The layer's eval forward through the dispatcher (the op), never the C++ handle."""
    if isinstance(layer, NeuronTree):
        return torch.ops.fffcompile.neuron_tree(x, layer.in_weight, layer.in_bias, layer.out_weight, layer.out_bias,
                                                layer.activation, layer.tie)
    y = torch.ops.fffcompile.leaf_mlp_tree(x, layer.node_weight, layer.node_bias, layer.leaf_w1, layer.leaf_b1,
                                           layer.leaf_w2, layer.leaf_b2, layer.activation, layer.tie)
    if layer.master_width:
        from fffcompile import activations
        master = activations.apply(layer.activation, x @ layer.master_w1 + layer.master_b1) @ layer.master_w2 + layer.master_b2
        k = torch.sigmoid(layer.master_logit)
        y = k * y + (1 - k) * master
    return y


def _kernel_available():
    from fffcompile.runtime import cpu_kernel
    return cpu_kernel.available()


@pytest.mark.parametrize("index", range(3))
def test_eval_layers_run_the_cpp_handle_with_the_ops_numbers_and_follow_the_weights(index):
    if not _kernel_available():
        pytest.skip("no C++ kernel here")
    layer = _layers()[index].eval()
    x = torch.randn(4, 3, 12)
    with torch.no_grad():
        y = layer(x)
        assert layer._fast, "eval CPU inference must run through the C++ handle"
        torch.testing.assert_close(y, _op(layer, x), rtol=0, atol=0)
        weight = layer.out_weight if isinstance(layer, NeuronTree) else layer.leaf_w2
        weight.mul_(-2)                                           # in place (an optimizer step): seen
        torch.testing.assert_close(layer(x), _op(layer, x), rtol=0, atol=0)
        name = "out_weight" if isinstance(layer, NeuronTree) else "leaf_w2"
        setattr(layer, name, torch.nn.Parameter(weight.detach() * 3))   # replaced: rebuilt
        assert layer._fast is None
        torch.testing.assert_close(layer(x), _op(layer, x), rtol=0, atol=0)
        layer.double()                                            # cast: rebuilt for float64
        x64 = x.double()
        torch.testing.assert_close(layer(x64), _op(layer, x64), rtol=0, atol=0)
        assert layer._fast_dtype == torch.float64
        import copy
        import pickle
        torch.testing.assert_close(copy.deepcopy(layer)(x64), layer(x64))
        torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x64), layer(x64))
        layer.train()                                             # training: the training formula, not the handle
        if isinstance(layer, FFF):
            spec = fff_spec(layer)
            torch.testing.assert_close(layer(x64), reference.soft(spec, x64))


@pytest.mark.parametrize("index", range(3))
def test_eval_layers_fast_path_under_autograd_has_the_ops_gradients(index):
    if not _kernel_available():
        pytest.skip("no C++ kernel here")
    layer = _layers()[index].double().eval()
    x = torch.randn(5, 12, dtype=torch.float64)

    def grads(run):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        out = run(xr)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return [out.detach(), xr.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    fast = grads(layer)
    assert layer._fast
    for a, b in zip(fast, grads(lambda xr: _op(layer, xr))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("index", [0, 2])
def test_eval_layers_still_export_trace_and_compile_the_op(index):
    layer = _layers()[index].eval()
    x = torch.randn(3, 12)
    op = torch.ops.fffcompile.neuron_tree if isinstance(layer, NeuronTree) else torch.ops.fffcompile.leaf_mlp_tree
    with torch.no_grad():
        expected = layer(x)
        seen = []
        hook = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
        torch.testing.assert_close(layer(x), expected)
        hook.remove()
        assert len(seen) == 1, "a forward hook must still fire"
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        assert op.default.name() in str(traced.graph), "jit.trace must record the op, not a C++ call"
        torch.testing.assert_close(traced(x), expected)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
    exported = torch.export.export(layer, (x,))
    assert op.default in [n.target for n in exported.graph.nodes if n.op == "call_function"]
    torch.testing.assert_close(exported.module()(x), expected)
    gm = torch.fx.symbolic_trace(layer)
    assert any(n.target in (op, op.default) for n in gm.graph.nodes if n.op == "call_function")
