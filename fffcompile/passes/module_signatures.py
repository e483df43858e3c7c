"""Module frontend, step 1: which modules hold an FFF, judged by their parameter shapes alone.

A module is a candidate when its parameters (its own and its children's, float buffers too)
contain one of these signatures; names are never looked at:

- form A (leaf-MLP tree, optionally form C): node weights (N, d_in) with N + 1 = L a power of
  two >= 2, leaf first-layer weights (L, d_in, l) or (L, l, d_in), optionally leaf second-layer
  weights (L, l, d_out) or (L, d_out, l), biases (N,) / (N, 1), (L, l), (L, d_out), and a
  master leaf (d_in, m), (m,), (m, d_out), (d_out,), a scalar logit.
- form B (neuron trees): input weights (K, d_in) and output weights (d_out, K) or (K, d_out)
  with K = P (2^(D+1) - 1), D >= 2, optional biases (K,) and (d_out,); or stacked per tree,
  (P, n, d_in) and (P, n, d_out) with n = 2^(D+1) - 1, biases (P, n) and (d_out,).

``interpretations`` turns a candidate with known d_in / d_out (recorded from a real forward)
into every FFFSpec the tensors could mean: orientations, bias assignments, with or without a
master leaf, every activation, tree-major and node-major neuron layout. None of them is
trusted: each is confirmed by numbers (``confirm_module``) and the first that reproduces the
module is taken. This must not fire on layers whose shapes merely fit (a dense MLP of width
3 * 1024 fits form B with P = 1024, D = 1, hence D >= 2; a softmax MoE with 2^D experts fits
form A only if it also has 2^D - 1 routing rows): the confirmation is what decides.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ..spec import ACTIVATIONS, FFFSpec, is_power_of_two

_MIN_NEURON_TREE_DEPTH = 2


class Named:
    """A tensor of the module, or a stack of its siblings' tensors, materialised on first use."""

    def __init__(self, name: str, shape: tuple[int, ...], make):
        self.name, self.shape, self._make, self._tensor = name, tuple(shape), make, None

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = self._make()
        return self._tensor

    @property
    def dim(self) -> int:
        return len(self.shape)


def module_tensors(module: nn.Module) -> list[Named]:
    """Float parameters and buffers of ``module`` (recursively), in registration order, deduplicated,
    then the stacks of structurally identical siblings (``_sibling_stacks``); a tensor that is
    part of a stack is offered only as part of it."""
    stacks, stacked = _sibling_stacks(module)
    seen, out = set(stacked), []
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if t is None or not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        out.append(Named(name, t.shape, lambda t=t: t.detach()))
    return out + stacks


def _sibling_stacks(module: nn.Module) -> tuple[list[Named], set[int]]:
    """Containers whose children (two or more) have identical parameter shapes, read as stacked tensors.

    A ModuleList of N Linear(d, 1) routers reads as an (N, d) node matrix and an (N, 1) bias; a
    ModuleList of L leaf MLPs (Linear(d, l), act, Linear(l, d_out)) as (L, l, d), (L, l),
    (L, d_out, l), (L, d_out). Shapes only: a container of unrelated layers never stacks.
    """
    out, stacked = [], set()
    for container_name, container in module.named_modules():
        children = list(container.children())
        if len(children) < 2:
            continue
        params = [[p for p in child.parameters() if p.is_floating_point()] for child in children]
        shapes = [[tuple(p.shape) for p in ps] for ps in params]
        if not shapes[0] or any(s != shapes[0] for s in shapes[1:]):
            continue
        stacked.update(id(p) for ps in params for p in ps)
        for k, (param_name, _) in enumerate(p for p in children[0].named_parameters() if p[1].is_floating_point()):
            shape = (len(children), *shapes[0][k])
            squeeze = len(shape) == 3 and shape[1] == 1          # Linear(d, 1) weights: (N, 1, d) -> (N, d)
            make = lambda k=k, squeeze=squeeze, params=params: (lambda t: t[:, 0] if squeeze else t)(
                torch.stack([ps[k].detach() for ps in params]))
            prefix = f"{container_name}." if container_name else ""
            out.append(Named(f"{prefix}*.{param_name}", (shape[0], shape[2]) if squeeze else shape, make))
    return out, stacked


def _neuron_factorisations(k: int) -> Iterator[tuple[int, int]]:
    """(trees P, depth D) with P (2^(D+1) - 1) = k, D >= 2, deepest first."""
    for depth in range(24, _MIN_NEURON_TREE_DEPTH - 1, -1):
        n = 2 ** (depth + 1) - 1
        if n <= k and k % n == 0:
            yield k // n, depth


