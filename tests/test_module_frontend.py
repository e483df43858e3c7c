"""optimize() through the module frontend: real third-party layers found, confirmed and replaced;
look-alikes with the same parameter shapes left untouched."""
import copy

import fastfeedforward
import pytest
import torch
from torch import nn

import fffcompile
from fffcompile.nn import FFF, NeuronTree
from fffcompile.runtime import FusedFFF
from third_party import DenseLookAlike, ModuleListTree, SoftTreeMixture, TinyTransformer, UltraFastBERTFFF

D = 16


def fused_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedFFF)}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_fastfeedforward_as_shipped_is_found_and_exact_against_its_own_hardened_forward():
    layers = [fastfeedforward.FFF(D, 6, D, depth=3), fastfeedforward.FFF(D, 4, D, depth=2, activation=nn.GELU())]
    model = TinyTransformer(D, layers).eval()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x)
    assert sorted(fused_layers(fast)) == ["blocks.0.ff", "blocks.1.ff"]
    assert [(r.form, r.depth, r.trees, r.frontend) for r in fast.report.rewritten] == [("A", 3, 1, "module"), ("A", 2, 1, "module")]
    assert fast.blocks[1].ff.activation == "gelu"
    # independent oracle: the package's own training forward with hard decisions, swapped in by hand
    hardened = copy.deepcopy(model)
    for block in hardened.blocks:
        ff = block.ff
        block.ff = type("Hard", (nn.Module,), {"forward": lambda self, v, ff=ff: ff.training_forward(v, use_hard_decisions=True)})()
    for batch, seq in [(3, 5), (1, 1), (7, 2)]:
        v = torch.randn(batch, seq, D)
        with torch.no_grad():
            assert rel_err(fast(v), hardened(v)) < 1e-4
    notes = " ".join(fast.report.rewritten[0].notes)
    assert "eval forward differs" in notes   # the package's eval path omits b2s; the report says so


def test_ultrafastbert_layer_is_exact_against_the_original():
    model = TinyTransformer(D, [UltraFastBERTFFF(D, D, depth=3, parallel_size=2), nn.Identity()]).eval()
    x = torch.randn(2, 6, D)
    fast = fffcompile.optimize(model, x)
    (entry,) = fast.report.rewritten
    assert (entry.form, entry.depth, entry.trees, entry.source) == ("B", 3, 2, "hard")
    assert fast.blocks[0].ff.activation == "gelu" and fast.blocks[0].ff.tie == "gt"
    for batch, seq in [(2, 6), (1, 1), (5, 3)]:
        v = torch.randn(batch, seq, D)
        with torch.no_grad():
            assert rel_err(fast(v), model(v)) < 1e-5


@pytest.mark.parametrize("layer,form", [
    (lambda: FFF(D, D, depth=3, leaf_width=4, activation="silu"), "A"),
    (lambda: FFF(D, D, depth=2, leaf_width=4, master_width=8), "C"),
    (lambda: NeuronTree(D, D, depth=3, trees=3), "B"),
    (lambda: SoftTreeMixture(D, depth=3, hidden=8, kind="tree"), "A"),
])
def test_fffcompile_layers_and_other_styles(layer, form):
    model = TinyTransformer(D, [layer()]).eval()
    x = torch.randn(4, 3, D)
    fast = fffcompile.optimize(model, x)
    assert [r.form for r in fast.report.rewritten] == [form]
    assert isinstance(fast.blocks[0].ff, FusedFFF)
    assert fast.report.model_check["exactness vs the hardened original"].passed


