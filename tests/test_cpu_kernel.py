"""The C++ CPU kernel (runtime/cpu_kernel.py, csrc/): built, registered, equal to reference.hard.

Every instruction-set path the CPU has (scalar always, AVX2 / AVX-512 where present) is run
against ``reference.hard`` on random specs of both forms, every activation, both tie rules and
every dtype; exact ties at z = 0; leading dims, batch 0 and 1; the parallel and leaf-grouped
paths; the subtree-blocked path of large batches (its thresholds lowered so that small specs take
it, and once at its default threshold), with one and two threads giving identical outputs; the dispatcher really reaching the kernel; the fallbacks (an activation or dtype mix the
kernel refuses, a build that fails) running the reference instead.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fffcompile  # noqa: F401  (registers the ops)
from fffcompile import ops, reference
from fffcompile.compare import compare
from fffcompile.runtime import FusedFFF, cpu_kernel
from fffcompile.spec import ACTIVATIONS, DTYPES, FFFSpec
import kernel_builds
from kernel_builds import isas
from specs import batch_shapes, make_spec, random_input, specs
from threads import num_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler: the kernel cannot be built here (the fallback is tested in test_ops.py)",
                allow_module_level=True)


@pytest.fixture(scope="module", params=kernel_builds.BUILDS)
def ext(request):
    """The kernel build under test (kernel_builds): native, then the emulated AVX-512 path."""
    return kernel_builds.load(request.param)


@pytest.fixture(scope="module")
def native():
    """The build the package itself loads (for tests of the ops, the handle and FusedFFF)."""
    return kernel_builds.load("native")


def run_ext(ext, spec: FFFSpec, x: torch.Tensor, isa: str) -> torch.Tensor:
    args = ops.op_arguments(spec)[:-2]
    fn = ext.leaf_mlp_tree if spec.form == "leaf_mlp" else ext.neuron_tree
    return fn(x, *args, cpu_kernel.ACTIVATION_CODES[spec.activation], spec.tie == "ge", cpu_kernel.ISAS[isa])


def assert_equals_reference(out, spec, x):
    expected = reference.hard(spec, x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    result = compare(out, expected, exclude=reference.near_ties(spec, x))
    assert result, result.summary()


def test_kernel_is_built_and_registered(native):
    assert native.isa() in ("avx512", "avx2", "scalar")
    assert cpu_kernel.available() and cpu_kernel.failure() is None
    spec = make_spec(depth=3)
    x = random_input(spec, (4,), 0)
    cpu_kernel.last_path = None
    ops.run_tree(spec, x)
    assert cpu_kernel.last_path == "kernel"


@settings(max_examples=40)
@given(spec=specs(master=False), lead=batch_shapes(), seed=st.integers(0, 2 ** 31 - 1))
def test_kernel_equals_reference(ext, spec, lead, seed):
    x = random_input(spec, lead, seed)
    for isa in isas(ext):
        assert_equals_reference(run_ext(ext, spec, x, isa), spec, x)


@settings(max_examples=15)
@given(spec=specs(master=False, max_depth=4), seed=st.integers(0, 2 ** 31 - 1))
def test_op_through_the_dispatcher_runs_the_kernel(native, spec, seed):
    x = random_input(spec, (3, 5), seed)
    cpu_kernel.last_path = None
    out = ops.run_tree(spec, x)
    assert cpu_kernel.last_path == "kernel"
    assert_equals_reference(out, spec, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("form,linear", [("leaf_mlp", False), ("leaf_mlp", True), ("neuron_tree", False)])
def test_every_activation_and_dtype(ext, form, linear, activation, dtype):
    # widths that are not multiples of any vector width: the vector blocks and the scalar tails both run
    spec = make_spec(form=form, depth=4, d_in=45, d_out=27, leaf_width=21, trees=3, activation=activation,
                     dtype=dtype, linear_leaves=linear, seed=5)
    x = random_input(spec, (11,), 6)
    for isa in isas(ext):
        assert_equals_reference(run_ext(ext, spec, x, isa), spec, x)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_parallel_for_runs_on_several_threads(ext):
    """The kernel's parallel loops are ATen's inline OpenMP: built without -fopenmp they silently run on one
    thread. Two threads set: two distinct threads run the two tasks."""
    with num_threads(2):
        assert ext._threads_used() == 2


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_batches_parallel_and_grouped_by_leaf(ext, form, threads):
    """Enough rows per leaf for the 4-row GEMM blocks, and enough work for the parallel split."""
    spec = make_spec(form=form, depth=5, d_in=96, d_out=80, leaf_width=16, trees=2, activation="gelu", seed=7)
    x = random_input(spec, (700,), 8)
    with num_threads(threads):
        for isa in isas(ext):
            assert_equals_reference(run_ext(ext, spec, x, isa), spec, x)


def _tied(form: str, tie: str, dtype: torch.dtype, negative_zero: bool) -> FFFSpec:
    """Every decision logit exactly 0 (zero node weights and biases), leaves all different."""
    spec = make_spec(form=form, depth=3, d_in=13, d_out=6, leaf_width=5, trees=2, tie=tie, dtype=dtype, seed=9)
    zero = -0.0 if negative_zero else 0.0
    return spec.replace(node_weight=torch.zeros_like(spec.node_weight),
                        node_bias=torch.full_like(spec.node_bias, zero))


@pytest.mark.parametrize("negative_zero", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_exact_ties_follow_the_tie_rule(ext, tie, dtype, negative_zero):
    leaf_spec = _tied("leaf_mlp", tie, dtype, negative_zero)
    x = random_input(leaf_spec, (4,), 10)
    # form A: z = 0 everywhere, so "ge" goes right to the last leaf and "gt" left to leaf 0
    j = leaf_spec.n_leaves - 1 if tie == "ge" else 0
    cd = reference.compute_dtype(dtype)
    X = x.to(cd)
    h = torch.relu(X @ leaf_spec.leaf_w1[j].to(cd) + leaf_spec.leaf_b1[j].to(cd))
    expected = (h @ leaf_spec.leaf_w2[j].to(cd) + leaf_spec.leaf_b2[j].to(cd)).to(dtype)
    # form B: a = 0 on every neuron and s(0) = 1/2, so y = out_bias + sum of the path's out_weight rows / 2
    neuron_spec = _tied("neuron_tree", tie, dtype, negative_zero).replace(activation="sigmoid")
    for isa in isas(ext):
        got = run_ext(ext, leaf_spec, x, isa)
        torch.testing.assert_close(got, expected, atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5,
                                   rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5)
        nodes = [0]
        for _ in range(neuron_spec.depth):
            nodes.append(2 * nodes[-1] + (2 if tie == "ge" else 1))
        V = neuron_spec.out_weight.to(cd)
        want = (0.5 * V[:, nodes].sum((0, 1)) + neuron_spec.out_bias.to(cd)).to(dtype).expand(4, -1)
        got_b = run_ext(ext, neuron_spec, x, isa)
        torch.testing.assert_close(got_b, want, atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6,
                                   rtol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)
        assert compare(got_b, reference.hard(neuron_spec, x))
        assert compare(got, reference.hard(leaf_spec, x))


def test_noncontiguous_input_and_weights(ext):
    spec = make_spec(form="neuron_tree", depth=3, d_in=10, d_out=7, trees=2, seed=11)
    wide = torch.zeros(*spec.node_weight.shape[:-1], 2 * spec.d_in)
    wide[..., ::2] = spec.node_weight
    strided = spec.replace(node_weight=wide[..., ::2])
    assert not strided.node_weight.is_contiguous()
    x = random_input(spec, (3, 4), 13).transpose(0, 1)
    assert not x.is_contiguous()
    assert_equals_reference(run_ext(ext, strided, x, "scalar"), spec, x)
    assert_equals_reference(ops.run_tree(strided, x), spec, x)


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_prepared_handle_with_transposed_weights(native, form):
    # A spec read from nn.Linear layers holds transposed views (out_weight = linear_out.weight.T):
    # the handle keeps one contiguous copy, follows in-place updates of the source, and FusedFFF
    # stores its parameters contiguous (it once copied the whole layer on every call: 16 ms at batch 1).
    spec = make_spec(form=form, depth=3, d_in=12, d_out=9, activation="gelu", seed=31)
    name = "leaf_w1" if form == "leaf_mlp" else "out_weight"
    source = getattr(spec, name).transpose(-1, -2).contiguous()
    strided = spec.replace(**{name: source.transpose(-1, -2)})
    assert not getattr(strided, name).is_contiguous()
    names = (("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2") if form == "leaf_mlp"
             else ("node_weight", "node_bias", "out_weight", "out_bias", None, None))
    tree = [getattr(strided, n) if n else None for n in names]
    handle = cpu_kernel.prepare(form, *tree, spec.activation, spec.tie)
    x = random_input(spec, (5,), 32)
    with torch.no_grad():
        assert_equals_reference(handle(x), spec, x)
        assert_equals_reference(handle(x), spec, x)
        source.mul_(2)   # in place, through the transposed view's storage: the copy is rebuilt
        assert_equals_reference(handle(x), spec.replace(**{name: getattr(spec, name) * 2}), x)
        module = FusedFFF(strided).eval()
        assert all(p.is_contiguous() for p in module.parameters())
        assert_equals_reference(module(x), strided, x)


def test_refused_calls_run_the_reference(native, monkeypatch):
    spec = make_spec(depth=3, activation="gelu", seed=14)
    x = random_input(spec, (5,), 15)
    # x in another dtype than the weights: the kernel refuses, the reference converts
    x64 = x.double()
    assert "float64" in cpu_kernel.refusal(x64, ops.op_arguments(spec)[:6], "gelu")
    cpu_kernel.last_path = None
    out = ops.run_tree(spec, x64)
    assert cpu_kernel.last_path == "reference"
    torch.testing.assert_close(out, reference.hard(spec, x64))
    # an activation the kernel does not implement
    monkeypatch.setattr(cpu_kernel, "ACTIVATION_CODES", {k: v for k, v in cpu_kernel.ACTIVATION_CODES.items() if k != "gelu"})
    assert "gelu" in cpu_kernel.refusal(x, ops.op_arguments(spec)[:6], "gelu")
    out = ops.run_tree(spec, x)
    assert cpu_kernel.last_path == "reference"
    torch.testing.assert_close(out, reference.hard(spec, x))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


_FALLBACK_CHECK = """
import torch, fffcompile
from fffcompile import ops, reference
from fffcompile.runtime import cpu_kernel
from specs import make_spec, random_input
for form in ("leaf_mlp", "neuron_tree"):
    spec = make_spec(form=form, depth=3, trees=2)
    x = random_input(spec, (4,), 0)
    out = ops.run_tree(spec, x)
    assert cpu_kernel.last_path == "reference", cpu_kernel.last_path
    torch.testing.assert_close(out, reference.hard(spec, x))
