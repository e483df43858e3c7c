"""A candidate cut out of the captured graph as its own small program: x -> y.

The cut-out holds the nodes y needs, back to x (not past it), in topological order:
- nodes reached from x: run per call;
- constants (parameters, buffers and whatever is computed from them alone): evaluated once
  and cached per graph (``ConstantCache``), so many candidates share one evaluation;
- sizes read from other graph inputs (``sym_size`` of the model input in a reshape): read
  from the symbolic shape of x, so the cut-out runs on probe batches of any size;
- any other tensor it reads from outside: the candidate is refused (it is not a function of x).

``run(x, overrides=..., harden=...)`` evaluates it with chosen node values replaced
(``overrides``: node -> tensor) and chosen sigmoid-like decisions hardened (s(z) -> [z >= 0]
or [z > 0], log s(z) -> 0 or -1e4 (finite: a path sum written as a matmul with a 0/1 matrix
must not meet 0 * -inf), per the tie rule), in float64 on request (constants cast,
float32 factory defaults switched) so that extracted weights are exact to float32 rounding.
No module is copied and no graph is built: a cut-out costs its node count per call.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import sympy
import torch
from torch import fx

from .graph_canonical import GraphFacts, hint_shape, meta_val

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class NotAFunctionOfX(Exception):
    pass


class ConstantCache:
    """Values of the graph's constant nodes, evaluated on demand and kept."""

    def __init__(self, facts: GraphFacts):
        self.facts, self.values, self.doubles = facts, {}, {}

    def get(self, node: fx.Node, double: bool):
        if node not in self.values:
            for n in sorted(self.facts.ancestors([node]), key=self.facts.index.__getitem__):
                if n not in self.values:
                    self.values[n] = _execute(self.facts.gm, n, lambda a: self.values[a])
        value = self.values[node]
        if not double:
            return value
        if node not in self.doubles:
            self.doubles[node] = value.double() if isinstance(value, torch.Tensor) and value.dtype in _FLOATS else value
        return self.doubles[node]


def _map(args, lookup):
    return fx.node.map_arg(args, lookup)


def _execute(gm: fx.GraphModule, n: fx.Node, lookup: Callable, double: bool = False):
    if n.op == "get_attr":
        value = gm
        for part in n.target.split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, torch.Tensor) else value
    args, kwargs = _map(n.args, lookup), _map(n.kwargs, lookup)
    if double and kwargs.get("dtype") in _FLOATS:
        kwargs = {**kwargs, "dtype": torch.float64}
    if n.op == "call_function":
        if n.target is torch.ops.aten.dropout.default:
            return args[0]       # training-only noise: the hardened (inference) form has none
        if n.target is torch.ops.aten.native_dropout.default:
            return args[0], torch.ones_like(args[0], dtype=torch.bool)
        if n.target is torch.ops.aten.copy.default and not kwargs:
            # functional copy(self, src): src broadcast to self's shape and dtype. The kernel clones self
            # with its strides first, which for a view of a large buffer allocates the whole buffer.
            self_, src = args[0], args[1]
            return src.to(dtype=self_.dtype, device=self_.device).expand(self_.shape).contiguous()
        if n.target is torch.ops.aten.view.default:
            try:
                return n.target(*args, **kwargs)
            except RuntimeError:   # an overridden value is laid out contiguously where the graph's had other strides
                return torch.ops.aten.reshape.default(*args, **kwargs)
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        module = gm.get_submodule(n.target)
        if double:
            state = {k: v.double() if v.dtype in _FLOATS else v for k, v in module.state_dict(keep_vars=True).items()}
            return torch.func.functional_call(module, state, tuple(args), kwargs)
        return module(*args, **kwargs)
    raise NotAFunctionOfX(f"cannot evaluate a {n.op} node on its own")


def _full_range(n: fx.Node, first: int) -> bool:
    """slice(t, dim, start, end, step) / slice_scatter(t, src, dim, ...) over the whole dim."""
    args = list(n.args) + [None] * 6
    start, end, step = args[first + 1], args[first + 2], args[first + 3]
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2 ** 31)) and step in (None, 1)


def hard_step(z: torch.Tensor, tie: str) -> torch.Tensor:
    return ((z >= 0) if tie == "ge" else (z > 0)).to(z.dtype)


LOG_ZERO = -1.0e4   # a hardened log-sigmoid: log s(z) for |z| -> inf is 0 or -|z|; exp(-1e4) = 0 and 0 * -1e4 = 0


def hard_log(step: torch.Tensor) -> torch.Tensor:
    """log of a 0/1 step, with log 0 taken as -1e4 (finite, so that path sums through 0/1 matrices stay exact)."""
    return (1 - step) * LOG_ZERO


