"""Extract an FFFSpec from a cut-out candidate by evaluating it, never by reading names.

Every weight is read as the coefficients of an affine map, evaluated on the cut-out in float64
on chosen rows, with chosen intermediate values overridden (``Cutout.run_rows``):

- node logits z = x W^T + b: the logit sources evaluated on x = 0 and x = e_i (d_in + 1 rows),
  checked affine on random rows; their features, in anchor order, are the heap-ordered nodes
  (a learned threshold, z - t, is simply part of the bias);
- form A leaves: the pre-activations a = x W1 + b1 the same way; then, with the node logits
  overridden to 0 (every leaf weighted 2^-D) and the activations overridden to 0 and to each
  unit vector e_c, y is affine in the activations: its coefficients are W2 / 2^D for each
  hidden unit. Overriding the logits with random values instead scales each unit's row by its
  leaf's weight mu_j, which tells which leaf each unit belongs to, whatever the layout.
  b2_j: activations 0, logits forced (+-T, hardened) along leaf j's path. For many hidden
  units the same coefficients are read by backward passes instead (``_mixing_by_gradients``:
  three passes over d_out rows, linear in the leaf count where one row per unit is quadratic); Leaves without an
  activation (linear leaves): per leaf, x = 0 and e_i with the path forced;
- form B: node weights as above; for each neuron column c, activations e_c with the logits
  forced along a path through c (level-uniform signs, so no topology is assumed beyond heap
  order), y(e_c) - y(0) is c's output row, y(0) the output bias.

Extraction assumes heap order (per-level or flat node tensors, leaves in storage order); a
graph that means something else (children swapped, paths that are not a tree) yields a spec
that confirmation by numbers then rejects. A refusal is a string with the reason.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import fx

from ..errors import InvalidSpecError
from ..spec import FFFSpec, is_power_of_two
from .graph_anchor import Candidate
from .graph_canonical import GraphFacts, SHAPE_ONLY, hint_shape
from .graph_cutout import Cutout

_T = 40.0                  # |logit| that saturates a sigmoid in float64
_ACTS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "tanh": "tanh",
         "sigmoid": "sigmoid", "expit": "sigmoid", "special_expit": "sigmoid"}   # a sigmoid not among the decisions


def _basis(d_in: int) -> torch.Tensor:
    return torch.cat([torch.zeros(1, d_in, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64)])


def _affine(cut: Cutout, nodes: list[fx.Node], d_in: int, seed: int) -> Union[tuple, str]:
    """(W (F, d_in), b (F,)) of the concatenated per-row features of ``nodes`` as functions of x."""
    B = _basis(d_in)
    Xr = torch.randn(3, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = cut.run_rows(torch.cat([B, Xr]), want=nodes, double=True)
    Z = torch.cat([v.double() for v in values], 1)
    b = Z[0]
    W = (Z[1:d_in + 1] - b).T.contiguous()
    check = Xr @ W.T + b
    if not torch.allclose(check, Z[d_in + 1:], rtol=1e-5, atol=1e-6 * (1 + float(Z.abs().max()))):
        return None
    return W, b


def activation_nodes(facts: GraphFacts, cand: Candidate, cut: Cutout, per_leaf: bool = False) -> Union[tuple, str]:
    """(act name, pre-activation nodes, activation output nodes) on the leaf side of the cut-out.

    per_leaf: a hard tree's leaves may be computed for the chosen leaf only (weights gathered by
    the leaf index): then any activation after the decisions counts, affine in x or not."""
    decisions = set(cand.decisions)
    decision_side = facts.value_descendants(decisions)
    upstream = facts.ancestors(decisions)
    found = []
    for n in cut.nodes:
        name = facts.name[n]
        if name not in _ACTS or n in decisions:
            continue
        arg = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if arg is None:
            continue
        if per_leaf:
            if n in upstream or not facts.depends.get(arg):
                continue
        elif n in decision_side or facts.affine_source.get(arg) is not cand.x:
            continue
        act = _ACTS[name]
        if act == "gelu" and n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh":
            act = "gelu_tanh"
        if n.op == "call_module":
            module = facts.gm.get_submodule(n.target)
            if act == "gelu" and getattr(module, "approximate", "none") == "tanh":
                act = "gelu_tanh"
        out = n
        users = list(n.users)
        if act == "relu" and len(users) == 1:
            u = users[0]
            uname = facts.name[u]
            if (uname == "pow" and len(u.args) > 1 and u.args[1] == 2) or uname == "square" or \
                    (uname == "mul" and len(u.args) == 2 and u.args[0] is n and u.args[1] is n):
                act, out = "relu2", u
        found.append((act, n, out))
    if not found:
        return "identity", [], []
    names = {a for a, _, _ in found}
    if len(names) > 1:
        return f"the leaf side mixes activations {sorted(names)}"
    return found[0][0], [n.args[0] for _, n, _ in found], [o for _, _, o in found]


def _split(cut: Cutout, nodes, values: torch.Tensor) -> dict:
    """Per-row values (R, sum F) split over nodes by their feature counts."""
    out, start = {}, 0
    for n in nodes:
        f = math.prod(cut.features(n))
        out[n] = values[:, start:start + f]
        start += f
    return out


def not_by_rows(cut: Cutout, nodes, what: str) -> str:
    """Why ``nodes`` have no layout by the input's rows; names a per-row loop when it looks like one:
    many values, each smaller than the row count, their number a multiple of it."""
    x_shape = hint_shape(cut.x)
    rows = math.prod(x_shape[:-1]) if x_shape else 0
    sizes = {n: math.prod(hint_shape(n) or (rows,)) for n in nodes}
    if rows > 1 and len(nodes) >= rows and len(nodes) % rows == 0 and all(v < rows for v in sizes.values()):
        return (f"{what} is not laid out by the input's rows: {len(nodes)} values of <= {max(sizes.values())} "
                f"element(s) for {rows} rows, a loop over the example's rows (specialised to its batch size); "
                f"only trees that compute all rows in the same ops are read")
    return f"{what} is not laid out by the input's rows"


def _feature_count(cut: Cutout, nodes) -> Union[int, str]:
    total = 0
    for n in nodes:
        feats = cut.features(n)
        if feats is None:
            return not_by_rows(cut, nodes, n.name)
        total += math.prod(feats)
    return total


def heap_paths(depth: int) -> torch.Tensor:
    """(2^D, 2^D - 1) signs: +1 / -1 where leaf j's path goes right / left at a node, -1 off the path."""
    L, N = 2 ** depth, 2 ** depth - 1
    signs = -torch.ones(L, N, dtype=torch.float64)
    leaves = torch.arange(L)
    node = torch.zeros(L, dtype=torch.long)
    for level in range(depth):
        right = (leaves >> (depth - 1 - level)) & 1
        signs[leaves, node] = right.double() * 2 - 1
        node = 2 * node + 1 + right
    return signs


