"""FFF layers whose leaves use a sigmoid activation: the leaf sigmoid must not be taken for a node
decision. Graph frontend (a sigmoid contracted with constants is the leaves' activation) and module
frontend (a sigmoid reading the reading's leaf pre-activations stays soft when confirming): both
rewrite, the extracted spec is the true one, and the result equals reference.hard of it at other
batch and sequence sizes; a look-alike with sigmoid leaves (paths that are not a tree) is left."""
import copy

import pytest
import torch

import fffcompile
import graph_gallery as G
from graph_gallery import Reference
from fffcompile.runtime import FusedFFF
from specs import make_spec
from third_party import TinyTransformer

D = 8


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _fused(model):
    return [m for m in model.modules() if isinstance(m, FusedFFF)]


def _check(model, spec, fast, frontend):
    report = fast.report
    assert [(r.form, r.depth, r.frontend) for r in report.rewritten] == [("A", spec.depth, frontend)] * 2, str(report)
    assert [r.where for r in report.rewritten] == ["blocks.0.ff", "blocks.1.ff"]
    for fused in _fused(fast):
        assert fused.spec.activation == "sigmoid"
        assert fused.spec.same_as(spec.replace(source=fused.spec.source), atol=2e-5, rtol=2e-4)
    oracle = copy.deepcopy(model)
    for block in oracle.blocks:
        block.ff = Reference(spec)
    for shape in ((2, 7, D), (5, 3, D), (1, 1, D)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fast(x), oracle(x)) < 1e-4
    assert report.model_check["exactness vs the hardened original"].passed


@pytest.mark.parametrize("style", ["level_params", "seq_leaves"])
def test_sigmoid_leaves_graph_frontend(style):
    torch.manual_seed(0)
    spec = make_spec(depth=3, d_in=D, d_out=D, leaf_width=4, activation="sigmoid", seed=3)
    cls = {"level_params": G.LevelParams, "seq_leaves": G.SeqLeaves}[style]
    model = TinyTransformer(D, [cls(spec), cls(spec)]).eval()
    fast = fffcompile.optimize(model, torch.randn(3, 5, D), frontends=("graph",))
    _check(model, spec, fast, "fx")
    assert not [n for n in fast.graph.nodes if "sigmoid" in str(n.target)]   # leaf sigmoids went with the trees


def test_sigmoid_leaves_module_frontend():
    torch.manual_seed(0)
    spec = make_spec(depth=2, d_in=D, d_out=D, leaf_width=4, activation="sigmoid", seed=4)
    model = TinyTransformer(D, [G.SeqLeaves(spec), G.SeqLeaves(spec)]).eval()
    fast = fffcompile.optimize(model, torch.randn(3, 5, D), frontends=("module",))
    _check(model, spec, fast, "module")


def test_not_a_tree_with_sigmoid_leaves_is_left():
    torch.manual_seed(0)
    spec = make_spec(depth=3, d_in=D, d_out=D, leaf_width=4, activation="sigmoid", seed=5)
    model = TinyTransformer(D, [G.NotATree(spec)]).eval()
    x = torch.randn(3, 5, D)
    fast = fffcompile.optimize(model, x)
    assert fast.report.rewritten == []
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