print("FAILURE:", cpu_kernel.failure())
"""


def test_failed_build_falls_back_to_the_reference(tmp_path):
    """A compiler that does not exist: one logged line, the reference runs, nothing raises."""
    result = _python(_FALLBACK_CHECK, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "FAILURE: " in result.stdout and "FAILURE: None" not in result.stdout
    assert result.stderr.count("CPU kernel unavailable") == 1


def test_disabled_kernel_falls_back_to_the_reference():
    result = _python(_FALLBACK_CHECK, FFFCOMPILE_CPU_KERNEL="0")
    assert result.returncode == 0, result.stderr
    assert "FFFCOMPILE_CPU_KERNEL=0" in result.stdout


def test_import_does_not_build():
    result = _python("import fffcompile, fffcompile.runtime\n"
                     "from fffcompile.runtime import cpu_kernel\n"
                     "import sys\n"
                     "print(cpu_kernel._extension is None and cpu_kernel.failure() is None,"
                     " any(m.startswith('fffcompile_cpu_') for m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_fused_module_inference_and_training(native, form):
    spec = make_spec(form=form, depth=4, d_in=24, d_out=12, leaf_width=8, trees=2, activation="silu",
                     master=3 if form == "leaf_mlp" else 0, seed=16)
    module = FusedFFF(spec).eval()
    x = random_input(spec, (2, 9), 17)
    expected = reference.hard(spec.without_master(), x) if not spec.has_master else None
    with torch.no_grad():
        fast = module(x)
    with torch.enable_grad():
        slow = module(x)
        slow.sum().backward()
    assert module.leaf_w1.grad is not None if form == "leaf_mlp" else module.out_weight.grad is not None
    torch.testing.assert_close(fast, slow.detach())
    if expected is not None:
        assert_equals_reference(fast, spec, x)


def test_fused_module_fast_path_is_used_and_follows_the_weights(native):
    import copy
    import pickle
    spec = make_spec(form="neuron_tree", depth=3, d_in=16, d_out=8, trees=2, activation="gelu", seed=18)
    module = FusedFFF(spec).eval()
    x = random_input(spec, (5,), 19)
    with torch.no_grad():
        y = module(x)
        assert module._fast, "no-grad CPU inference must run through the C++ handle"
        assert_equals_reference(y, spec, x)
        module.out_weight.mul_(2)                          # in place: the handle sees it
        assert_equals_reference(module(x), spec.replace(out_weight=spec.out_weight * 2), x)
        module.out_weight = torch.nn.Parameter(spec.out_weight.clone())   # replaced: the handle is rebuilt
        assert module._fast is None
        assert_equals_reference(module(x), spec, x)
        module.double()                                    # cast: rebuilt for float64
        assert module._fast is None
        x64 = x.double()
        assert_equals_reference(module(x64), spec.to(torch.float64), x64)
        assert module._fast and module._fast_dtype == torch.float64
        clone = copy.deepcopy(module)
        torch.testing.assert_close(clone(x64), module(x64))
        restored = pickle.loads(pickle.dumps(module))
        torch.testing.assert_close(restored(x64), module(x64))


def test_fused_module_fast_call_leaves_hooks_tracing_and_export_alone(native):
    spec = make_spec(form="leaf_mlp", depth=3, d_in=12, d_out=6, leaf_width=4, seed=20)
    module = FusedFFF(spec).eval()
    x = random_input(spec, (3,), 21)
    with torch.no_grad():
        expected = module(x)
        seen = []
        handle = module.register_forward_hook(lambda mod, args, out: seen.append(out))
        torch.testing.assert_close(module(x), expected)
        handle.remove()
        assert len(seen) == 1, "a forward hook must still fire"
        traced = torch.jit.trace(module, (x,), check_trace=False)
        assert "fffcompile::leaf_mlp_tree" in str(traced.graph), "jit.trace must record the op, not a C++ call"
        wrong = torch.randn(3, 5)
        with pytest.raises(Exception, match="d_in = 12"):
            module(wrong)
    exported = torch.export.export(module, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fffcompile.leaf_mlp_tree.default in targets
    torch.testing.assert_close(exported.module()(x), expected)


def test_fused_module_under_torch_compile_keeps_the_op(native):
    spec = make_spec(form="neuron_tree", depth=3, d_in=12, d_out=6, trees=2, seed=22)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), FusedFFF(spec)).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)     # fullgraph: the fast call must not break the graph
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_malformed_arguments_are_errors_not_crashes(ext, form):
    spec = make_spec(form=form, depth=2, d_in=6, d_out=4, leaf_width=3, trees=2, seed=23)
    x = random_input(spec, (2,), 24)
    args = list(ops.op_arguments(spec)[:-2])
    fn = ext.leaf_mlp_tree if form == "leaf_mlp" else ext.neuron_tree
    for i, t in enumerate(args):
        if t is None:
            continue
        bad = list(args)
        bad[i] = t[..., :-1] if t.shape[-1] > 1 else t[:-1]          # one dim one short
        with pytest.raises(RuntimeError):
            fn(x, *bad, 0, True)
    with pytest.raises(RuntimeError, match="d_in = 6"):
        fn(torch.randn(2, 5), *args, 0, True)
    with pytest.raises(RuntimeError, match="dtype"):
        fn(x.double(), *args, 0, True)
    if form == "leaf_mlp":
        with pytest.raises(RuntimeError, match="leaf_b2"):
            fn(x, *args[:5], None, 0, True)


def test_a_stale_build_lock_is_removed(tmp_path):
    """A build killed half-way leaves torch's lock file; the next build must not wait on it forever."""
    from torch.utils import cpp_extension
    env_before = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    try:
        directory = cpp_extension._get_build_directory("fffcompile_cpu_test", verbose=False)
        lock = os.path.join(directory, "lock")
        open(lock, "w").close()
        cpu_kernel._remove_stale_lock(cpp_extension, "fffcompile_cpu_test")
        assert os.path.exists(lock), "a fresh lock belongs to a build in progress"
        old = os.path.getmtime(lock) - cpu_kernel.STALE_LOCK_SECONDS - 60
        os.utime(lock, (old, old))
        cpu_kernel._remove_stale_lock(cpp_extension, "fffcompile_cpu_test")
        assert not os.path.exists(lock)
    finally:
        if env_before is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR")
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = env_before


