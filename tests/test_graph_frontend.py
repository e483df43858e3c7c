"""optimize() through the graph frontend: FFF layers written in many styles (tests/graph_gallery.py),
inside a transformer-like model, found by dataflow, extracted, confirmed and rewritten to the fused
op; look-alikes left untouched. Structure (fused calls, no tree sigmoid left) and numbers (against
reference.hard of the true spec and against the original with hardened decisions) are asserted."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fffcompile
import graph_gallery as G
from graph_gallery import Reference
from fffcompile import reference
from fffcompile.passes.graph_capture import capture
from fffcompile.passes.graph_confirm import GraphConfirmed
from fffcompile.passes.graph_frontend import analyse
from fffcompile.passes.confirm_module import run_original
from fffcompile.passes.harden import hardened_sigmoids
from fffcompile.runtime import FusedFFF
from fffcompile.spec import FFFSpec
from specs import make_spec
from third_party import DenseLookAlike, ModuleListTree, SoftTreeMixture, TinyTransformer

D = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def fused_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FusedFFF)]


def op_names(gm):
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def _spec(style, **kw):
    base = dict(d_in=D, d_out=D)
    if style in ("ultrafast", "one_hot", "node_major"):
        base.update(form="neuron_tree", activation="gelu")
    base.update(kw)
    spec = make_spec(**base)
    if style == "linear_nobias":
        spec = spec.replace(node_bias=torch.zeros_like(spec.node_bias))
    return spec


CASES = {
    "packed": (G.Packed, dict(depth=3, activation="relu")),
    "unrolled": (G.Unrolled, dict(depth=3, leaf_width=4)),
    "unrolled_gelu_deep": (G.Unrolled, dict(depth=5, leaf_width=2, activation="gelu")),
    "table": (G.Table, dict(depth=3, activation="gelu")),
    "table_relu2": (G.Table, dict(depth=2, activation="relu2")),
    "logsigmoid": (G.LogSigmoid, dict(depth=3, activation="silu")),
    "path_matrix": (G.PathMatrix, dict(depth=3)),
    "softplus_softmax": (G.SoftplusSoftmax, dict(depth=3, activation="gelu")),
    "linear_nobias": (G.LinearNoBias, dict(depth=3, linear_leaves=True, activation="identity")),
    "threshold": (G.Threshold, dict(depth=2, activation="gelu_tanh")),
    "hard_index": (G.HardIndex, dict(depth=3, activation="gelu")),
    "hard_index_linear": (G.HardIndex, dict(depth=2, linear_leaves=True, activation="identity", tie="gt")),
    "hard_dense": (G.HardDense, dict(depth=3, tie="gt")),
    "ultrafast": (G.UltraFast, dict(depth=2, trees=3, tie="gt")),
    "ultrafast_ge": (G.UltraFast, dict(depth=3, trees=1, tie="ge")),
    "one_hot": (G.OneHot, dict(depth=3, trees=2)),
    "node_major": (G.NodeMajor, dict(depth=2, trees=3, activation="relu", tie="gt")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gallery_style_is_found_rewritten_and_exact(case):
    cls, kw = CASES[case]
    style = case.split("_")[0] if case not in ("linear_nobias", "path_matrix", "one_hot", "node_major") else case
    already_hard = cls in (G.UltraFast, G.OneHot, G.NodeMajor, G.HardIndex, G.HardDense)
    spec = _spec(style, **kw)
    model = TinyTransformer(D, [cls(spec), cls(spec)]).eval()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    report = fast.report
    # structure: both layers rewritten by the graph frontend, fused calls in the graph, no tree decision left
    assert [(r.form, r.depth, r.trees, r.frontend) for r in report.rewritten] == [(spec.form_letter, spec.depth, spec.trees, "fx")] * 2
    assert [r.where for r in report.rewritten] == ["blocks.0.ff", "blocks.1.ff"]
    calls = fused_calls(fast)
    assert len(calls) == 2
    names = op_names(fast)
    assert not any(n in names for n in ("sigmoid.default", "log_sigmoid.default", "gt.Scalar", "ge.Scalar", "scatter.value"))
    # the extracted spec is the one the layer was built from
    for call in calls:
        got = fast.get_submodule(call.target).spec
        assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4), case
    # numbers: against the true spec's reference, and against the original with hardened decisions
    oracle = copy.deepcopy(model)
    for block in oracle.blocks:
        block.ff = Reference(spec)
    for shape in ((3, 5, D), (7, 4, D), (1, 2, D)):       # dynamic batch and sequence
        x2 = torch.randn(*shape)
        with torch.no_grad():
            out = fast(x2)
            assert rel_err(out, oracle(x2)) < 1e-4
            if already_hard:
                assert rel_err(out, model(x2)) < 1e-4
            elif cls is not G.SoftplusSoftmax:         # hardened_sigmoids does not know softplus
                with hardened_sigmoids(rows=shape[0] * shape[1]):
                    assert rel_err(out, model(x2)) < 1e-4
    assert report.model_check["exactness vs the hardened original"].passed
    # the result exports again with the fused op inside, batch still dynamic
    program = torch.export.export(fast, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    exported = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("fffcompile" in t for t in exported) == 2


COLLIDING = {**{name: (cls, {**kw, "depth": 3} if cls in (G.UltraFast, G.OneHot, G.NodeMajor) or kw.get("linear_leaves")
                        else {**kw, "depth": 3, "leaf_width": 4}) for name, (cls, kw) in CASES.items()},
             "leaf_major": (G.LeafMajor, dict(depth=3, leaf_width=4, activation="relu"))}


@pytest.mark.parametrize("batch", [4, 8])
@pytest.mark.parametrize("case", sorted(COLLIDING))
def test_2d_example_whose_batch_equals_a_tree_size(case, batch):
    """A 2-D example input whose row count equals a tree size (2^(D-1) = leaf width = 4, 2^D = 8):
    which dim holds the rows is read off the symbolic batch, not guessed from the example's sizes."""
    cls, kw = COLLIDING[case]
    style = case.split("_")[0] if case not in ("linear_nobias", "path_matrix", "one_hot", "leaf_major", "node_major") else case
    spec = _spec(style, **kw)
    layer = cls(spec).eval()
    fast = fffcompile.optimize(layer, torch.randn(batch, D), frontends=("graph",))
    assert [(r.form, r.depth, r.trees, r.frontend) for r in fast.report.rewritten] == [(spec.form_letter, 3, spec.trees, "fx")], \
        [str(left) for left in fast.report.left]
    assert len(fused_calls(fast)) == 1
    for rows in (batch, 3, 11):
        x2 = torch.randn(rows, D)
        with torch.no_grad():
            assert rel_err(fast(x2), reference.hard(spec, x2)) < 1e-4


