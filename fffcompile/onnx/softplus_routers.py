"""Softplus of a router logit, rewritten as the log-sigmoid it is, so that a softplus-written tree is read.

A log-space tree may score its leaves with softplus instead of log-sigmoid (FORMS.md, "variants"):
log mu_j = -sum_right softplus(-z_n) - sum_left softplus(z_n), normalised by a softmax over leaves
(or exponentiated), since log s(z) = -softplus(-z) and log s(-z) = -softplus(z). The frontend reads
router sigmoids, so each such Softplus is spelled with one:

    Softplus(Neg(z))  ->  Neg(Log(Sigmoid(z)))          (z is then a router logit: an anchor)
    Softplus(z)       ->  Neg(Log(Sigmoid(Neg(z))))     (s(-z): a complement, hardened as 1 - [z >= 0])

with z a projection of some X (``linear_chains.trace_source``); every other Softplus stays. Same values
to float rounding. ``optimize_onnx`` keeps the respelled model only when every respelled Softplus ends
up inside a rewritten FFF, so the rest of the graph is never touched: a softplus that is not part of a
confirmed tree stays exactly as it was.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .graph_index import GraphIndex
from .linear_chains import static_tensors, trace_source


def softplus_as_log_sigmoid(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """(a copy of ``model`` with router softplus respelled, the output names of the nodes that replace them)."""
    index = GraphIndex(model)
    static = static_tensors(index)
    names = {n.name for n in model.graph.node} | {o for n in model.graph.node for o in n.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for i, node in enumerate(index.nodes):
        if node.op_type != "Softplus" or node.domain not in ("", "ai.onnx") or node.input[0] in static:
            continue
        t, out = node.input[0], node.output[0]
        neg = index.producer_node(t)
        if neg is not None and neg.op_type == "Neg" and trace_source(index, neg.input[0], static) is not None:
            z, flip = neg.input[0], False
            if len(index.consumers.get(t, ())) == 1 and t not in index.graph_outputs:
                dropped.add(index.producer[t])
        elif trace_source(index, t, static) is not None:
            z, flip = t, True
        else:
            continue
        stem = _fresh(f"{node.name or out}.logsigmoid", names)
        nodes = []
        if flip:
            nodes.append(helper.make_node("Neg", [z], [f"{stem}.neg"], name=f"{stem}.neg"))
            z = f"{stem}.neg"
        nodes += [helper.make_node("Sigmoid", [z], [f"{stem}.sigmoid"], name=f"{stem}.sigmoid"),
                  helper.make_node("Log", [f"{stem}.sigmoid"], [f"{stem}.log"], name=f"{stem}.log"),
                  helper.make_node("Neg", [f"{stem}.log"], [out], name=f"{stem}.negated")]
        replacements[i] = nodes
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not replacements:
        return copy, set()
    new_nodes, outputs = [], set()
    for i, node in enumerate(index.nodes):
        if i in dropped:
            continue
        if i in replacements:
            new_nodes += replacements[i]
            outputs |= {o for n in replacements[i] for o in n.output}
        else:
            new_nodes.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(new_nodes)
    return copy, outputs


def _fresh(stem: str, names: set[str]) -> str:
    k = 0
    while any(n.startswith(f"{stem}{k}") for n in names):
        k += 1
    names.add(f"{stem}{k}")
    return f"{stem}{k}"