@pytest.mark.parametrize("make", [
    lambda: SoftTreeMixture(D, kind="softmax_moe"),
    lambda: SoftTreeMixture(D, kind="not_a_tree"),
    lambda: SoftTreeMixture(D, kind="swapped_children"),
    lambda: SoftTreeMixture(D, kind="gated_residual"),
    lambda: DenseLookAlike(D, kind="mlp"),
    lambda: DenseLookAlike(D, kind="swiglu"),
    lambda: DenseLookAlike(D, kind="masked_wrong"),
], ids=["softmax_moe", "not_a_tree", "swapped_children", "gated_residual", "dense_mlp", "swiglu", "masked_wrong"])
def test_look_alikes_are_left_untouched(make):
    model = TinyTransformer(D, [make()]).eval()
    x = torch.randn(4, 3, D)
    fast = fffcompile.optimize(model, x, frontends=("module",))
    assert not fused_layers(fast) and not fast.report.rewritten
    (left,) = fast.report.left
    assert left.where == "blocks.0.ff" and "reproduces" in left.reason and left.near_miss
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_user_model_is_not_mutated():
    model = TinyTransformer(D, [FFF(D, D, depth=2, leaf_width=4)]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = fffcompile.optimize(model, torch.randn(2, 3, D))
    assert isinstance(model.blocks[0].ff, FFF) and isinstance(fast.blocks[0].ff, FusedFFF)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "report")


def test_half_precision_model():
    model = TinyTransformer(D, [SoftTreeMixture(D, depth=3, kind="tree")]).eval().to(torch.bfloat16)
    x = torch.randn(4, 3, D, dtype=torch.bfloat16)
    fast = fffcompile.optimize(model, x)
    assert fast.blocks[0].ff.node_weight.dtype == torch.bfloat16
    assert fast.report.model_check["exactness vs the hardened original"].passed


def test_nothing_to_rewrite_returns_an_equal_copy_with_the_reason():
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, D)).eval()
    x = torch.randn(5, D)
    fast = fffcompile.optimize(model, x, frontends=("module",))
    assert fast is not model and not fast.report.rewritten
    assert "no FFF layer found" in str(fast.report)
    assert torch.equal(fast(x), model(x))


def test_min_leaf_agreement_keeps_untrained_trees_soft():
    model = TinyTransformer(D, [SoftTreeMixture(D, depth=3, kind="tree")]).eval()
    fast = fffcompile.optimize(model, torch.randn(8, 4, D), min_leaf_agreement=0.999)
    assert not fast.report.rewritten
    assert "min_leaf_agreement" in fast.report.left[0].reason


def test_untrained_soft_tree_gets_a_plain_words_warning():
    model = TinyTransformer(D, [SoftTreeMixture(D, depth=3, kind="tree")]).eval()
    fast = fffcompile.optimize(model, torch.randn(8, 4, D))
    (entry,) = fast.report.rewritten
    assert entry.source == "soft" and entry.warning and "never trained to be hard" in entry.warning
    assert "WARNING (blocks.0.ff)" in str(fast.report)


def test_bad_arguments_are_user_errors():
    with pytest.raises(fffcompile.UserError, match="takes a torch.nn.Module"):
        fffcompile.optimize("model.pt", torch.randn(1))
    with pytest.raises(fffcompile.InvalidModelError, match="fails on example_inputs"):
        fffcompile.optimize(nn.Linear(4, 4), torch.randn(2, 5))
    with pytest.raises(fffcompile.UserError, match="unknown frontend"):
        fffcompile.optimize(nn.Linear(4, 4), torch.randn(2, 4), frontends=("onnx",))


@pytest.mark.parametrize("threshold", [False, True])
def test_modulelist_tree_with_python_descent_is_read_by_stacking_siblings(threshold):
    layer = ModuleListTree(D, D, depth=3, hidden=6, threshold=threshold)
    model = TinyTransformer(D, [layer]).eval()
    x = torch.randn(3, 4, D)
    with pytest.raises(Exception):
        torch.export.export(model, (x,))           # the per-row descent defeats capture
    fast = fffcompile.optimize(model, x)
    (entry,) = fast.report.rewritten
    assert (entry.form, entry.depth, entry.frontend) == ("A", 3, "module")
    assert fast.blocks[0].ff.activation == "gelu"
    for batch, seq in [(3, 4), (1, 1), (6, 2)]:
        v = torch.randn(batch, seq, D)
        with torch.no_grad():
            assert rel_err(fast(v), model(v)) < 1e-4   # its eval forward is the hard descent (tie > 0)