@pytest.mark.parametrize("batch", [4, 8])
@pytest.mark.parametrize("case", sorted(COLLIDING))
def test_static_capture_whose_batch_equals_a_tree_size(case, batch):
    """A static capture has no symbolic batch: where several dims have the row count, a probe
    (one row of x changed) tells which one holds the rows; the extracted spec is the true one."""
    cls, kw = COLLIDING[case]
    style = case.split("_")[0] if case not in ("linear_nobias", "path_matrix", "one_hot", "leaf_major", "node_major") else case
    spec = _spec(style, **kw)
    x = torch.randn(batch, D)
    program = torch.export.export(cls(spec).eval(), (x,), strict=False).run_decompositions({})  # static, functional
    _, outcomes = analyse(program.module(), (x,), {})
    confirmed = [o for *_, o in outcomes if isinstance(o, GraphConfirmed)]
    assert len(confirmed) == 1, [o.reason for *_, o in outcomes if not isinstance(o, GraphConfirmed)]
    got = confirmed[0].spec
    assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4), (case, got.describe())


def _counts(gm, names):
    ops = op_names(gm)
    return {name: ops.count(name) for name in names}


_OUTSIDE = ("layer_norm.default", "linear.default", "scaled_dot_product_attention.default", "mean.dim")


def test_per_row_loop_is_rewritten_batch_generic():
    """A descent written per row in Python, unrolled by the capture for the example's 6 rows:
    one spec for all rows, one fused call over the input, the loop's nodes gone, other sizes run."""
    spec = _spec("hard_index", depth=2, activation="relu")
    model = TinyTransformer(D, [G.RowLoop(spec)]).eval()
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        assert rel_err(G.RowLoop(spec)(x), reference.hard(spec, x)) < 1e-5     # the fixture is the spec's hard form
    captured = capture(model, (x,)).module
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.form, r.depth, r.source, r.where) for r in fast.report.rewritten] == [("A", 2, "hard", "blocks.0.ff")]
    assert fast.report.left == []
    assert len(fused_calls(fast)) == 1
    names = op_names(fast)
    assert not any(n in names for n in ("ge.Scalar", "stack.default", "index_select.default", "zeros.default"))
    assert _counts(fast, _OUTSIDE) == _counts(captured, _OUTSIDE)            # the rest of the graph untouched
    got = fast.get_submodule(fused_calls(fast)[0].target).spec
    assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4)
    oracle = copy.deepcopy(model)
    oracle.blocks[0].ff = Reference(spec)
    for shape in ((2, 3, D), (4, 5, D), (1, 1, D)):
        x2 = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fast(x2), oracle(x2)) < 1e-4
    assert fast.report.model_check["exactness vs the hardened original"].passed


