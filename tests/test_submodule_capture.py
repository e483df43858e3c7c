"""A model that no capture can follow as a whole (a transformers GPT2Model returns its DynamicCache,
which torch.export cannot flatten, and fx cannot trace it): the graph frontend captures its
submodules instead, and rewrites an FFF only the graph frontend can read (per-level
ParameterList) in each block's MLP slot. Structure: one rewrite per block, named by its place,
the model stays a GPT2Model with only the MLPs replaced; numbers: equal, at other batch and
sequence sizes, to the same GPT2 with each FFF replaced by reference.hard of its true spec."""
import copy

import pytest
import torch

import fffcompile
import graph_gallery as G
from graph_gallery import Reference
from specs import make_spec

transformers = pytest.importorskip("transformers")
H = 16


def _gpt2(ffs):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=53, n_embd=H, n_layer=len(ffs), n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    for block, ff in zip(model.h, ffs):
        block.mlp = ff
    return model


def test_gpt2_blocks_are_captured_one_by_one_and_rewritten():
    specs = [make_spec(depth=3, d_in=H, d_out=H, leaf_width=4, activation=act, seed=s)
             for act, s in (("gelu", 1), ("sigmoid", 2))]
    model = _gpt2([G.LevelParams(spec) for spec in specs])
    oracle = _gpt2([Reference(spec) for spec in specs])
    ids = torch.randint(0, 53, (2, 7))
    fast = fffcompile.optimize(model, (ids,))
    report = fast.report
    assert [(r.where, r.frontend, r.depth) for r in report.rewritten] == [("h.0.mlp", "fx", 3), ("h.1.mlp", "fx", 3)], \
        str(report)
    assert any("could not be captured" in note and "h.0.mlp" in note for note in report.notes)
    assert type(fast) is type(model)
    for name, module in fast.named_modules():               # only the MLP slots changed
        if ".mlp" not in name and name:
            assert type(module) is type(model.get_submodule(name)), name
    for i, spec in enumerate(specs):
        fused = [m for m in fast.h[i].mlp.modules() if isinstance(m, fffcompile.runtime.FusedFFF)]
        assert len(fused) == 1 and fused[0].spec.same_as(spec.replace(source=fused[0].spec.source), atol=2e-5, rtol=2e-4)
    for shape in [(3, 11), (1, 1), (4, 5)]:
        other = torch.randint(0, 53, shape)
        with torch.no_grad():
            got = fast(other, use_cache=False).last_hidden_state
            want = oracle(other, use_cache=False).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert report.model_check["exactness vs the hardened original"].passed