def looks_like_fff(module: nn.Module) -> Optional[str]:
    """A cheap shape test (no d_in known yet): 'leaf_mlp', 'neuron_tree' or None."""
    tensors = module_tensors(module)
    mats = [t.shape for t in tensors if t.dim == 2]
    cubes = [t.shape for t in tensors if t.dim == 3]
    for w in mats:
        if w[0] >= 1 and is_power_of_two(w[0] + 1) and any(c[0] == w[0] + 1 for c in cubes):
            return "leaf_mlp"
    for i, w_in in enumerate(cubes):
        n = w_in[1]
        if n >= 3 and is_power_of_two(n + 1) and any(j != i and c[:2] == w_in[:2] for j, c in enumerate(cubes)):
            return "neuron_tree"
    for i, w_in in enumerate(mats):
        k = w_in[0]
        if any(True for _ in _neuron_factorisations(k)) and any(
                j != i and k in w and min(w) >= 2 for j, w in enumerate(mats)):
            return "neuron_tree"
    return None


def _pick(tensors: list[Named], shapes: list[tuple[int, ...]], exclude=()) -> list[Named]:
    excluded = {id(e) for e in exclude if e is not None}
    return [t for t in tensors if tuple(t.shape) in shapes and id(t) not in excluded]


def interpretations(module: nn.Module, d_in: int, d_out: int) -> Iterator[tuple[FFFSpec, str]]:
    """Every spec the module's tensors could mean, with a short description of the reading."""
    tensors = module_tensors(module)
    yield from _leaf_mlp_readings(tensors, d_in, d_out)
    yield from _neuron_tree_readings(tensors, d_in, d_out)


def _leaf_mlp_readings(tensors: list[Named], d_in: int, d_out: int) -> Iterator[tuple[FFFSpec, str]]:
    for node_w in [t for t in tensors if t.dim == 2 and t.shape[1] == d_in]:
        n_nodes = node_w.shape[0]
        if not is_power_of_two(n_nodes + 1) or n_nodes < 1:
            continue
        leaves, depth = n_nodes + 1, (n_nodes + 1).bit_length() - 1
        node_biases = list(_node_bias_readings(_pick(tensors, [(n_nodes,), (n_nodes, 1)], [node_w]), n_nodes))
        firsts = [(t, False) for t in tensors if t.dim == 3 and t.shape[:2] == (leaves, d_in)]
        firsts += [(t, True) for t in tensors if t.dim == 3 and t.shape[0] == leaves
                   and t.shape[2] == d_in and t.shape[1] != d_in]
        for (w1, w1_t), (bias_used, node_bias, bias_reading) in itertools.product(firsts, node_biases):
            width = w1.shape[1] if w1_t else w1.shape[2]
            seconds = [(t, False) for t in _pick(tensors, [(leaves, width, d_out)], [w1])]
            seconds += [(t, True) for t in _pick(tensors, [(leaves, d_out, width)], [w1]) if width != d_out]
            options = seconds + ([(None, False)] if width == d_out else [])
            for w2, w2_t in options:
                used = [node_w, w1, w2, *bias_used]
                for b1 in _pick(tensors, [(leaves, width)], used) or [None]:
                    for b2 in [None] if w2 is None else (_pick(tensors, [(leaves, d_out)], used + [b1]) or [None]):
                        base = dict(node_weight=node_w.tensor, node_bias=node_bias(node_w.tensor),
                                    leaf_w1=w1.tensor.transpose(1, 2) if w1_t else w1.tensor,
                                    leaf_b1=_bias(b1, (leaves, width), node_w.tensor),
                                    leaf_w2=None if w2 is None else (w2.tensor.transpose(1, 2) if w2_t else w2.tensor),
                                    leaf_b2=None if w2 is None else _bias(b2, (leaves, d_out), node_w.tensor))
                        reading = (f"nodes {node_w.name}{bias_reading}, leaves {w1.name}"
                                   + (f"/{w2.name}" if w2 else " (linear)"))
                        masters = list(_master_readings(tensors, used + [b1, b2], d_in, d_out))
                        for master, master_reading in masters + [({}, "")]:
                            for act in ACTIVATIONS:
                                extra = dict(master, master_activation=act) if master else {}
                                spec = FFFSpec("leaf_mlp", depth, act, tie="ge", source="soft", **base, **extra)
                                yield spec, reading + master_reading


