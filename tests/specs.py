"""Random FFF specs for property tests: ``make_spec`` builds one from plain parameters and a seed,
``specs()`` is the hypothesis strategy over every form, activation, tie rule and dtype.

Weights are drawn so that decisions are not degenerate (node logits of order one on unit-normal
inputs) and leaves differ from one another (a wrong leaf shows in the numbers).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fffcompile.spec import ACTIVATIONS, DTYPES, FFFSpec


def make_spec(form: str = "leaf_mlp", depth: int = 3, d_in: int = 8, d_out: int = 5, leaf_width: int = 4,
              trees: int = 1, activation: str = "relu", tie: str = "ge", dtype: torch.dtype = torch.float32,
              master: int = 0, linear_leaves: bool = False, seed: int = 0, source: str = "soft") -> FFFSpec:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if form == "leaf_mlp":
        leaves, nodes = 2 ** depth, 2 ** depth - 1
        width = d_out if linear_leaves else leaf_width
        extra = {}
        if master:
            extra = dict(master_w1=rnd(d_in, master, scale=d_in ** -0.5), master_b1=rnd(master, scale=0.1),
                         master_w2=rnd(master, d_out, scale=master ** -0.5), master_b2=rnd(d_out, scale=0.1),
                         master_logit=rnd((), scale=1.0), master_activation=activation)
        return FFFSpec("leaf_mlp", depth, activation,
                       node_weight=rnd(nodes, d_in, scale=d_in ** -0.5), node_bias=rnd(nodes, scale=0.1),
                       leaf_w1=rnd(leaves, d_in, width, scale=d_in ** -0.5), leaf_b1=rnd(leaves, width, scale=0.5),
                       leaf_w2=None if linear_leaves else rnd(leaves, width, d_out, scale=width ** -0.5),
                       leaf_b2=None if linear_leaves else rnd(leaves, d_out, scale=0.5),
                       tie=tie, source=source, **extra)
    n = 2 ** (depth + 1) - 1
    return FFFSpec("neuron_tree", depth, activation,
                   node_weight=rnd(trees, n, d_in, scale=d_in ** -0.5), node_bias=rnd(trees, n, scale=0.1),
                   out_weight=rnd(trees, n, d_out, scale=(trees * (depth + 1)) ** -0.5), out_bias=rnd(d_out, scale=0.1),
                   tie=tie, source="hard")


@st.composite
def specs(draw, forms=("leaf_mlp", "neuron_tree"), dtypes=DTYPES, max_depth: int = 5, max_width: int = 24,
          master: bool = True):
    """A random spec: any form, depth 0..max_depth (form B: 0..max_depth), widths 1..max_width."""
    form = draw(st.sampled_from(forms))
    linear = form == "leaf_mlp" and draw(st.booleans())
    return make_spec(
        form=form,
        depth=draw(st.integers(0, max_depth)),
        d_in=draw(st.integers(1, max_width)),
        d_out=draw(st.integers(1, max_width)),
        leaf_width=draw(st.integers(1, max_width)),
        trees=draw(st.integers(1, 4)),
        activation="identity" if linear and draw(st.booleans()) else draw(st.sampled_from(ACTIVATIONS)),
        tie=draw(st.sampled_from(("ge", "gt"))),
        dtype=draw(st.sampled_from(dtypes)),
        master=draw(st.sampled_from((0, 0, 3))) if master and form == "leaf_mlp" else 0,
        linear_leaves=linear,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def batch_shapes():
    """Leading dims of an input: batch 0 and 1 included, one or two leading dims."""
    return st.sampled_from([(0,), (1,), (2,), (7,), (33,), (1, 1), (2, 3), (0, 4), (3, 0)])


def random_input(spec: FFFSpec, lead: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, spec.d_in, generator=g, dtype=torch.float64).to(spec.dtype)