@pytest.mark.parametrize("form,linear", [("leaf_mlp", False), ("leaf_mlp", True), ("neuron_tree", False)])
def test_fused_module_fast_path_under_autograd_has_the_ops_gradients(native, form, linear):
    spec = make_spec(form=form, depth=3, d_in=10, d_out=6, leaf_width=5, trees=2, activation="gelu",
                     linear_leaves=linear, dtype=torch.float64, seed=25)
    fast, slow = FusedFFF(spec), FusedFFF(spec)
    x = random_input(spec, (4, 3), 26)

    def grads(module, use_fast):
        module.zero_grad()
        xr = x.clone().requires_grad_(True)
        if not use_fast:
            object.__setattr__(module, "_fast", False)              # the op through the dispatcher
        out = module(xr)
        assert (module._fast is not False) == use_fast
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return out.detach(), [xr.grad] + [p.grad for p in module.parameters()]

    out_fast, g_fast = grads(fast, True)
    out_slow, g_slow = grads(slow, False)
    torch.testing.assert_close(out_fast, out_slow)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)
    frozen = FusedFFF(spec).requires_grad_(False)
    y = frozen(x)                                                     # grad mode on, nothing requires grad
    assert y.grad_fn is None and frozen._fast


# ------------------------------------------------------------------ subtree-blocked path (large batches)