def _node_bias_readings(candidates: list[Named], n_nodes: int):
    """(tensors used, bias maker, reading) for the node bias: each candidate as a bias, then a
    bias minus a learned threshold (go right when z > t), then a threshold alone, then no bias."""
    flat = lambda t: t.tensor.reshape(n_nodes)
    for b in candidates:
        yield [b], lambda like, b=b: flat(b), f" + {b.name}"
    for b, t in itertools.permutations(candidates, 2):
        yield [b, t], lambda like, b=b, t=t: flat(b) - flat(t), f" + {b.name} - threshold {t.name}"
    for t in candidates:
        yield [t], lambda like, t=t: -flat(t), f" - threshold {t.name}"
    yield [], lambda like: like.new_zeros(n_nodes), ""


def _master_readings(tensors: list[Named], used: list, d_in: int, d_out: int):
    scalars = [t for t in _pick(tensors, [(), (1,)], used)]
    if not scalars:
        return
    for first in [t for t in tensors if t.dim == 2 and d_in in t.shape and t not in used]:
        transposed = first.shape[0] != d_in
        width = first.shape[0] if transposed else first.shape[1]
        w1 = first.tensor.T if transposed else first.tensor
        for second in _pick(tensors, [(width, d_out), (d_out, width)], used + [first]):
            w2 = second.tensor if tuple(second.shape) == (width, d_out) else second.tensor.T
            taken = used + [first, second]
            b1 = (_pick(tensors, [(width,)], taken) or [None])[0]
            b2 = (_pick(tensors, [(d_out,)], taken + [b1]) or [None])[0]
            for logit in scalars:
                yield (dict(master_w1=w1, master_b1=_bias(b1, (width,), w1), master_w2=w2,
                            master_b2=_bias(b2, (d_out,), w1), master_logit=logit.tensor.reshape(())),
                       f", master {first.name}/{second.name}, blend {logit.name}")


def _neuron_tree_readings(tensors: list[Named], d_in: int, d_out: int) -> Iterator[tuple[FFFSpec, str]]:
    yield from _stacked_neuron_tree_readings(tensors, d_in, d_out)
    for w_in in [t for t in tensors if t.dim == 2 and t.shape[1] == d_in]:
        k = w_in.shape[0]
        outs = [(t, t.tensor.T) for t in _pick(tensors, [(d_out, k)], [w_in])]
        outs += [(t, t.tensor) for t in _pick(tensors, [(k, d_out)], [w_in]) if d_out != k]
        for (w_out, out_value), (trees, depth) in itertools.product(outs, _neuron_factorisations(k)):
            n = 2 ** (depth + 1) - 1
            used = [w_in, w_out]
            b_in = (_pick(tensors, [(k,)], used) or [None])[0]
            b_out = (_pick(tensors, [(d_out,)], used + [b_in]) or [None])[0]
            layouts = [("tree-major", lambda t, last: t.reshape(trees, n, *last))]
            if trees > 1:
                layouts.append(("node-major", lambda t, last: t.reshape(n, trees, *last).transpose(0, 1)))
            for layout, arrange in layouts:
                for act in ACTIVATIONS:
                    spec = FFFSpec("neuron_tree", depth, act,
                                   node_weight=arrange(w_in.tensor, (d_in,)),
                                   node_bias=arrange(_bias(b_in, (k,), w_in.tensor), ()),
                                   out_weight=arrange(out_value, (d_out,)),
                                   out_bias=_bias(b_out, (d_out,), w_in.tensor),
                                   tie="gt", source="hard")
                    yield spec, f"neurons {w_in.name} -> {w_out.name}, {trees} x depth {depth}, {layout}"


def _stacked_neuron_tree_readings(tensors: list[Named], d_in: int, d_out: int) -> Iterator[tuple[FFFSpec, str]]:
    for w_in in [t for t in tensors if t.dim == 3 and t.shape[2] == d_in]:
        trees, n = w_in.shape[:2]
        if n < 3 or not is_power_of_two(n + 1):
            continue
        depth = (n + 1).bit_length() - 2
        for w_out in _pick(tensors, [(trees, n, d_out)], [w_in]):
            used = [w_in, w_out]
            b_in = (_pick(tensors, [(trees, n)], used) or [None])[0]
            b_out = (_pick(tensors, [(d_out,)], used + [b_in]) or [None])[0]
            for act in ACTIVATIONS:
                spec = FFFSpec("neuron_tree", depth, act, node_weight=w_in.tensor,
                               node_bias=_bias(b_in, (trees, n), w_in.tensor), out_weight=w_out.tensor,
                               out_bias=_bias(b_out, (d_out,), w_in.tensor), tie="gt", source="hard")
                yield spec, f"neurons {w_in.name} -> {w_out.name}, {trees} x depth {depth}"


def _bias(named: Optional[Named], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if named is None:
        return like.new_zeros(shape)
    return named.tensor.reshape(shape)
