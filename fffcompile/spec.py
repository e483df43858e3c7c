"""FFFSpec: the one description of a Fast FeedForward layer that frontends extract and backends run.

Notation follows ../shared/FORMS.md. Nodes are in heap order (root 0, children 2n+1 left and
2n+2 right); leaf j is reached by the path whose bits, most significant first, spell j
(1 = right).

Form A, ``form="leaf_mlp"`` (one tree of depth D, 2^D - 1 routing nodes, 2^D leaves):

    z_n = node_weight[n] . x + node_bias[n]
    descend n = 0, D times: n = 2n + 1 + [z_n >= 0]  (tie "ge")  or  [z_n > 0]  (tie "gt")
    j = n - (2^D - 1)
    y = act(x @ leaf_w1[j] + leaf_b1[j]) @ leaf_w2[j] + leaf_b2[j]

  With ``leaf_w2 is None`` the leaves are single linear layers: y = act(x @ leaf_w1[j] + leaf_b1[j])
  (act is then usually "identity"). Form C adds a master leaf blended with a learned logit k:

    y = s(k) * tree(x) + (1 - s(k)) * (master_act(x @ master_w1 + master_b1) @ master_w2 + master_b2)

Form B, ``form="neuron_tree"`` (P trees of depth D, each with 2^(D+1) - 1 neurons, tree-major):

    a_{p,n} = node_weight[p, n] . x + node_bias[p, n]
    per tree: n_0 = 0, n_{k+1} = 2 n_k + 1 + [a_{p,n_k} > 0], D + 1 neurons visited
    y = sum_p sum_{n on path p} act(a_{p,n}) * out_weight[p, n] + out_bias

``source`` says what the original graph computes: "soft" (path probabilities mixing every leaf;
the rewrite is exact only against the graph with hardened decisions) or "hard" (the graph
already descends; the rewrite must match it to float tolerance). A learned per-node threshold t
(go right when z_n > t_n) is folded into the bias at extraction: node_bias = b - t.

Absent biases are stored as zeros so that every backend sees one signature; a missing output
projection (linear leaves) is the only optional piece of the op.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InvalidSpecError

FORMS = ("leaf_mlp", "neuron_tree")
TIES = ("ge", "gt")
SOURCES = ("soft", "hard")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "relu2", "identity")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_FORM_LETTER = {"leaf_mlp": "A", "neuron_tree": "B"}


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True, eq=False)
class FFFSpec:
    """A frozen, self-validating FFF layer: form, depth, activation, tie rule, weights in heap order.

    Shapes (P trees, D depth, L = 2^D leaves, N = 2^D - 1 routing nodes, n = 2^(D+1) - 1 neurons):

    =============  =========================  ==========================
    field          leaf_mlp (form A / C)      neuron_tree (form B)
    =============  =========================  ==========================
    node_weight    (N, d_in)                  (P, n, d_in)
    node_bias      (N,)                       (P, n)
    leaf_w1        (L, d_in, l)               None
    leaf_b1        (L, l)                     None
    leaf_w2        (L, l, d_out) or None      None
    leaf_b2        (L, d_out) or None         None
    out_weight     None                       (P, n, d_out)
    out_bias       None                       (d_out,)
    master_*       optional, form C only      None
    =============  =========================  ==========================
    """

    form: str
    depth: int
    activation: str
    node_weight: torch.Tensor
    node_bias: torch.Tensor
    leaf_w1: Optional[torch.Tensor] = None
    leaf_b1: Optional[torch.Tensor] = None
    leaf_w2: Optional[torch.Tensor] = None
    leaf_b2: Optional[torch.Tensor] = None
    out_weight: Optional[torch.Tensor] = None
    out_bias: Optional[torch.Tensor] = None
    master_w1: Optional[torch.Tensor] = None
    master_b1: Optional[torch.Tensor] = None
    master_w2: Optional[torch.Tensor] = None
    master_b2: Optional[torch.Tensor] = None
    master_logit: Optional[torch.Tensor] = None
    master_activation: Optional[str] = None
    tie: str = "ge"
    source: str = "soft"

    def __post_init__(self):
        self._validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def form_letter(self) -> str:
        """'A', 'B' or 'C' (form A with a master leaf), as FORMS.md names them."""
        if self.form == "leaf_mlp" and self.has_master:
            return "C"
        return _FORM_LETTER[self.form]

    @property
    def trees(self) -> int:
        return 1 if self.form == "leaf_mlp" else self.node_weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.node_weight.shape[-1]

    @property
    def d_out(self) -> int:
        if self.form == "neuron_tree":
            return self.out_weight.shape[-1]
        return (self.leaf_w2 if self.leaf_w2 is not None else self.leaf_w1).shape[-1]

    @property
    def leaf_width(self) -> int:
        """Hidden width l of each leaf MLP (form A); 1 for a neuron tree."""
        return self.leaf_w1.shape[-1] if self.form == "leaf_mlp" else 1

    @property
    def n_leaves(self) -> int:
        return 2 ** self.depth

    @property
    def nodes_per_tree(self) -> int:
        """Routing nodes (form A: 2^D - 1) or neurons (form B: 2^(D+1) - 1) of one tree."""
        return 2 ** self.depth - 1 if self.form == "leaf_mlp" else 2 ** (self.depth + 1) - 1

    @property
    def has_master(self) -> bool:
        return self.master_w1 is not None

    @property
    def linear_leaves(self) -> bool:
        return self.form == "leaf_mlp" and self.leaf_w2 is None

    @property
    def dtype(self) -> torch.dtype:
        return self.node_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.node_weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every weight tensor of the spec by field name (absent ones left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    # ----------------------------------------------------------------- cost model
    def hard_macs(self) -> int:
        """Multiply-accumulates per row of the hardened descent (DESIGN.md, 'What fast means')."""
        if self.form == "neuron_tree":
            return self.trees * (self.depth + 1) * (self.d_in + self.d_out)
        leaf = self.d_in * self.leaf_width + (self.leaf_width * self.d_out if self.leaf_w2 is not None else 0)
        return self.depth * self.d_in + leaf + self._master_macs()

    def soft_macs(self) -> int:
        """Multiply-accumulates per row of the training (soft) form of the same layer."""
        if self.form == "neuron_tree":
            return self.trees * self.nodes_per_tree * (self.d_in + self.d_out)
        leaf = self.d_in * self.leaf_width + (self.leaf_width * self.d_out if self.leaf_w2 is not None else 0)
        return (2 ** self.depth - 1) * self.d_in + self.n_leaves * leaf + self._master_macs()

    def _master_macs(self) -> int:
        if not self.has_master:
            return 0
        return self.master_w1.shape[0] * self.master_w1.shape[1] + self.master_w2.shape[0] * self.master_w2.shape[1]

    # ----------------------------------------------------------------- transforms
    def replace(self, **changes) -> "FFFSpec":
        return dataclasses.replace(self, **changes)

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "FFFSpec":
        """The same spec with every tensor moved to ``dtype`` / ``device``."""
        return self.replace(**{k: v.to(dtype=dtype, device=device) for k, v in self.tensors().items()})

    def detached(self) -> "FFFSpec":
        return self.replace(**{k: v.detach() for k, v in self.tensors().items()})

    def without_master(self) -> "FFFSpec":
        return self.replace(master_w1=None, master_b1=None, master_w2=None, master_b2=None,
                            master_logit=None, master_activation=None)

    def describe(self) -> str:
        """One line: 'form A, depth 8, 1 tree, 768->768, leaf 16, relu, tie >=, soft'."""
        parts = [f"form {self.form_letter}", f"depth {self.depth}",
                 f"{self.trees} tree{'s' if self.trees != 1 else ''}", f"{self.d_in}->{self.d_out}"]
        if self.form == "leaf_mlp":
            parts.append("linear leaves" if self.linear_leaves else f"leaf {self.leaf_width}")
        if self.has_master:
            parts.append(f"master {self.master_w1.shape[1]}")
        parts += [self.activation, "tie >=" if self.tie == "ge" else "tie >", self.source, str(self.dtype).replace("torch.", "")]
        return ", ".join(parts)

    def same_as(self, other: "FFFSpec", atol: float = 1e-6, rtol: float = 1e-5) -> bool:
        """Structural and numerical equality (the property 'extract == spec' uses this)."""
        scalars = ("form", "depth", "activation", "tie", "master_activation")
        if any(getattr(self, s) != getattr(other, s) for s in scalars):
            return False
        mine, theirs = self.tensors(), other.tensors()
        if mine.keys() != theirs.keys():
            return False
        return all(a.shape == theirs[k].shape and torch.allclose(a.double(), theirs[k].double(), atol=atol, rtol=rtol)
                   for k, a in mine.items())

    # ----------------------------------------------------------------- validation
    def _validate(self):
        def fail(field, why):
            raise InvalidSpecError(f"FFFSpec.{field}: {why}")

        if self.form not in FORMS:
            fail("form", f"{self.form!r} is not one of {FORMS}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            fail("depth", f"must be a non-negative int, got {self.depth!r}")
        if self.depth > 24:
            fail("depth", f"{self.depth} is beyond any trainable tree (max 24)")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"{self.activation!r} is not one of {ACTIVATIONS}")
        if self.tie not in TIES:
            fail("tie", f"{self.tie!r} is not one of {TIES} (go right when z >= 0 / z > 0)")
        if self.source not in SOURCES:
            fail("source", f"{self.source!r} is not one of {SOURCES}")
        tensors = self.tensors()
        for name, t in tensors.items():
            if t.dtype not in DTYPES:
                fail(name, f"dtype {t.dtype} is not supported (float32, float64, bfloat16, float16)")
            if t.dtype != self.node_weight.dtype:
                fail(name, f"dtype {t.dtype} differs from node_weight's {self.node_weight.dtype}; all weights share one dtype")
            if t.device != self.node_weight.device:
                fail(name, f"is on {t.device}, node_weight on {self.node_weight.device}")

        def shape(name, expected):
            t = getattr(self, name)
            if t is None:
                fail(name, f"is required for form {self.form!r} (expected shape {tuple(expected)})")
            if tuple(t.shape) != tuple(expected):
                fail(name, f"has shape {tuple(t.shape)}, expected {tuple(expected)}")

        def absent(*names):
            for name in names:
                if getattr(self, name) is not None:
                    fail(name, f"must be None for form {self.form!r}")

        if self.node_weight.dim() != (2 if self.form == "leaf_mlp" else 3):
            fail("node_weight", f"has {self.node_weight.dim()} dims; form {self.form!r} expects "
                 + ("(2^D - 1, d_in)" if self.form == "leaf_mlp" else "(P, 2^(D+1) - 1, d_in)"))
        d_in = self.node_weight.shape[-1]
        if d_in < 1:
            fail("node_weight", "input width d_in must be at least 1")
        if self.form == "leaf_mlp":
            n_nodes, n_leaves = 2 ** self.depth - 1, 2 ** self.depth
            if self.node_weight.shape[0] != n_nodes:
                fail("node_weight", f"has {self.node_weight.shape[0]} rows; depth {self.depth} needs 2^D - 1 = {n_nodes}"
                     + ("" if is_power_of_two(self.node_weight.shape[0] + 1) else " (and its row count + 1 is not a power of two)"))
            shape("node_bias", (n_nodes,))
            if self.leaf_w1 is None or self.leaf_w1.dim() != 3:
                fail("leaf_w1", f"must be a (2^D, d_in, l) tensor, got {None if self.leaf_w1 is None else tuple(self.leaf_w1.shape)}")
            width = self.leaf_w1.shape[2]
            shape("leaf_w1", (n_leaves, d_in, width))
            shape("leaf_b1", (n_leaves, width))
            if self.leaf_w2 is not None:
                if self.leaf_w2.dim() != 3:
                    fail("leaf_w2", f"must be a (2^D, l, d_out) tensor, got {tuple(self.leaf_w2.shape)}")
                shape("leaf_w2", (n_leaves, width, self.leaf_w2.shape[2]))
                shape("leaf_b2", (n_leaves, self.leaf_w2.shape[2]))
            else:
                absent("leaf_b2")
            absent("out_weight", "out_bias")
            self._validate_master(d_in, fail, shape)
        else:
            trees, n = self.node_weight.shape[0], 2 ** (self.depth + 1) - 1
            if trees < 1:
                fail("node_weight", "needs at least one tree")
            if self.node_weight.shape[1] != n:
                fail("node_weight", f"has {self.node_weight.shape[1]} neurons per tree; depth {self.depth} needs 2^(D+1) - 1 = {n}")
            shape("node_bias", (trees, n))
            if self.out_weight is None or self.out_weight.dim() != 3:
                fail("out_weight", "must be a (P, 2^(D+1) - 1, d_out) tensor")
            shape("out_weight", (trees, n, self.out_weight.shape[2]))
            shape("out_bias", (self.out_weight.shape[2],))
            absent("leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "master_w1", "master_b1", "master_w2",
                   "master_b2", "master_logit")

    def _validate_master(self, d_in, fail, shape):
        parts = ("master_w1", "master_b1", "master_w2", "master_b2", "master_logit")
        present = [p for p in parts if getattr(self, p) is not None]
        if not present:
            if self.master_activation is not None:
                fail("master_activation", "is set but there is no master leaf")
            return
        if len(present) != len(parts):
            missing = sorted(set(parts) - set(present))
            fail(missing[0], "the master leaf needs all of " + ", ".join(parts))
        if self.master_w1.dim() != 2 or self.master_w2.dim() != 2:
            fail("master_w1", "master weights must be matrices (d_in, m) and (m, d_out)")
        m = self.master_w1.shape[1]
        shape("master_w1", (d_in, m))
        shape("master_b1", (m,))
        shape("master_w2", (m, self.d_out))
        shape("master_b2", (self.d_out,))
        if self.master_logit.numel() != 1:
            fail("master_logit", f"must be a scalar, got shape {tuple(self.master_logit.shape)}")
        if self.master_activation not in ACTIVATIONS:
            fail("master_activation", f"{self.master_activation!r} is not one of {ACTIVATIONS}")


def depth_for_leaves(n_leaves: int) -> Optional[int]:
    """D such that 2^D == n_leaves, or None."""
    return int(math.log2(n_leaves)) if is_power_of_two(n_leaves) else None