class _TokenRowLoop(nn.Module):
    """Token ids -> embedding -> a per-row hard loop: the loop's input is an embedding of integer ids."""

    def __init__(self, spec):
        super().__init__()
        self.emb = nn.Embedding(50, spec.d_in)
        self.ff = G.RowLoop(spec)

    def forward(self, ids):
        return self.ff(self.emb(ids))


def test_per_row_loop_after_a_token_embedding():
    """The per-level logits read x[r] of an embedding of integer token ids and node rows gathered by
    the index recurrence: the ids are data, not an index computed from decisions."""
    spec = _spec("hard_index", depth=2, activation="relu")
    model = _TokenRowLoop(spec).eval()
    fast = fffcompile.optimize(model, (torch.randint(0, 50, (2, 3)),), frontends=("graph",))
    assert [(r.form, r.depth, r.where) for r in fast.report.rewritten] == [("A", 2, "ff")], str(fast.report)
    assert len(fused_calls(fast)) == 1
    for shape in ((2, 3), (4, 5), (1, 1)):
        ids = torch.randint(0, 50, shape)
        with torch.no_grad():
            assert rel_err(fast(ids), reference.hard(spec, model.emb(ids))) < 1e-4


def test_fastfeedforward_package_eval_forward_with_int_depth():
    """The shipped package's eval forward: a batched descent (index_select, bmm, >=, index
    arithmetic) then a Python loop over the rows for the leaves (``.item()`` leaf index, w1s/b1s/w2s,
    written into torch.empty): rewritten to one fused call; b2s omitted as the package omits it."""
    import fastfeedforward
    layer = fastfeedforward.FFF(D, 4, D, depth=3)
    depth = int(layer.depth.item())
    del layer.depth
    layer.depth = _PlainDepth(depth)
    model = TinyTransformer(D, [layer]).eval()
    x = torch.randn(2, 3, D)
    captured = capture(model, (x,)).module
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.form, r.depth, r.source, r.where) for r in fast.report.rewritten] == [("A", 3, "hard", "blocks.0.ff")]
    assert len(fused_calls(fast)) == 1
    names = op_names(fast)
    assert not any(n in names for n in ("ge.Scalar", "item.default", "bmm.default", "select_scatter.default", "index_select.default"))
    assert _counts(fast, _OUTSIDE) == _counts(captured, _OUTSIDE)
    got = fast.get_submodule(fused_calls(fast)[0].target).spec
    truth = FFFSpec("leaf_mlp", 3, "relu", layer.node_weights.detach(), layer.node_biases.detach()[:, 0],
                    layer.w1s.detach(), layer.b1s.detach(), layer.w2s.detach(), torch.zeros_like(layer.b2s.detach()),
                    source=got.source)
    assert got.same_as(truth, atol=2e-5, rtol=2e-4)
    oracle = copy.deepcopy(model)
    oracle.blocks[0].ff = Reference(truth)
    for shape in ((2, 3, D), (4, 5, D), (1, 1, D)):
        x2 = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fast(x2), oracle(x2)) < 1e-4
            assert rel_err(fast(x2), model(x2)) < 1e-4          # the package's own eval forward, any batch