@pytest.fixture
def subtree_path(ext):
    """Every batch of 8 rows or more takes the subtree-blocked path (form B and form A's routing);
    returns a setter for (rows per bucket, prefetch mode, dynamic thread chunks). Defaults restored after."""
    before = ext._tune_grouped(8, 8, 4, 1, 1)

    def tune(bucket_rows=4, prefetch=1, dynamic=1):
        ext._tune_grouped(8, 8, bucket_rows, prefetch, dynamic)

    yield tune
    ext._tune_grouped(*before)


@pytest.mark.parametrize("threads", [1, 2])
@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=specs(master=False, max_depth=6), rows=st.integers(8, 160), bucket_rows=st.sampled_from([1, 3, 8, 64]),
       prefetch=st.integers(0, 2), seed=st.integers(0, 2 ** 31 - 1))
def test_subtree_path_equals_reference(ext, subtree_path, threads, spec, rows, bucket_rows, prefetch, seed):
    """Any form, depth, width, tree count, activation, tie rule and dtype (bfloat16 and float16 included)."""
    subtree_path(bucket_rows, prefetch)
    x = random_input(spec, (rows,), seed)
    with num_threads(threads):
        for isa in isas(ext):
            assert_equals_reference(run_ext(ext, spec, x, isa), spec, x)


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_subtree_path_is_taken_at_the_default_threshold(ext, form):
    """Batches above the default thresholds (form B 2048 rows, form A 128), trees > 1, with the defaults."""
    defaults = ext._tune_grouped(0, 0, 1, 0, 0)
    ext._tune_grouped(*defaults)
    assert defaults[0] <= 4096 and defaults[1] <= 4096
    spec = make_spec(form=form, depth=6, d_in=40, d_out=24, leaf_width=8, trees=3, activation="gelu", seed=30)
    x = random_input(spec, (max(defaults[0], defaults[1]) + 37,), 31)
    for isa in isas(ext):
        assert_equals_reference(run_ext(ext, spec, x, isa), spec, x)