def harden_value(name: str, z: torch.Tensor, tie: str) -> torch.Tensor:
    """A soft decision op hardened: s(z) -> [z >= 0]; log s(z) -> log [z >= 0];
    softplus(z) = -log s(-z) -> -log (1 - [z >= 0])."""
    step = hard_step(z, tie)
    if name in ("log_sigmoid", "logsigmoid"):
        return hard_log(step)
    if name == "softplus":
        return -hard_log(1 - step)
    return step


def _exprs(node: fx.Node) -> Optional[tuple]:
    """The node's shape as sympy expressions (ints as sympy integers); None without a recorded shape."""
    val = meta_val(node)
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)) for d in val.shape)


def _row_symbols(x: fx.Node) -> set:
    """The symbols in x's leading (row) dims; empty for a static capture."""
    x_shape = _exprs(x)
    if x_shape is None or len(x_shape) < 2:
        return set()
    return set().union(*(d.free_symbols for d in x_shape[:-1]))


def _symbolic_layout(node: fx.Node, x: fx.Node):
    """``Cutout.layout`` read off symbolic sizes: only when x's leading dims carry a symbol and the
    node's dims that carry it are exactly x's leading dims or one dim of size prod(x's leading dims)."""
    shape, x_shape = _exprs(node), _exprs(x)
    if shape is None or x_shape is None or len(x_shape) < 2:
        return None
    lead = x_shape[:-1]
    symbols = _row_symbols(x)
    if not symbols:
        return None
    carrying = [a for a, d in enumerate(shape) if d.free_symbols & symbols]
    if len(shape) >= len(lead) and shape[:len(lead)] == lead \
            and all(a < len(lead) for a in carrying):
        return ("lead", len(lead)), hint_shape(node)[len(lead):]
    rows = sympy.expand(sympy.Mul(*lead))
    axes = [a for a in carrying if sympy.expand(shape[a]) == rows]
    if len(axes) == 1 and carrying == axes:
        a = axes[0]
        hints = hint_shape(node)
        return ("axis", a), hints[:a] + hints[a + 1:]
    return None


