"""FFFSpec validates itself and names the field that is wrong."""
import pytest
import torch

from fffcompile import FFFSpec, InvalidSpecError, UserError
from specs import make_spec


def test_valid_specs_describe_themselves():
    a = make_spec(depth=3, d_in=8, d_out=5, leaf_width=4)
    assert (a.form_letter, a.n_leaves, a.nodes_per_tree, a.trees, a.d_in, a.d_out, a.leaf_width) == ("A", 8, 7, 1, 8, 5, 4)
    assert a.describe() == "form A, depth 3, 1 tree, 8->5, leaf 4, relu, tie >=, soft, float32"
    c = make_spec(depth=2, master=3)
    assert c.form_letter == "C" and c.without_master().form_letter == "A"
    b = make_spec(form="neuron_tree", depth=2, trees=3, activation="gelu", tie="gt")
    assert (b.form_letter, b.nodes_per_tree, b.trees) == ("B", 7, 3)
    assert b.hard_macs() == 3 * 3 * (8 + 5) and b.soft_macs() == 3 * 7 * (8 + 5)


def test_ultrafastbert_shape_cost_ratio_is_341():
    spec = make_spec(form="neuron_tree", depth=11, d_in=4, d_out=4)
    assert spec.soft_macs() / spec.hard_macs() == pytest.approx(4095 / 12)


@pytest.mark.parametrize("change,field,words", [
    (dict(form="moe"), "form", "not one of"),
    (dict(depth=-1), "depth", "non-negative"),
    (dict(activation="swish"), "activation", "not one of"),
    (dict(tie=">="), "tie", "not one of"),
    (dict(source="fuzzy"), "source", "not one of"),
    (dict(node_weight=torch.zeros(6, 8)), "node_weight", "2^D - 1 = 7"),
    (dict(node_bias=torch.zeros(7, 1)), "node_bias", "expected (7,)"),
    (dict(leaf_w1=torch.zeros(8, 9, 4)), "leaf_w1", "expected (8, 8, 4)"),
    (dict(leaf_b2=torch.zeros(8, 4)), "leaf_b2", "expected (8, 5)"),
    (dict(leaf_w2=torch.zeros(8, 4, 5, dtype=torch.float64)), "leaf_w2", "differs from node_weight"),
    (dict(leaf_b1=torch.zeros(8, 4, dtype=torch.int32)), "leaf_b1", "not supported"),
    (dict(out_bias=torch.zeros(5)), "out_bias", "must be None"),
    (dict(master_w1=torch.zeros(8, 3)), "master_", "master leaf needs all"),
])
def test_invalid_fields_are_named(change, field, words):
    spec = make_spec(depth=3, d_in=8, d_out=5, leaf_width=4)
    with pytest.raises(InvalidSpecError) as info:
        spec.replace(**change)
    message = str(info.value)
    assert message.startswith(f"FFFSpec.{field}") and words in message
    assert isinstance(info.value, UserError)


def test_non_power_of_two_node_count_is_called_out():
    with pytest.raises(InvalidSpecError, match="not a power of two"):
        make_spec(depth=3).replace(node_weight=torch.zeros(5, 8))


def test_neuron_tree_shape_errors():
    spec = make_spec(form="neuron_tree", depth=2, trees=2)
    with pytest.raises(InvalidSpecError, match="FFFSpec.node_weight: has 6 neurons per tree; depth 2 needs"):
        spec.replace(node_weight=torch.zeros(2, 6, 8))
    with pytest.raises(InvalidSpecError, match="FFFSpec.leaf_w1: must be None"):
        spec.replace(leaf_w1=torch.zeros(4, 8, 2))


def test_spec_is_frozen_and_compares_by_value():
    spec = make_spec(seed=1)
    with pytest.raises(Exception):
        spec.depth = 4
    assert spec.same_as(make_spec(seed=1))
    assert not spec.same_as(make_spec(seed=2))
    assert not spec.same_as(spec.replace(tie="gt"))
    assert spec.same_as(spec.to(torch.float64))