@pytest.mark.parametrize("form", ["leaf_mlp", "neuron_tree"])
def test_threads_and_chunking_do_not_change_the_output(ext, subtree_path, form):
    """Form B: each row's arithmetic is fixed by the path, not by the thread count or the chunk
    hand-out (bit for bit). Form A's leaf GEMMs take rows four at a time, so where a chunk cuts a
    leaf's rows changes the rounding: there every variant is checked against the reference."""
    spec = make_spec(form=form, depth=5, d_in=64, d_out=48, leaf_width=16, trees=2, activation="silu", seed=32)
    x = random_input(spec, (300,), 33)
    outs = []
    with num_threads():
        for grouped in (True, False):
            if not grouped:
                ext._tune_grouped(1 << 40, 1 << 40, 4, 1, 1)
            for threads, dynamic in [(1, 1), (2, 1), (2, 0)]:
                if grouped:
                    subtree_path(8, 1, dynamic)
                else:
                    ext._tune_grouped(1 << 40, 1 << 40, 4, 1, dynamic)
                torch.set_num_threads(threads)
                outs.append(run_ext(ext, spec, x, ext.isa()))
    if form == "neuron_tree":
        for i in (1, 2, 4, 5):
            assert torch.equal(outs[i], outs[0 if i < 3 else 3])
    for out in outs:
        assert_equals_reference(out, spec, x)