def leaf_weights_from_logits(t: torch.Tensor, depth: int) -> torch.Tensor:
    p = torch.sigmoid(t)
    mu = torch.ones(t.shape[0], 1, dtype=t.dtype)
    for level in range(depth):
        pl = p[:, 2 ** level - 1: 2 ** (level + 1) - 1]
        mu = torch.stack((mu * (1 - pl), mu * pl), -1).reshape(t.shape[0], -1)
    return mu


GRADIENT_ROWS_FACTOR = 3    # read the mixing by gradients when 3 d_out rows are fewer than the probe rows


def _gradients_pay(cut: Cutout, C: int, L: int) -> bool:
    """Gradients cost 3 passes over d_out rows; one probe row per hidden unit costs 2 (C + 1) + L rows."""
    feats = cut.features(cut.y)
    if feats is None:
        return False
    return GRADIENT_ROWS_FACTOR * math.prod(feats) < 2 * (C + 1) + L


def _mixing_by_gradients(cut: Cutout, cand: Candidate, act_out, N: int, C: int, L: int, d_in: int, t1: torch.Tensor):
    """(M0, M1, b2) of a soft leaf-MLP candidate from three backward passes over d_out rows, or None.

    With the activations h and the node logits t overridden, y = sum_j mu_j(t) (h_j W2_j + b2_j).
    Row r of a pass reads output feature r, so one backward pass gives a whole Jacobian:
    - d y / d h at t = 0: every mu_j = 2^-D, so the rows are W2 / 2^D (M0);
    - d y / d h at t = t1: each unit's row scaled by its leaf's mu_j(t1) 2^D (M1, the ownership);
    - d y / d t at h = 0, t = 0: 2^-(D+1) (sum of b2 under n's right child - under its left), and
      y itself 2^-D sum_j b2_j: the leaves' b2 follow top-down (a Haar transform, O(L d_out)).
    Linear in the graph size, where one probe row per hidden unit is quadratic in the leaf count.
    A graph autograd cannot differentiate (or that differentiates to something else) returns None
    or a spec that confirmation rejects; the caller then probes row by row."""
    d_out = math.prod(cut.features(cut.y))
    depth = L.bit_length() - 1
    pick = torch.eye(d_out, dtype=torch.float64)
    x0 = torch.zeros(d_out, d_in, dtype=torch.float64)

    def jacobian(H, logits, wrt):
        leaf = H if wrt == "h" else logits
        leaf.requires_grad_(True)
        y = cut.run_rows(x0, overrides={**_split(cut, act_out, H), **_split(cut, cand.sources, logits)},
                         double=True, grad=True, chunk=max(1024, d_out))
        if not y.requires_grad:
            raise RuntimeError("the output does not depend on the overridden values")
        (g,) = torch.autograd.grad((y.double() * pick).sum(), leaf)
        return y.detach().double(), g.detach()                              # g: (d_out, features)

    try:
        zeros_h, zeros_t = torch.zeros(d_out, C, dtype=torch.float64), torch.zeros(d_out, N, dtype=torch.float64)
        _, G0 = jacobian(zeros_h.clone(), zeros_t.clone(), "h")
        _, G1 = jacobian(zeros_h.clone(), t1.expand(d_out, N).clone(), "h")
        y0, Gt = jacobian(zeros_h.clone(), zeros_t.clone(), "t")
    except Exception:     # a third-party op without a derivative, an in-place write autograd refuses
        return None
    sums = y0[:1] * L                                                     # (1, d_out): sum of b2 over the whole tree
    for level in range(depth):
        lo, hi = 2 ** level - 1, 2 ** (level + 1) - 1
        delta = Gt[:, lo:hi].T * 2 ** (depth + 1)                         # right-subtree sum minus left
        sums = torch.stack(((sums - delta) / 2, (sums + delta) / 2), 1).reshape(-1, d_out)
    return G0.T.contiguous(), G1.T.contiguous(), sums