def test_per_row_loop_whose_rows_differ_is_left():
    """Same op sequence per row, but odd rows scale their output: not one program, left alone."""
    spec = _spec("hard_index", depth=2, activation="relu")
    model = TinyTransformer(D, [G.RowLoop(spec, uneven=True)]).eval()
    x = torch.randn(2, 3, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert fast.report.rewritten == []
    assert not isinstance(fast, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    reasons = " ".join(left.reason for left in fast.report.left)
    assert "does not reproduce" in reasons or "per-row loop" in reasons, reasons


def test_master_leaf_tree_rewritten_blend_kept():
    spec = _spec("table", depth=3)
    layer = G.Master(spec)
    model = TinyTransformer(D, [layer]).eval()
    x = torch.randn(2, 6, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.form, r.depth) for r in fast.report.rewritten] == [("A", 3)]
    assert len(fused_calls(fast)) == 1
    assert op_names(fast).count("sigmoid.default") == 1          # s(k) of the blend stays
    full = spec.replace(master_w1=layer.m1.weight.detach().T.clone(), master_b1=layer.m1.bias.detach().clone(),
                        master_w2=layer.m2.weight.detach().T.clone(), master_b2=layer.m2.bias.detach().clone(),
                        master_logit=layer.k.detach().clone(), master_activation="gelu")
    oracle = copy.deepcopy(model)
    oracle.blocks[0].ff = Reference(full)
    x2 = torch.randn(5, 3, D)
    with torch.no_grad():
        assert rel_err(fast(x2), oracle(x2)) < 1e-4


def test_fully_decomposed_unrolled_graph_where_eq_arange_chains():
    """After run_decompositions() the unrolled leaf writes become where(eq(arange...)) chains."""
    spec = _spec("unrolled", depth=3, leaf_width=3)
    layer = G.Unrolled(spec)
    x = torch.randn(6, D)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    gm = program.run_decompositions().module()
    _, outcomes = analyse(gm, (x,), {})
    confirmed = [o for *_, o in outcomes if isinstance(o, GraphConfirmed)]
    assert len(confirmed) == 1
    assert confirmed[0].spec.same_as(spec.replace(source=confirmed[0].spec.source), atol=2e-5, rtol=2e-4)


def test_train_mode_graph_with_dropout_inside_the_tree():
    """A train-mode capture keeps dropout(p, train=True) in the leaves; the hardened form drops it."""
    spec = _spec("unrolled", depth=2, leaf_width=3)
    model = TinyTransformer(D, [G.Unrolled(spec, dropout=0.3)])
    model.train()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.form, r.depth) for r in fast.report.rewritten] == [("A", 2)]
    assert not any("dropout" in n for n in op_names(fast))
    got = fast.get_submodule(fused_calls(fast)[0].target).spec
    assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4)
    assert fast.report.model_check["exactness vs the hardened original"].passed


class _PlainDepth(int):
    """fastfeedforward reads ``self.depth.item()``; a plain int with .item() makes the layer capturable."""

    def item(self):
        return int(self)


