"""Form B extraction: the FFFSpec of a neuron-tree region (UltraFastBERT), its weights read back by numbers.

The region computes a = x W_in^T + b_in over every neuron, decisions [a > 0] (or >= 0, from
the comparison op), h = act(a), a 0/1 path mask built from the decisions with
Gather/GatherElements/GatherND and Scatter ops, and y = (h * mask) W_out (+ bias).

1. a is evaluated on X = 0, e_1 .. e_d and random rows: node_weight / node_bias (tree-major,
   neuron p n + k is node k of tree p), checked to be affine.
   Decisions taken on a reshaped view of a (the trees as (B, P, n)) read a itself, where the activation does.
2. The activation is identified numerically on a (``activation_match``).
3. The region is cut at the decisions and at h, which become inputs. For the layout hypothesis
   (P trees of depth D with P (2^(D+1) - 1) neurons), one row per neuron sets the decisions
   so that every tree's path passes that neuron and h = e_neuron: y = out_weight[neuron] + out_bias;
   a row with h = 0 gives out_bias. Every (P, D) that divides the neuron count is a hypothesis,
   deepest first; ``confirm`` keeps the first whose numbers hold.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..spec import FFFSpec
from .activation_match import elementwise_closure, match_activation
from .extract_leaf_tree import NotExtracted, input_dtypes, affine_probes, read_affine
from .graph_index import GraphIndex, evaluate, make_session
from .probes import columns, feed_shape, shaped, x_layout
from .region import Region


def layouts(neurons: int) -> list[tuple[int, int]]:
    """(trees, depth) pairs with trees * (2^(depth+1) - 1) == neurons, deepest first (depth >= 1)."""
    out = []
    for depth in range(24, 0, -1):
        n = 2 ** (depth + 1) - 1
        if n <= neurons and neurons % n == 0:
            out.append((neurons // n, depth))
    return out


def extract_neuron_tree(index: GraphIndex, region: Region, comparison: int, tie: str) -> Iterator[FFFSpec]:
    """Specs for every layout hypothesis, most likely first."""
    rank, d_in = x_layout(index.shape(region.x))
    dtype, np_dtype = input_dtypes(index, region)
    node = index.nodes[comparison]
    a = node.input[0] if node.op_type in ("Greater", "GreaterOrEqual") else node.input[1]
    decisions = node.output[0]
    for _ in range(4):     # decisions on a reshaped view of the logits (trees as (B, P, n)): the activation reads the source
        view = index.producer_node(a)
        if view is None or view.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast") \
                or len(index.consumers.get(a, ())) != 1 or index.producer.get(view.input[0]) not in region.nodes:
            break
        a = view.input[0]
    closure = elementwise_closure(index, a, region.nodes)
    probes = affine_probes(d_in)
    rows = probes.shape[0]
    taps = [a, decisions, *closure]
    model = index.submodel(index.backward_slice(taps, stop={region.x}) & region.nodes, region.inputs, taps)
    values = evaluate(model, region.feed(index, shaped(probes.astype(np_dtype), rank)), [a, decisions, *closure])
    W, b = read_affine(columns(values[a], rows), probes, "the neuron pre-activation")
    act, h = match_activation(values[a], {v: values[v] for v in closure},
                              getattr(index, "narrow_dtypes", {}).get(region.x, torch.float32))
    h = h or a
    neurons = W.shape[1]
    if h == a:
        raise NotExtracted("the neurons' activation is not one fffcompile knows (relu, gelu, silu, tanh, ...)")
    cut = {region.x, decisions, h}
    nodes = index.backward_slice([region.y], stop=cut | set(region.shape_sources)) & region.nodes
    second = make_session(index.submodel(nodes, [*region.inputs, decisions, h], [region.y]))
    to = lambda t: torch.from_numpy(np.ascontiguousarray(t)).to(dtype)
    hypotheses = layouts(neurons)
    if not hypotheses:
        raise NotExtracted(f"{neurons} neurons is not P (2^(D+1) - 1) for any depth D >= 1")
    for trees, depth in hypotheses:
        n = 2 ** (depth + 1) - 1
        R = neurons + 1
        dec = np.zeros((R, neurons), dtype=bool)
        hs = np.zeros((R, neurons))
        for p in range(trees):
            for k in range(n):
                row = 1 + p * n + k
                hs[row, p * n + k] = 1.0
                for t in range(trees):           # every tree passes through node k
                    for ancestor, right in _ancestors(k):
                        dec[row, t * n + ancestor] = right
        feeds = {**region.feed(index, shaped(np.zeros((R, d_in), np_dtype), rank)),
                 decisions: dec.reshape(feed_shape(values[decisions].shape, rows, R)),
                 h: hs.astype(np_dtype).reshape(feed_shape(values[h].shape, rows, R))}
        y = columns(evaluate(second, feeds, [region.y])[region.y], R).astype(np.float64)
        out_bias = y[0]
        out_weight = (y[1:] - out_bias).reshape(trees, n, -1)
        yield FFFSpec(form="neuron_tree", depth=depth, activation=act,
                      node_weight=to(W.T.reshape(trees, n, d_in)), node_bias=to(b.reshape(trees, n)),
                      out_weight=to(out_weight), out_bias=to(out_bias), tie=tie, source="hard")


def _ancestors(node: int) -> list[tuple[int, bool]]:
    """(ancestor, goes right) pairs on the path from the root to ``node`` (heap order)."""
    path = []
    while node > 0:
        parent = (node - 1) // 2
        path.append((parent, node == 2 * parent + 2))
        node = parent
    return path[::-1]
