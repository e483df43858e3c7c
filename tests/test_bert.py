"""A transformers BERT whose feedforward blocks are FFFs written in two third-party styles.

The model is built from a config (nothing downloaded). Layer 0's FFF is the index-table style
(a router Linear and stacked leaves), layer 1's keeps every weight in one flat Parameter, which
only the graph frontend can read. Both must be found and rewritten, the result must equal the
same BERT with each FFF replaced by ``reference.hard`` of its true spec at sequence lengths and
batch sizes other than the example's, and attention, embeddings and pooler must be untouched.
"""
import pytest
import torch
from torch import nn

from fffcompile import optimize
from graph_gallery import Packed, Reference, Table
from specs import make_spec

transformers = pytest.importorskip("transformers")


def _bert(ffs):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=len(ffs), num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    for layer, ff in zip(model.encoder.layer, ffs):
        layer.intermediate = ff                # hidden -> hidden through the FFF
        layer.output.dense = nn.Identity()     # dropout, residual and LayerNorm stay BERT's own
    return model


def test_bert_with_fff_feedforwards_is_rewritten_and_exact():
    specs = [make_spec("leaf_mlp", depth=3, d_in=32, d_out=32, leaf_width=8, activation="gelu", seed=1),
             make_spec("leaf_mlp", depth=4, d_in=32, d_out=32, leaf_width=4, activation="relu", seed=2)]
    model = _bert([Table(specs[0]), Packed(specs[1])])
    hardened = _bert([Reference(spec) for spec in specs])
    ids = torch.randint(0, 97, (2, 9))
    fast = optimize(model, (ids,))
    assert len(fast.report.rewritten) == 2, str(fast.report)
    assert sorted(r.depth for r in fast.report.rewritten) == [3, 4]
    for shape in [(3, 13), (1, 1), (4, 5)]:
        other = torch.randint(0, 97, shape)
        with torch.no_grad():
            got = fast(other).last_hidden_state
            want = hardened(other).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    graph = torch.export.export(fast, (ids,)).graph
    fused = [n for n in graph.nodes if n.op == "call_function" and "fffcompile" in str(n.target)]
    assert len(fused) == 2
    assert not [n for n in graph.nodes if n.op == "call_function" and "sigmoid" in str(n.target)]


def test_bert_without_ffs_is_left_unchanged():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 97, (2, 9))
    fast = optimize(model, (ids,))
    assert fast.report.rewritten == []
    with torch.no_grad():
        assert torch.equal(fast(ids).last_hidden_state, model(ids).last_hidden_state)