def test_fastfeedforward_package_training_forward_with_int_depth():
    """The shipped package's own soft forward (per-level slices, in-place mul_ into views of the
    mixture, leaves copied one by one into torch.empty) found and read off exactly."""
    import fastfeedforward
    layers = [fastfeedforward.FFF(D, 4, D, depth=3), fastfeedforward.FFF(D, 3, D, depth=2, activation=nn.GELU())]
    for layer in layers:
        depth = int(layer.depth.item())
        del layer.depth
        layer.depth = _PlainDepth(depth)
    model = TinyTransformer(D, layers).train()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.form, r.depth, r.frontend) for r in fast.report.rewritten] == [("A", 3, "fx"), ("A", 2, "fx")]
    assert fast.report.model_check["exactness vs the hardened original"].passed
    for call, layer, act in zip(fused_calls(fast), layers, ("relu", "gelu")):
        got = fast.get_submodule(call.target).spec
        truth = FFFSpec("leaf_mlp", int(layer.depth), act, layer.node_weights.detach(), layer.node_biases.detach()[:, 0],
                        layer.w1s.detach(), layer.b1s.detach(), layer.w2s.detach(), layer.b2s.detach(), source=got.source)
        assert got.same_as(truth, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("threshold", [False, True])
def test_modulelist_tree_training_forward(threshold):
    """Routers as Linear(d, 1) per node, leaves as one Sequential per leaf, node by node in Python."""
    layer = ModuleListTree(D, D, depth=3, threshold=threshold)
    model = TinyTransformer(D, [layer]).train()
    fast = fffcompile.optimize(model, torch.randn(3, 5, D), frontends=("graph",))
    assert [(r.form, r.depth) for r in fast.report.rewritten] == [("A", 3)]
    got = fast.get_submodule(fused_calls(fast)[0].target).spec
    bias = torch.cat([r.bias.detach() for r in layer.routers])
    if threshold:
        bias = bias - layer.threshold.detach()
    truth = FFFSpec("leaf_mlp", 3, "gelu", torch.cat([r.weight.detach() for r in layer.routers]), bias,
                    torch.stack([l[0].weight.detach().T for l in layer.leaves]), torch.stack([l[0].bias.detach() for l in layer.leaves]),
                    torch.stack([l[2].weight.detach().T for l in layer.leaves]), torch.stack([l[2].bias.detach() for l in layer.leaves]),
                    source=got.source)
    assert got.same_as(truth, atol=2e-5, rtol=2e-4)


LOOK_ALIKES = {
    "swapped_children": lambda: G.Swapped(_spec("x", depth=3)),
    "not_a_tree": lambda: G.NotATree(_spec("x", depth=3)),
    "tp_softmax_moe": lambda: SoftTreeMixture(D, kind="softmax_moe"),
    "tp_gated_residual": lambda: SoftTreeMixture(D, kind="gated_residual"),
    "tp_not_a_tree": lambda: SoftTreeMixture(D, kind="not_a_tree"),
    "tp_swapped_children": lambda: SoftTreeMixture(D, kind="swapped_children"),
    "tp_mlp": lambda: DenseLookAlike(D, "mlp"),
    "tp_swiglu": lambda: DenseLookAlike(D, "swiglu"),
    "tp_masked_wrong": lambda: DenseLookAlike(D, "masked_wrong"),
}


@pytest.mark.parametrize("kind", sorted(LOOK_ALIKES))
def test_look_alikes_are_left_untouched(kind):
    model = TinyTransformer(D, [LOOK_ALIKES[kind]()]).eval()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert fast.report.rewritten == []
    assert not isinstance(fast, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    for entry in fast.report.left:
        assert entry.reason                                   # every refusal says why


def test_module_and_graph_frontends_together():
    """The module frontend takes what it knows by signature; the graph pass finds the packed layer."""
    import fastfeedforward
    spec = _spec("packed", depth=2)
    model = TinyTransformer(D, [fastfeedforward.FFF(D, 4, D, depth=2), G.Packed(spec)]).eval()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x)
    assert sorted((r.frontend, r.where) for r in fast.report.rewritten) == [("fx", "blocks.1.ff"), ("module", "blocks.0.ff")]
    assert fast.report.model_check["exactness vs the hardened original"].passed
    assert len(fused_calls(fast)) == 1
    assert sum("fffcompile" in str(n.target) for n in fast.graph.nodes if n.op == "call_function") == 1
    x2 = torch.randn(4, 2, D)
    with torch.no_grad():
        hardened = copy.deepcopy(model)
        hardened.blocks[1].ff = Reference(spec)
        ff0 = hardened.blocks[0].ff
        hardened.blocks[0].ff = type("H", (nn.Module,), {"forward": lambda self, t: run_original(ff0, t, True, True)})()
        assert rel_err(fast(x2), hardened(x2)) < 1e-4


# ----------------------------------------------------------------------------- property: extract == spec

A_STYLES = {"hard_index": G.HardIndex, "hard_dense": G.HardDense, "packed": G.Packed, "unrolled": G.Unrolled, "leaf_major": G.LeafMajor, "table": G.Table, "logsigmoid": G.LogSigmoid, "path_matrix": G.PathMatrix,
            "softplus_softmax": G.SoftplusSoftmax, "linear_nobias": G.LinearNoBias, "threshold": G.Threshold}
B_STYLES = {"ultrafast": G.UltraFast, "one_hot": G.OneHot}


@st.composite
def built(draw):
    form = draw(st.sampled_from(("leaf_mlp", "neuron_tree")))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    d_in, d_out = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    if form == "leaf_mlp":
        style = draw(st.sampled_from(sorted(A_STYLES)))
        linear = style == "linear_nobias" or (style not in ("unrolled", "hard_dense") and draw(st.booleans()))
        act = "identity" if linear else draw(st.sampled_from(("relu", "gelu", "silu", "tanh", "gelu_tanh", "relu2")))
        spec = make_spec(depth=draw(st.integers(1, 4)), d_in=d_in, d_out=d_out, leaf_width=draw(st.integers(1, 5)),
                         activation=act, linear_leaves=linear, seed=seed,
                         tie=draw(st.sampled_from(("ge", "gt"))) if style.startswith("hard") else "ge")
        if style == "linear_nobias":
            spec = spec.replace(node_bias=torch.zeros_like(spec.node_bias))
        return style, spec, A_STYLES[style](spec)
    style = draw(st.sampled_from(sorted(B_STYLES)))
    spec = make_spec(form="neuron_tree", depth=draw(st.integers(1, 3)), trees=draw(st.integers(1, 3)), d_in=d_in,
                     d_out=d_out, activation=draw(st.sampled_from(("gelu", "relu", "silu"))),
                     tie=draw(st.sampled_from(("ge", "gt"))), seed=seed)
    return style, spec, B_STYLES[style](spec)


@settings(max_examples=12)
@given(built(), st.integers(2, 6))
def test_property_capture_extract_equals_spec(case, batch):
    style, spec, layer = case
    x = torch.randn(batch, 3, spec.d_in)
    captured = capture(layer.eval(), (x,))
    _, outcomes = analyse(captured.module, (x,), {})
    confirmed = [o for *_, o in outcomes if isinstance(o, GraphConfirmed)]
    assert len(confirmed) == 1, (style, spec.describe(), [o.reason for *_, o in outcomes if not isinstance(o, GraphConfirmed)])
    got = confirmed[0].spec
    assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4), (style, spec.describe(), got.describe())