@pytest.mark.parametrize("negative_zero", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_subtree_path_exact_ties_follow_the_tie_rule(ext, subtree_path, tie, dtype, negative_zero):
    for form in ("leaf_mlp", "neuron_tree"):
        spec = _tied(form, tie, dtype, negative_zero)
        x = random_input(spec, (40,), 34)
        for isa in isas(ext):
            got = run_ext(ext, spec, x, isa)
            assert compare(got, reference.hard(spec, x)), form
        subtree_path(1)
        assert compare(run_ext(ext, spec, x, ext.isa()), reference.hard(spec, x)), form
        subtree_path()


def test_subtree_path_noncontiguous_input_and_weights(ext, subtree_path):
    for form in ("leaf_mlp", "neuron_tree"):
        spec = make_spec(form=form, depth=4, d_in=10, d_out=7, leaf_width=5, trees=2, seed=35)
        wide = torch.zeros(*spec.node_weight.shape[:-1], 2 * spec.d_in)
        wide[..., ::2] = spec.node_weight
        strided = spec.replace(node_weight=wide[..., ::2])
        assert not strided.node_weight.is_contiguous()
        x = random_input(spec, (20, 4), 36).transpose(0, 1)
        assert not x.is_contiguous()
        for isa in isas(ext):
            assert_equals_reference(run_ext(ext, strided, x, isa), spec, x)
        assert_equals_reference(ops.run_tree(strided, x), spec, x)