class Cutout:
    def __init__(self, facts: GraphFacts, constants: ConstantCache, x: fx.Node, y: fx.Node):
        self.facts, self.constants, self.x, self.y = facts, constants, x, y
        from_x = facts.descendants([x])
        needed, stack = set(), [y]
        self.constant_nodes, self.sizes = set(), {}
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n is x:
                continue
            if n not in from_x:
                val = meta_val(n)
                if not facts.touches_input[n]:
                    self.constant_nodes.add(n)
                    continue
                if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
                    self.sizes[n] = val
                    continue
                if not facts.depends[n]:          # a factory sized by another input: run per call
                    from_x.add(n)
                    stack.extend(n.all_input_nodes)
                    continue
                raise NotAFunctionOfX(f"the subgraph reads {n.name} ({facts.name[n]}), which does not come from its input")
            stack.extend(n.all_input_nodes)
        self.nodes = sorted((n for n in needed if n in from_x and n is not x), key=facts.index.__getitem__)
        x_val = meta_val(x)
        self.x_shape = tuple(x_val.shape) if isinstance(x_val, torch.Tensor) else None
        # functionalised in-place writes (out[:, i].copy_(v) -> slice_scatter(T, select_scatter(slice(T), ...)))
        # cost a full copy per write; full-range slices and slice_scatters are read as aliases so that
        # the select_scatter can be done in place when nothing else still reads its base (linear time)
        self.alias = {}
        for n in self.nodes:
            name = facts.name[n]
            if name in ("slice", "slice_scatter") and n.op == "call_function" and _full_range(n, 2 if name == "slice_scatter" else 1):
                target = n.args[1] if name == "slice_scatter" else n.args[0]
                if isinstance(target, fx.Node) and hint_shape(target) == hint_shape(n) and hint_shape(n) is not None:
                    self.alias[n] = target
        self.inputs = {n: [self.alias[n]] if n in self.alias else n.all_input_nodes for n in self.nodes}
        self.last_use = {}
        for i, n in enumerate(self.nodes):
            for a in self.inputs[n]:
                self.last_use[a] = i

    def _needed(self, want: tuple, overridden: frozenset) -> set:
        """The cut-out nodes the wanted values read, not walking past overridden nodes (memoised)."""
        key = (want, overridden)
        cache = self.__dict__.setdefault("_needed_cache", {})
        if key not in cache:
            inside = set(self.nodes)
            seen, stack = set(), [w for w in want]
            while stack:
                n = stack.pop()
                if n in seen or n not in inside:
                    continue
                seen.add(n)
                if n not in overridden:
                    stack.extend(self.inputs[n])
            cache[key] = seen
        return cache[key]

    def _constant_storage(self, double: bool) -> set:
        """Storage addresses of the constants the cut-out reads (never written in place), once per mode."""
        cache = self.__dict__.setdefault("_constant_ptrs", {})
        if double not in cache:
            cache[double] = {v.untyped_storage().data_ptr()
                             for v in (self.constants.get(c, double) for c in self.constant_nodes)
                             if isinstance(v, torch.Tensor)}
        return cache[double]

    def _reinplaceable(self, n, i, env, protected) -> bool:
        """select_scatter(base, src, dim, index) may write into base: this is base's last reader, base's
        storage is not the input's, an override's or a constant's, and no value still live shares it."""
        base_node = n.args[0]
        if len(n.args) < 4 or not isinstance(base_node, fx.Node) or base_node not in env \
                or self.last_use.get(base_node) != i:
            return False
        base = env[base_node]
        if not isinstance(base, torch.Tensor):
            return False
        ptr = base.untyped_storage().data_ptr()
        if ptr in protected:
            return False
        for k, v in env.items():
            if k is base_node or not isinstance(v, torch.Tensor) or v.untyped_storage().data_ptr() != ptr:
                continue
            if k in self.inputs[n] and self.last_use.get(k) == i and k is not self.x:
                continue          # dies here
            return False
        return True

    # ------------------------------------------------------------------ shapes
    def probe_shape(self, rows: int) -> tuple[int, ...]:
        """A shape for ``rows`` probe rows: x's shape with its first dim scaled (when it is symbolic)."""
        shape = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in self.x_shape]
        if not self.batch_symbolic():
            return tuple(shape)      # a static capture runs on probe batches of the example's shape only
        if len(shape) == 1:
            return (rows,) if rows else tuple(shape)
        per = math.prod(shape[1:-1]) or 1
        shape[0] = max(1, -(-rows // per))
        return tuple(shape)

    def batch_symbolic(self) -> bool:
        return self.x_shape is not None and len(self.x_shape) >= 2 and isinstance(self.x_shape[0], torch.SymInt) \
            and isinstance(self.x_shape[0].node.expr, sympy.Symbol)

    def _size_values(self, shape) -> dict:
        bindings = {}
        for d, v in zip(self.x_shape, shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                bindings[d.node.expr] = v
        out = {}
        for n, val in self.sizes.items():
            if isinstance(val, int):
                out[n] = val
                continue
            expr = val.node.expr
            expr = expr.xreplace(bindings) if isinstance(expr, sympy.Basic) else expr
            if isinstance(expr, sympy.Basic) and expr.free_symbols:
                raise NotAFunctionOfX(f"the subgraph reads the size {n.name} that x's shape does not determine")
            out[n] = int(expr)
        return out

    # ------------------------------------------------------------------ running
    def run(self, x: torch.Tensor, overrides: Optional[dict] = None, harden: Optional[dict] = None,
            double: bool = False, want: Optional[list] = None, grad: bool = False):
        """y for input x (or the values of the ``want`` nodes); ``overrides``: node -> value;
        ``harden``: decision node -> tie ("ge"/"gt"); ``grad``: record autograd (for reading
        coefficients by one backward pass instead of one probe row each)."""
        overrides, harden = overrides or {}, harden or {}
        want = [self.y] if want is None else list(want)
        keep = set(want)
        pending = {n for n in want if n is not self.x}
        env = {self.x: x}
        env.update(self._size_values(tuple(x.shape)))
        constants, double_mode = self.constants, double

        def lookup(a):
            if a in env:
                return env[a]
            return constants.get(a, double_mode)

        protected = {t.untyped_storage().data_ptr() for t in [x, *overrides.values()] if isinstance(t, torch.Tensor)}
        protected |= self._constant_storage(double)
        saved = torch.get_default_dtype()
        if double:
            torch.set_default_dtype(torch.float64)
        try:
            with (torch.enable_grad() if grad else torch.no_grad()):
                needed = self._needed(tuple(want), frozenset(overrides))
                for i, n in enumerate(self.nodes):
                    if not pending:
                        break
                    if n not in needed:
                        continue
                    if n in overrides:
                        env[n] = overrides[n]
                    elif n in self.alias:
                        env[n] = lookup(self.alias[n])
                    elif self.facts.name[n] == "select_scatter" and self._reinplaceable(n, i, env, protected):
                        base = env[n.args[0]]
                        base.select(n.args[2], n.args[3]).copy_(lookup(n.args[1]))
                        env[n] = base
                    elif n in harden:
                        z = lookup(n.args[0])
                        step = hard_step(z, harden[n])
                        env[n] = harden_value(self.facts.name[n], z, harden[n])
                    else:
                        env[n] = _execute(self.facts.gm, n, lookup, double)
                    pending.discard(n)
                    for a in self.inputs[n]:
                        if self.last_use.get(a) == i and a is not self.x and a not in self.sizes and a in env \
                                and a not in keep:
                            del env[a]
                return [env[n] for n in want]
        finally:
            torch.set_default_dtype(saved)

    def layout(self, node: fx.Node):
        """How a node holds x's rows: ("lead", k) (x's k leading dims first), ("axis", a) (the rows
        flattened into dim a), with the per-row feature shape; None when it does not hold them.

        When x's batch is symbolic, the rows are the dims whose symbolic size is x's row count
        (so a feature dim that happens to equal the example's batch, e.g. batch 4 and leaf width
        4, is not taken for the rows). A static capture has only the example's sizes: when more than
        one dim has the row count, a probe (``_probe_rows``) tells which one holds the rows."""
        shape, x_shape = hint_shape(node), hint_shape(self.x)
        if shape is None or x_shape is None:
            return None
        if _row_symbols(self.x):
            return _symbolic_layout(node, self.x)
        lead = x_shape[:-1]
        rows = math.prod(lead)
        found = []
        if len(shape) >= len(lead) and shape[:len(lead)] == lead:
            found.append(("lead", len(lead)))
        found += [("axis", a) for a, d in enumerate(shape) if d == rows and not (a == 0 and found and len(lead) == 1)]
        if len(found) > 1:
            probed = self._probe_rows(node, found)
            found = [probed] if probed else []
        if len(found) != 1:
            return None
        mode, k = found[0]
        if mode == "lead":
            return (mode, k), shape[k:]
        return (mode, k), shape[:k] + shape[k + 1:]

    def _probe_rows(self, node: fx.Node, found: list):
        """Which of several dims of size rows holds the rows (a static capture whose batch equals a
        feature size): the one along which changing one row of x changes only that row's slice."""
        cache = self.__dict__.setdefault("_rows_probe", {})
        if node not in cache:
            cache[node] = None
            x_shape = hint_shape(self.x)
            rows = math.prod(x_shape[:-1])
            g = torch.Generator().manual_seed(0)
            x0 = torch.randn(*x_shape, generator=g, dtype=torch.float64)
            x1 = x0.clone()
            r = rows - 1
            x1.reshape(-1, x_shape[-1])[r] += 10 * torch.randn(x_shape[-1], generator=g, dtype=torch.float64)
            try:
                v0, v1 = (self.run(x, want=[node], double=True)[0] for x in (x0, x1))
            except Exception:       # a graph the probe cannot run: no layout, as without the probe
                return None
            if not isinstance(v0, torch.Tensor) or v0.shape != v1.shape:
                return None
            diff = v0 != v1
            hits = []
            for mode, k in found:
                moved = (diff if mode == "lead" else diff.movedim(k, 0)).reshape(rows, -1)
                if bool(moved[r].any()) and not bool(moved[:r].any()):
                    hits.append((mode, k))
            cache[node] = hits[0] if len(hits) == 1 else None
        return cache[node]

    def features(self, node: fx.Node) -> Optional[tuple[int, ...]]:
        found = self.layout(node)
        return None if found is None else found[1]

    def _laid_out(self, node, values: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        (mode, k), feats = self.layout(node)
        if mode == "lead" and k == len(lead):
            return values.reshape(*lead, *feats)
        return values.reshape(math.prod(lead), *feats).movedim(0, k if mode == "axis" else 0)

    def _read(self, node, value: torch.Tensor, total: int) -> torch.Tensor:
        found = self.layout(node)
        if found is not None and found[0][0] == "axis":
            value = value.movedim(found[0][1], 0)
        return value.reshape(total, -1)

    def run_rows(self, X: torch.Tensor, overrides: Optional[dict] = None, chunk: int = 1024,
                 want: Optional[list] = None, **kwargs):
        """Run on rows X (R, d_in), chunked; ``overrides``: node -> per-row values (R, ...).
        Returns y per row (R, features of y) flattened, or a list of such for the ``want`` nodes."""
        overrides = overrides or {}
        nodes = [self.y] if want is None else list(want)
        if not self.batch_symbolic():
            chunk = max(1, math.prod(self.probe_shape(1)[:-1]))
        outs = []
        for start in range(0, X.shape[0], chunk):
            rows = X[start:start + chunk]
            R = rows.shape[0]
            shape = self.probe_shape(R)
            total = math.prod(shape[:-1])

            def pad(t):
                return t if total == R else torch.cat([t, t[:1].expand(total - R, *t.shape[1:])])

            x = pad(rows).reshape(shape)
            local = {n: self._laid_out(n, pad(v[start:start + chunk]), shape[:-1]) for n, v in overrides.items()}
            values = self.run(x, overrides=local, want=nodes, **kwargs)
            outs.append([self._read(n, v, total)[:R] for n, v in zip(nodes, values)])
        result = [torch.cat([o[i] for o in outs]) for i in range(len(nodes))]
        return result[0] if want is None else result