@pytest.mark.parametrize("style", ["path_matrix", "one_hot"])
def test_fx_symbolic_trace_capture_is_searched_too(style):
    """Where torch.export cannot capture, the fx graph (torch-level ops, call_module Linear) is searched."""
    from fffcompile.passes.graph_capture import trace_fx
    spec = _spec(style, depth=2)
    layer = (G.PathMatrix if style == "path_matrix" else G.OneHot)(spec).eval()
    x = torch.randn(6, D)
    _, outcomes = analyse(trace_fx(layer, (x,)), (x,), {})
    confirmed = [o for *_, o in outcomes if isinstance(o, GraphConfirmed)]
    assert len(confirmed) == 1
    assert confirmed[0].spec.same_as(spec.replace(source=confirmed[0].spec.source), atol=2e-5, rtol=2e-4)



class _BroadcastBiasTree(nn.Module):
    """Form A, depth 3, with leaf biases shaped (L, 1, width): the module frontend's readings all
    fail on it, the graph frontend reads it by numbers."""

    def __init__(self, d=16, depth=3, width=4):
        super().__init__()
        torch.manual_seed(3)
        self.depth, leaves = depth, 2 ** depth
        self.nw, self.nb = nn.Parameter(torch.randn(leaves - 1, d) / d ** .5), nn.Parameter(torch.randn(leaves - 1) * .1)
        self.w1, self.b1 = nn.Parameter(torch.randn(leaves, d, width) / d ** .5), nn.Parameter(torch.randn(leaves, 1, width) * .1)
        self.w2, self.b2 = nn.Parameter(torch.randn(leaves, width, d) / width ** .5), nn.Parameter(torch.randn(leaves, 1, d) * .1)

    def forward(self, x):
        B, leaves = x.shape[0], 2 ** self.depth
        mix = x.new_ones(B, leaves)
        for k in range(self.depth):
            p = torch.sigmoid(x @ self.nw[2 ** k - 1:2 ** (k + 1) - 1].t() + self.nb[2 ** k - 1:2 ** (k + 1) - 1])
            pair = torch.stack([1 - p, p], -1).flatten(1).unsqueeze(-1)
            mix = (mix.view(B, 2 ** (k + 1), leaves // 2 ** (k + 1)) * pair).reshape(B, leaves)
        h = torch.relu(torch.bmm(x.unsqueeze(0).expand(leaves, -1, -1), self.w1) + self.b1)
        y = (torch.bmm(h, self.w2) + self.b2).transpose(0, 1)
        return (mix.unsqueeze(-1) * y).sum(1)


def test_a_layer_rewritten_by_one_frontend_is_not_also_reported_as_left():
    """The module frontend refuses the root; the graph frontend rewrites it there: the report
    lists the layer once, as rewritten."""
    module_only = fffcompile.optimize(_BroadcastBiasTree().eval(), (torch.randn(4, 16),), frontends=("module",))
    assert module_only.report.rewritten == [] and [l.where for l in module_only.report.left] == ["(the model itself)"]
    fast = fffcompile.optimize(_BroadcastBiasTree().eval(), (torch.randn(4, 16),))
    assert [(r.frontend, r.where) for r in fast.report.rewritten] == [("fx", "(the model itself)")]
    assert fast.report.left == []


SOFT_STYLES = {"packed": G.Packed, "unrolled": G.Unrolled, "leaf_major": G.LeafMajor, "table": G.Table,
               "logsigmoid": G.LogSigmoid, "path_matrix": G.PathMatrix, "softplus_softmax": G.SoftplusSoftmax,
               "threshold": G.Threshold}


@pytest.mark.parametrize("by_gradients", [True, False])
@pytest.mark.parametrize("style", sorted(SOFT_STYLES))
def test_soft_mixing_read_by_gradients_or_by_probe_rows(style, by_gradients, monkeypatch):
    """The leaves' output weights, their owners and b2 read by three backward passes (linear in the
    graph size) or one probe row per hidden unit (quadratic): the same, true spec either way."""
    import fffcompile.passes.graph_extract as E
    monkeypatch.setattr(E, "GRADIENT_ROWS_FACTOR", 0 if by_gradients else 10 ** 9)
    calls = []
    original = E._mixing_by_gradients
    monkeypatch.setattr(E, "_mixing_by_gradients", lambda *a: calls.append(original(*a)) or calls[-1])
    spec = make_spec(depth=3, d_in=D, d_out=5, leaf_width=3, activation="gelu", seed=11)
    x = torch.randn(4, 3, D)
    captured = capture(SOFT_STYLES[style](spec).eval(), (x,))
    _, outcomes = analyse(captured.module, (x,), {})
    confirmed = [o for *_, o in outcomes if isinstance(o, GraphConfirmed)]
    assert len(confirmed) == 1, [o.reason for *_, o in outcomes if not isinstance(o, GraphConfirmed)]
    assert bool(calls) == by_gradients and all(read is not None for read in calls)     # no fallback taken
    got = confirmed[0].spec
    assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4), (style, got.describe())


def test_two_trees_reading_the_same_input_are_two_rewrites():
    """Decisions on one input split into the trees whose mixtures read them: both found, each exact."""
    s1 = make_spec(depth=3, d_in=D, d_out=D, activation="gelu", seed=1)
    s2 = make_spec(depth=2, d_in=D, d_out=D, activation="relu", seed=2)
    model = TinyTransformer(D, [G.SharedInput(G.Table(s1), G.Packed(s2))]).eval()
    x = torch.randn(2, 3, D)
    captured = capture(model, (x,)).module
    fast = fffcompile.optimize(model, x, frontends=("graph",))
    assert [(r.depth, r.where) for r in fast.report.rewritten] == [(3, "blocks.0.ff.first"), (2, "blocks.0.ff.second")]
    assert fast.report.left == []
    calls = fused_calls(fast)
    assert len(calls) == 2 and "sigmoid.default" not in op_names(fast)
    before, after = _counts(captured, _OUTSIDE), _counts(fast, _OUTSIDE)
    assert after == {**before, "linear.default": before["linear.default"] - 1}    # only the Table's router Linear went
    for call, spec in zip(calls, (s1, s2)):
        got = fast.get_submodule(call.target).spec
        assert got.same_as(spec.replace(source=got.source), atol=2e-5, rtol=2e-4)
    oracle = copy.deepcopy(model)
    oracle.blocks[0].ff = G.SharedInput(Reference(s1), Reference(s2))
    for shape in ((2, 3, D), (4, 5, D), (1, 1, D)):
        x2 = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fast(x2), oracle(x2)) < 1e-4
