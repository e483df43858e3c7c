"""The reference against FORMS.md read literally (tests/naive.py), and its soft/hard identities."""
import pytest
import torch
from hypothesis import given, strategies as st

import naive
from fffcompile import reference
from specs import batch_shapes, make_spec, random_input, specs

F64 = (torch.float64,)


@given(spec=specs(dtypes=F64, max_depth=4, max_width=6), lead=batch_shapes(), seed=st.integers(0, 2 ** 31 - 1))
def test_hard_equals_the_literal_forms(spec, lead, seed):
    x = random_input(spec, lead, seed)
    torch.testing.assert_close(reference.hard(spec, x), naive.hard(spec, x), rtol=1e-9, atol=1e-9)


@given(spec=specs(forms=("leaf_mlp",), dtypes=F64, max_depth=5, max_width=8), seed=st.integers(0, 2 ** 31 - 1))
def test_soft_with_hardened_sigmoids_is_the_hard_form(spec, seed):
    x = random_input(spec, (17,), seed)
    torch.testing.assert_close(reference.soft(spec, x, harden=True), reference.hard(spec, x), rtol=1e-9, atol=1e-9)


@given(spec=specs(forms=("neuron_tree",), dtypes=F64, max_depth=4, max_width=8), seed=st.integers(0, 2 ** 31 - 1))
def test_neuron_tree_training_form_is_already_hard(spec, seed):
    x = random_input(spec, (9,), seed)
    torch.testing.assert_close(reference.soft(spec, x), reference.hard(spec, x), rtol=1e-9, atol=1e-9)


@given(spec=specs(forms=("leaf_mlp",), dtypes=F64, max_depth=6, master=False), seed=st.integers(0, 2 ** 31 - 1))
def test_leaf_weights_are_a_distribution_peaked_on_the_hard_leaf_when_hardened(spec, seed):
    x = random_input(spec, (13,), seed)
    mu = reference.leaf_weights(spec, x)
    torch.testing.assert_close(mu.sum(1), torch.ones(13, dtype=torch.float64))
    hard_mu = reference.leaf_weights(spec, x, harden=True)
    leaf = reference.route(spec, x).leaf[:, 0]
    assert torch.equal(hard_mu.argmax(1), leaf)
    assert torch.equal(hard_mu.sum(1), torch.ones(13, dtype=torch.float64))


def test_leaf_index_spells_the_path_most_significant_bit_first():
    # depth 2, node logits forced by biases: root right, then node 2 (right child) goes left -> leaf 0b10 = 2
    spec = make_spec(depth=2, d_in=3, dtype=torch.float64)
    spec = spec.replace(node_weight=torch.zeros_like(spec.node_weight),
                        node_bias=torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    route = reference.route(spec, torch.zeros(1, 3, dtype=torch.float64))
    assert route.nodes[0, 0].tolist() == [0, 2]
    assert route.leaf.item() == 2
    assert route.margin.item() == 1.0


@pytest.mark.parametrize("tie,expected_leaf", [("ge", 1), ("gt", 0)])
def test_tie_rule_decides_exact_zero(tie, expected_leaf):
    spec = make_spec(depth=1, d_in=2, tie=tie, dtype=torch.float32)
    spec = spec.replace(node_weight=torch.zeros_like(spec.node_weight), node_bias=torch.zeros_like(spec.node_bias))
    assert reference.route(spec, torch.ones(1, 2)).leaf.item() == expected_leaf
    assert reference.near_ties(spec, torch.ones(1, 2)).item()


def test_half_precision_accumulates_in_float32_and_rounds_once():
    spec32 = make_spec(depth=3, d_in=16, d_out=8, leaf_width=8, seed=3)
    spec16 = spec32.to(torch.bfloat16)
    x = random_input(spec16, (64,), 1)
    expected = reference.hard(spec16.to(torch.float32), x.float()).to(torch.bfloat16)
    assert torch.equal(reference.hard(spec16, x), expected)