def extract_leaf_mlp(facts: GraphFacts, cand: Candidate, cut: Cutout, d_in: int, seed: int = 0) -> Union[FFFSpec, str]:
    N = _feature_count(cut, cand.sources)
    if isinstance(N, str):
        return N
    if not is_power_of_two(N + 1):
        return f"the decisions read {N} node logits; a tree of depth D has 2^D - 1"
    depth = (N + 1).bit_length() - 1
    L = 2 ** depth
    affine = _affine(cut, cand.sources, d_in, seed)
    if affine is None:
        return "the node logits are not an affine function of the input"
    W, b = affine
    acts = activation_nodes(facts, cand, cut)
    if isinstance(acts, str):
        return acts
    act, act_in, act_out = acts
    harden = {d: "ge" for d in cand.decisions}
    zeros_x = lambda r: torch.zeros(r, d_in, dtype=torch.float64)
    if not act_in:
        # linear leaves: per leaf, x = 0 and e_i with the path forced
        B = _basis(d_in)
        rows = B.repeat(L, 1)
        forced = (heap_paths(depth) * _T).repeat_interleave(d_in + 1, 0)
        Y = cut.run_rows(rows, overrides=_split(cut, cand.sources, forced), harden=harden, double=True).double()
        Y = Y.reshape(L, d_in + 1, -1)
        b1 = Y[:, 0]
        W1 = Y[:, 1:] - b1.unsqueeze(1)
        spec_args = dict(leaf_w1=W1, leaf_b1=b1, leaf_w2=None, leaf_b2=None, activation="identity")
    else:
        C = _feature_count(cut, act_in)
        if isinstance(C, str):
            return C
        if C % L:
            return f"{C} hidden units do not split over {L} leaves"
        width = C // L
        pre = _affine(cut, act_in, d_in, seed + 1)
        if pre is None:
            return "the leaf pre-activations are not an affine function of the input"
        W1all, b1all = pre
        t1 = torch.randn(1, N, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
        read = _mixing_by_gradients(cut, cand, act_out, N, C, L, d_in, t1) if _gradients_pay(cut, C, L) else None
        if read is None:
            eye = torch.cat([torch.zeros(1, C, dtype=torch.float64), torch.eye(C, dtype=torch.float64)])
            logits = torch.cat([torch.zeros(C + 1, N, dtype=torch.float64), t1.expand(C + 1, N)])
            H = torch.cat([eye, eye])
            overrides = {**_split(cut, act_out, H), **_split(cut, cand.sources, logits)}
            Y = cut.run_rows(zeros_x(2 * (C + 1)), overrides=overrides, double=True).double()
            M0, M1 = Y[1:C + 1] - Y[0], Y[C + 2:] - Y[C + 1]
        else:
            M0, M1, Yb = read
        norm = (M0 * M0).sum(1)
        alive = norm > 1e-24 * float(norm.max().clamp_min(1e-300))
        ratio = torch.where(alive, (M1 * M0).sum(1) / norm.clamp_min(1e-300), torch.zeros_like(norm))
        target = leaf_weights_from_logits(t1, depth)[0] * L                # (L,)
        owner = (ratio.unsqueeze(1) - target.unsqueeze(0)).abs().argmin(1)
        miss = ((ratio - target[owner]).abs() / target[owner].clamp_min(1e-12))[alive]
        if miss.numel() and float(miss.max()) > 1e-3:
            return (f"the leaf outputs are not mixed by the path products of a heap-ordered tree "
                    f"(a hidden unit's weight is off by {float(miss.max()):.2g} relative)")
        owner = torch.where(alive, owner, torch.arange(C) // width)
        columns = [torch.nonzero(owner == j).flatten() for j in range(L)]
        if any(len(c) != width for c in columns):
            return "the hidden units do not split evenly over the leaves"
        index = torch.stack(columns)                                          # (L, width)
        W1 = W1all[index].transpose(1, 2)                                     # (L, d_in, width)
        b1 = b1all[index]
        W2 = M0[index] * L                                                    # (L, width, d_out)
        if read is None:
            H0 = torch.zeros(L, C, dtype=torch.float64)
            Yb = cut.run_rows(zeros_x(L), overrides={**_split(cut, act_out, H0), **_split(cut, cand.sources, heap_paths(depth) * _T)},
                              harden=harden, double=True).double()
        spec_args = dict(leaf_w1=W1, leaf_b1=b1, leaf_w2=W2, leaf_b2=Yb, activation=act)
    try:
        return FFFSpec("leaf_mlp", depth, node_weight=W, node_bias=b, tie="ge", source="soft", **spec_args)
    except InvalidSpecError as error:
        return f"the extracted weights do not make a valid spec ({error})"


def extract_neuron_tree(facts: GraphFacts, cand: Candidate, cut: Cutout, d_in: int, seed: int = 0) -> Union[list, str]:
    """Every (depth, trees) reading of a hard candidate as a neuron tree, as specs to confirm."""
    K = _feature_count(cut, cand.sources)
    if isinstance(K, str):
        return K
    affine = _affine(cut, cand.sources, d_in, seed)
    if affine is None:
        return "the neuron pre-activations are not an affine function of the input"
    W, b = affine
    thresholds = {float(d.args[1]) for d in cand.decisions}
    ties = {facts.name[d] for d in cand.decisions}
    if len(thresholds) != 1 or len(ties) != 1:
        return "the decisions use different comparisons"
    b = b - thresholds.pop()
    tie = ties.pop()
    acts = activation_nodes(facts, cand, cut)
    if isinstance(acts, str):
        return acts
    act, act_in, act_out = acts
    if not act_in:
        return "no activation of the neurons on the leaf side"
    C = _feature_count(cut, act_out)
    if isinstance(C, str):
        return C
    if C != K:
        return f"{K} decisions but {C} activations"
    readings = [d for d in range(1, 24) if 2 ** (d + 1) - 1 <= K and K % (2 ** (d + 1) - 1) == 0]
    if not readings:
        return f"{K} neurons do not make P trees of 2^(D+1) - 1 nodes (D >= 1)"
    perm = _activation_order(cut, cand, act_in, W, b, d_in, seed)
    return _neuron_readings(cut, cand, d_in, K, W[perm], b[perm], act, act_out, tie, sorted(readings, reverse=True), perm)


def _activation_order(cut, cand, act_in, W, b, d_in, seed) -> torch.Tensor:
    """perm with activation column i = logit column perm[i]: the neurons' pre-activations read as
    affine maps and matched row by row to the node logits' (a layer that transposes its neurons
    between the decisions and the activations, node-major storage read tree-major); identity
    when they are not a permutation of each other."""
    K = W.shape[0]
    identity = torch.arange(K)
    pre = _affine(cut, act_in, d_in, seed + 3)
    if pre is None or pre[0].shape != W.shape:
        return identity
    A = torch.cat([pre[0], pre[1].unsqueeze(1)], 1)
    Z = torch.cat([W, b.unsqueeze(1)], 1)
    dist = torch.cdist(A, Z)
    perm = dist.argmin(1)
    scale = 1e-6 * (1.0 + float(Z.abs().max()))
    if len(set(perm.tolist())) != K or float(dist.gather(1, perm.unsqueeze(1)).max()) > scale * K:
        return identity
    return perm


def _neuron_readings(cut, cand, d_in, K, W, b, act, act_out, tie, depths, perm):
    """Specs for each depth reading, deepest (fewest trees) first, computed only when asked for;
    the activation columns read tree-major (column p n + k), then node-major (k P + p).
    W, b: in activation order; perm: activation column -> logit column."""
    for depth in depths:
        n = 2 ** (depth + 1) - 1
        P = K // n
        # a path through column c: level-uniform signs that lead to the leftmost leaf below c
        level = torch.tensor([(k + 1).bit_length() - 1 for k in range(n)])
        pos = torch.arange(n) - (2 ** level - 1)
        leaf = pos << (depth - level)                                          # (n,) leaf below node k
        bits = ((leaf.unsqueeze(1) >> (depth - 1 - level.unsqueeze(0)).clamp_min(0)) & 1).double() * 2 - 1  # (n, n)
        bits = torch.where(level.unsqueeze(0) < depth, bits, -torch.ones_like(bits))
        tree_major = bits.repeat(1, P).repeat(P, 1) * _T                       # rows, cols: tree-major p * n + k
        layouts = [torch.arange(K)] + ([torch.arange(K).view(n, P).T.reshape(-1)] if P > 1 else [])
        for flat in layouts:                                                   # tree-major index -> activation column
            signs = torch.empty_like(tree_major)
            signs[flat.unsqueeze(1), flat.unsqueeze(0)] = tree_major           # rows, cols in activation order
            by_logit = torch.empty_like(signs)
            by_logit[:, perm] = signs                                          # cols in the logits' order
            H = torch.cat([torch.zeros(1, K, dtype=torch.float64), torch.eye(K, dtype=torch.float64)])
            logits = torch.cat([by_logit[:1], by_logit])
            Y = cut.run_rows(torch.zeros(K + 1, d_in, dtype=torch.float64),
                             overrides={**_split(cut, act_out, H), **_split(cut, cand.sources, logits)}, double=True).double()
            V = (Y[1:] - Y[0])[flat]
            try:
                yield (FFFSpec("neuron_tree", depth, act, node_weight=W[flat].reshape(P, n, d_in),
                               node_bias=b[flat].reshape(P, n), out_weight=V.reshape(P, n, -1), out_bias=Y[0],
                               tie=tie, source="hard"))
            except InvalidSpecError:
                continue



def _path_bits(target: int, length: int) -> list[int]:
    """The right/left bits (1 = right) of the path to position ``target`` of level ``length``, root first."""
    return [(target >> (length - 1 - e)) & 1 for e in range(length)]


def extract_hard_leaf_mlp(facts: GraphFacts, cand: Candidate, cut: Cutout, d_in: int, seed: int = 0) -> Union[FFFSpec, str]:
    """A form A tree that already descends (comparisons, index recurrence, gathered weights).

    Every decision's output is overridden per row with the bits of a chosen path (per-level
    decisions: one bit per level; one decision over all nodes: each node the bit of its level),
    so that the graph's own index arithmetic reaches the chosen node or leaf. Then the logit
    of node n is read off at x = 0, e_i with the path to n forced; leaf j's pre-activations and,
    with the activations overridden by 0 and e_c, its output rows, with the path to j forced.
    """
    decisions = cand.decisions
    feats = [cut.features(d) for d in decisions]
    if any(f is None for f in feats):
        return not_by_rows(cut, decisions, "a decision")
    counts = [math.prod(f) for f in feats]
    if all(c == 1 for c in counts):
        depth, dense = len(decisions), False
    elif len(decisions) == 1 and is_power_of_two(counts[0] + 1):
        depth, dense = (counts[0] + 1).bit_length() - 1, True
    else:
        return f"decisions of widths {counts}: neither one per level nor one over 2^D - 1 nodes"
    thresholds = {float(d.args[1]) for d in decisions}
    ties = {facts.name[d] for d in decisions}
    if len(thresholds) != 1 or len(ties) != 1:
        return "the decisions use different comparisons"
    threshold, tie = thresholds.pop(), ties.pop()
    L, N = 2 ** depth, 2 ** depth - 1
    node_level = torch.tensor([(k + 1).bit_length() - 1 for k in range(N)])

    def forced(bits_rows: torch.Tensor) -> dict:
        """Overrides for rows whose per-level bits are bits_rows (R, depth)."""
        if dense:
            values = bits_rows[:, node_level] if N else bits_rows[:, :0]
            return {decisions[0]: values.bool()}
        return {d: bits_rows[:, level:level + 1].bool() for level, d in enumerate(decisions)}

    B = _basis(d_in)
    k = d_in + 1
    # node logits
    if dense:
        affine = _affine(cut, [decisions[0].args[0]], d_in, seed)
        if affine is None:
            return "the node logits are not an affine function of the input"
        W, b = affine
    else:
        bits, blocks = [], []
        for n in range(N):
            level = node_level[n].item()
            path = _path_bits(n - (2 ** level - 1), level) + [0] * (depth - level)
            bits.append(torch.tensor(path, dtype=torch.float64).expand(k, depth))
            blocks.append(level)
        rows = B.repeat(N, 1)
        values = cut.run_rows(rows, overrides=forced(torch.cat(bits)), want=[d.args[0] for d in decisions], double=True)
        W = torch.empty(N, d_in, dtype=torch.float64)
        b = torch.empty(N, dtype=torch.float64)
        for n, level in enumerate(blocks):
            z = values[level][n * k:(n + 1) * k, 0].double()
            b[n], W[n] = z[0], z[1:] - z[0]
    b = b - threshold
    leaf_bits = torch.tensor([_path_bits(j, depth) for j in range(L)], dtype=torch.float64).reshape(L, depth)
    acts = activation_nodes(facts, cand, cut, per_leaf=True)
    if isinstance(acts, str):
        return acts
    act, act_in, act_out = acts
    per_leaf_x = leaf_bits.repeat_interleave(k, 0)
    if not act_in:
        Y = cut.run_rows(B.repeat(L, 1), overrides=forced(per_leaf_x), double=True).double().reshape(L, k, -1)
        spec_args = dict(leaf_w1=Y[:, 1:] - Y[:, :1], leaf_b1=Y[:, 0], leaf_w2=None, leaf_b2=None, activation="identity")
    else:
        C = _feature_count(cut, act_in)
        if isinstance(C, str):
            return C
        if L * (C + 1) > 200_000:
            return f"{L} leaves with {C} hidden units each are too many to read off one by one"
        pre = cut.run_rows(B.repeat(L, 1), overrides=forced(per_leaf_x), want=act_in, double=True)
        A = torch.cat([v.double() for v in pre], 1).reshape(L, k, C)
        eye = torch.cat([torch.zeros(1, C, dtype=torch.float64), torch.eye(C, dtype=torch.float64)])
        H = eye.repeat(L, 1)
        Y = cut.run_rows(torch.zeros(L * (C + 1), d_in, dtype=torch.float64),
                         overrides={**forced(leaf_bits.repeat_interleave(C + 1, 0)), **_split(cut, act_out, H)},
                         double=True).double().reshape(L, C + 1, -1)
        M = Y[:, 1:] - Y[:, :1]                                                 # (L, C, d_out)
        norms = (M * M).sum(-1)
        alive = norms > 1e-24 * float(norms.max().clamp_min(1e-300))
        if bool(alive.all()):
            index = torch.arange(C).expand(L, C)                               # each row computes its own leaf
        else:
            if C % L:
                return f"{C} hidden units do not split over {L} leaves"
            index = norms.topk(C // L, dim=1).indices.sort(1).values           # leaf j's own units
        width = index.shape[1]
        index = index.contiguous()
        W1 = (A[:, 1:, :] - A[:, :1, :]).gather(2, index.unsqueeze(1).expand(L, d_in, width))
        b1 = A[:, 0, :].gather(1, index)
        W2 = M.gather(1, index.unsqueeze(2).expand(L, width, M.shape[2]))
        spec_args = dict(leaf_w1=W1.reshape(L, d_in, width), leaf_b1=b1, leaf_w2=W2, leaf_b2=Y[:, 0], activation=act)
    try:
        return FFFSpec("leaf_mlp", depth, node_weight=W, node_bias=b, tie="ge" if tie == "ge" else "gt",
                       source="hard", **spec_args)
    except InvalidSpecError as error:
        return f"the extracted weights do not make a valid spec ({error})"
