"""The reduced-precision weight copy: float32 x with bfloat16 weights in the C++ kernel, the handle
(``cpu_kernel.prepare(..., weights="bf16")``), ``FusedFFF(weights="bf16")`` and
``optimize(..., weights="bf16")``.

Oracle: ``reference.hard`` of the spec whose tree weights are rounded to bfloat16 and back to
float32 (``cpu_kernel.round_weight``); the kernel accumulates in float32, so it must equal that to
float32 rounding (near-tie rows excluded, as everywhere). Random specs of both forms, batch 0, 1
and large (per-row and subtree-blocked paths), exact ties, the one error for any other dtype pair,
the handle following in-place weight updates, the fallback (no kernel) giving the same numbers, and
optimize's report stating the bf16 error against the hardened original.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import fffcompile
from fffcompile import ops, reference
from fffcompile.compare import compare
from fffcompile.runtime import FusedFFF, cpu_kernel
import kernel_builds
from kernel_builds import isas
from specs import batch_shapes, make_spec, random_input, specs
from threads import num_threads

TREE = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2", "out_weight", "out_bias")


def rounded(spec):
    """The spec's tree weights rounded to bfloat16 and back (the exact oracle's weights)."""
    return spec.replace(**{n: cpu_kernel.round_weight(getattr(spec, n), "bf16") for n in TREE if getattr(spec, n) is not None})


@pytest.fixture(scope="module", params=kernel_builds.BUILDS)
def ext(request):
    """The kernel build under test (kernel_builds): native, then the emulated AVX-512 path."""
    if request.param == "native" and cpu_kernel.load() is None:
        pytest.skip(f"the CPU kernel is unavailable here ({cpu_kernel.failure()})")
    return kernel_builds.load(request.param)


@pytest.fixture(scope="module")
def native():
    if cpu_kernel.load() is None:
        pytest.skip(f"the CPU kernel is unavailable here ({cpu_kernel.failure()})")
    return cpu_kernel.load()


def run_bf16(ext, spec, x, isa):
    args = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a for a in ops.op_arguments(spec)[:-2]]
    fn = ext.leaf_mlp_tree if spec.form == "leaf_mlp" else ext.neuron_tree
    return fn(x, *args, cpu_kernel.ACTIVATION_CODES[spec.activation], spec.tie == "ge", cpu_kernel.ISAS[isa])


def assert_equals_rounded_reference(out, spec, x):
    oracle = rounded(spec)
    expected = reference.hard(oracle, x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    result = compare(out, expected, exclude=reference.near_ties(oracle, x))
    assert result, result.summary()


@settings(max_examples=25)
@given(spec=specs(master=False, dtypes=(torch.float32,)), lead=batch_shapes(), seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_with_bf16_weights_equals_reference_on_rounded_weights(ext, spec, lead, seed):
    x = random_input(spec, lead, seed)
    for isa in isas(ext):
        assert_equals_rounded_reference(run_bf16(ext, spec, x, isa), spec, x)


@pytest.fixture
def subtree_path(ext):
    before = ext._tune_grouped(8, 8, 4, 1, 1)
    yield
    ext._tune_grouped(*before)


@pytest.mark.parametrize("threads", [1, 2])
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(master=False, dtypes=(torch.float32,), max_depth=6), rows=st.integers(8, 160),
       seed=st.integers(0, 2 ** 31 - 1))
def test_subtree_path_with_bf16_weights(ext, subtree_path, threads, spec, rows, seed):
    x = random_input(spec, (rows,), seed)
    with num_threads(threads):
        for isa in isas(ext):
            assert_equals_rounded_reference(run_bf16(ext, spec, x, isa), spec, x)


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_large_batch_at_default_thresholds(ext, form):
    spec = make_spec(form=form, depth=5, d_in=40, d_out=24, leaf_width=8, trees=2, seed=3)
    x = random_input(spec, (2100,), 4)   # above form B's 2048 and form A's 128: the subtree path
    for isa in isas(ext):
        assert_equals_rounded_reference(run_bf16(ext, spec, x, isa), spec, x)


@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_exact_ties_follow_the_tie_rule(ext, form, tie):
    spec = make_spec(form=form, depth=3, d_in=13, d_out=6, leaf_width=5, trees=2, tie=tie, seed=9)
    spec = spec.replace(node_weight=torch.zeros_like(spec.node_weight), node_bias=torch.zeros_like(spec.node_bias))
    x = random_input(spec, (6,), 10)
    for isa in isas(ext):
        out = run_bf16(ext, spec, x, isa)
        torch.testing.assert_close(out, reference.hard(rounded(spec), x), atol=1e-5, rtol=1e-5)


def test_other_dtype_pairs_are_one_clear_error(ext):
    spec = make_spec(form="neuron_tree", depth=2, d_in=8, d_out=4, seed=1)
    for x in (torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8).half()):
        with pytest.raises(RuntimeError, match="float32 with bfloat16 weights"):
            run_bf16(ext, spec, x, "scalar")
    args = [a.half() if isinstance(a, torch.Tensor) else a for a in ops.op_arguments(spec)[:-2]]
    with pytest.raises(RuntimeError, match="float32 with bfloat16 weights"):
        ext.neuron_tree(torch.randn(3, 8), *args, 0, True)


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_handle_keeps_a_bf16_copy_and_follows_the_weights(native, form):
    spec = make_spec(form=form, depth=4, d_in=24, d_out=10, leaf_width=6, trees=2, seed=5)
    module = FusedFFF(spec, weights="bf16").eval()
    x = random_input(spec, (33,), 6)
    with torch.no_grad():
        y = module(x)
        assert module._fast   # the C++ handle ran
        assert_equals_rounded_reference(y, spec, x)
        module.node_weight.mul_(-1.0)   # in place: the copy must be rebuilt
        flipped = spec.replace(node_weight=-spec.node_weight)
        assert_equals_rounded_reference(module(x), flipped, x)
    assert module.weights == "bf16" and module.node_weight.dtype == torch.float32


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_fallback_without_the_kernel_has_the_same_semantics(native, form):
    """The op path (no handle: autograd on) runs on the rounded weights too."""
    spec = make_spec(form=form, depth=3, d_in=16, d_out=7, leaf_width=4, trees=2, seed=8)
    module = FusedFFF(spec, weights="bf16").eval()
    x = random_input(spec, (20,), 9).requires_grad_()
    object.__setattr__(module, "_fast", False)   # as when the kernel cannot run
    y = module(x)
    assert_equals_rounded_reference(y.detach(), spec, x.detach())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _Soft(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(32, 64), layer, nn.Linear(24, 5)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)))


def test_optimize_with_bf16_weights_reports_the_error():
    from fffcompile.nn import FFF
    torch.manual_seed(0)
    model = _Soft(FFF(64, 24, depth=3, leaf_width=8)).eval()
    x = torch.randn(64, 32)
    fast = fffcompile.optimize(model, x, weights="bf16")
    fused = [m for m in fast.modules() if isinstance(m, FusedFFF)]
    assert fused and all(m.weights == "bf16" for m in fused)
    report = fast.report
    check = report.model_check["bf16 weights vs the hardened original"]
    assert check.rtol == 2e-2 and check.max_rel_error > 0     # the rounding shows, with bf16 tolerances
    assert report.model_check["exactness vs the hardened original"]   # the float32 rewrite is exact
    text = str(report)
    assert "bf16 weights" in text and "decision flips" in text
    exact32 = fffcompile.optimize(model, x)
    assert "bf16 weights vs the hardened original" not in exact32.report.model_check
    with torch.no_grad():   # the optimized model computes the rounded-weight reference
        layer = fused[0]
        h = model.inp(x)
        spec = layer.spec.replace(**{n: getattr(layer, n).detach() for n in TREE if getattr(layer, n) is not None})
        assert_equals_rounded_reference(layer(h), spec, h)


def test_optimize_rejects_an_unknown_weight_mode():
    with pytest.raises(fffcompile.errors.UserError, match="weights"):
        fffcompile.optimize(nn.Linear(4, 4), torch.randn(2, 4), weights="int8")


@pytest.mark.parametrize("rows", [0, 1])
def test_handle_batch_0_and_1(native, rows):
    spec = make_spec(form="neuron_tree", depth=3, d_in=16, d_out=8, trees=2, seed=11)
    module = FusedFFF(spec, weights="bf16").eval()
    x = random_input(spec, (rows,), 12)
    with torch.no_grad():
        assert_equals_rounded_reference(module(x), spec, x)


def test_bf16_needs_float32_weights():
    spec = make_spec(form="leaf_mlp", depth=2, dtype=torch.float64, seed=2)
    with pytest.raises(ValueError, match="float32"):
        FusedFFF(spec, weights="bf16")
    with pytest.raises(ValueError, match="weights must be one of"):
        FusedFFF(make_spec(seed=2), weights="fp8")


def test_optimize_bf16_without_verify_says_so():
    from fffcompile.nn import FFF
    torch.manual_seed(1)
    model = _Soft(FFF(64, 24, depth=2, leaf_width=4)).eval()
    fast = fffcompile.optimize(model, torch.randn(16, 32), weights="bf16", verify=False)
    assert all(m.weights == "bf16" for m in fast.modules() if isinstance(m, FusedFFF))
    assert any("not verified" in n for n in fast.report.notes)
