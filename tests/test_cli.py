"""The fffcompile CLI (export, inspect, verify): exit codes, one-line errors, atomic output, python -m."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from fffcompile.cli import main
from fffcompile.onnx.contract import attribute, is_fff_node
from fffcompile.onnx.verify import run

import onnx_fixtures as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit:          # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def test_export_onnx_and_trt(tmp_path, capsys):
    src = F.exported("stack", "dynamo")
    for target in ("onnx", "trt"):
        out = tmp_path / f"m.{target}.onnx"
        code, stdout, err = cli(capsys, "export", src, "--target", target, "-o", str(out))
        assert code == 0, err
        model = onnx.load(str(out))
        nodes = [n for n in model.graph.node if is_fff_node(n)]
        assert len(nodes) == 3
        assert all((attribute(n, "plugin_version") is not None) == (target == "trt") for n in nodes)
        assert "rewritten: 3 FFF layer(s)" in stdout and "read " in err      # report on stdout, progress on stderr
        x = np.random.default_rng(1).standard_normal((3, 4, 8)).astype(np.float32)
        assert next(iter(run(str(out), {model.graph.input[0].name: x}).values())).shape == (3, 4, 3)


def test_export_with_inputs_npz_and_external_data(tmp_path, capsys):
    src = F.exported("fff", "legacy", external_data=True)
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((11, 12)).astype(np.float32))
    out = tmp_path / "ext.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", str(out), "--inputs", str(data))
    assert code == 0, err
    assert "(11, 12)" not in err and out.exists()
    assert len([n for n in onnx.load(str(out)).graph.node if is_fff_node(n)]) == 1
    assert onnx.load(str(out)).graph.initializer        # the weights are where the file says


def test_legacy_export_with_a_baked_sequence_length(tmp_path, capsys):
    # the legacy exporter bakes attention's sequence length into Reshape constants: the whole-model check must
    # find a size the original runs at (here the exported 5), not fail on its own generated inputs
    module, x = F.case("transformer")
    src = F.export(module, x, str(tmp_path / "legacy.onnx"), "legacy")
    with pytest.raises(Exception, match="Reshape"):
        run(src, {"x": np.zeros((3, 3, 8), np.float32)})
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "export", src, "--target", "trt", "-o", str(out))
    assert code == 0, err
    assert "exactness y: PASS" in stdout
    model = onnx.load(str(out))
    assert len([n for n in model.graph.node if is_fff_node(n)]) == 2
    y = next(iter(run(str(out), {"x": x.numpy()}).values()))
    try:
        with torch.no_grad():
            hard = module.eval()(x)          # fffcompile.nn layers descend hard in eval
    finally:
        module.train()
    np.testing.assert_allclose(y, hard.numpy(), rtol=1e-4, atol=1e-5)


def test_nothing_to_rewrite_is_copied_through(tmp_path, capsys):
    src = F.exported("glu", "dynamo")
    out = tmp_path / "glu.onnx"
    code, stdout, err = cli(capsys, "export", src, "-o", str(out))
    assert code == 0
    assert "nothing to rewrite" in stdout and "copied through" in stdout
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == [n.op_type for n in onnx.load(src).graph.node]


def test_an_exported_file_is_retargeted_not_rewritten_again(tmp_path, capsys):
    """Exporting fffcompile's own output again finds no new FFF: the same target copies it through; the other target
    sets (trt) or removes (onnx) the plugin attributes of its nodes and changes nothing else."""
    first = tmp_path / "m.onnx"
    assert cli(capsys, "export", F.exported("stack", "dynamo"), "-o", str(first))[0] == 0
    code, stdout, _ = cli(capsys, "export", str(first), "-o", str(tmp_path / "same.onnx"))
    assert code == 0 and "copied through unchanged" in stdout
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    name = onnx.load(str(first)).graph.input[0].name
    want = next(iter(run(str(first), {name: x}).values()))
    previous = first
    for target in ("trt", "onnx"):
        out = tmp_path / f"again.{target}.onnx"
        code, stdout, err = cli(capsys, "export", str(previous), "--target", target, "-o", str(out))
        assert code == 0, err
        assert "rewritten: nothing new (3 fffcompile node(s) already in the model, retargeted)" in stdout
        assert f"now target {target!r}" in stdout and f"wrote {out}" in stdout
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        nodes = [n for n in model.graph.node if is_fff_node(n)]
        assert len(nodes) == 3 and all((attribute(n, "plugin_namespace") is not None) == (target == "trt") for n in nodes)
        assert [n.op_type for n in model.graph.node] == [n.op_type for n in onnx.load(str(first)).graph.node]
        np.testing.assert_array_equal(next(iter(run(str(out), {name: x}).values())), want)
        previous = out


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_onnx", "directory", "unknown_target",
                                  "no_output_dir", "engine_without_trt", "bad_npz", "missing_external_data",
                                  "truncated_external_data"])
def test_bad_inputs_exit_2_one_line_nothing_written(tmp_path, capsys, kind):
    src = F.exported("fff", "dynamo")
    out = tmp_path / "out.onnx"
    args = ["export", src, "-o", str(out)]
    if kind == "missing":
        args[1] = str(tmp_path / "nope.onnx")
    elif kind == "empty":
        (tmp_path / "empty.onnx").write_bytes(b"")
        args[1] = str(tmp_path / "empty.onnx")
    elif kind == "truncated":
        data = open(src, "rb").read()
        (tmp_path / "cut.onnx").write_bytes(data[:len(data) // 3])
        args[1] = str(tmp_path / "cut.onnx")
    elif kind == "not_onnx":
        (tmp_path / "t.onnx").write_text("this is not a model\n")
        args[1] = str(tmp_path / "t.onnx")
    elif kind == "directory":
        args[1] = str(tmp_path)
    elif kind == "unknown_target":
        args += ["--target", "tensorflow"]
    elif kind == "no_output_dir":
        out = tmp_path / "missing_dir" / "out.onnx"
        args[3] = str(out)
    elif kind == "engine_without_trt":
        args += ["--engine", str(tmp_path / "m.plan")]
    elif kind in ("missing_external_data", "truncated_external_data"):
        # the model file without its data file next to it, or with the data file cut short
        ext = F.exported("fff", "dynamo", external_data=True)
        (tmp_path / os.path.basename(ext)).write_bytes(open(ext, "rb").read())
        if kind == "truncated_external_data":
            data = open(ext + ".data", "rb").read()
            (tmp_path / (os.path.basename(ext) + ".data")).write_bytes(data[:len(data) // 2])
        args[1] = str(tmp_path / os.path.basename(ext))
    elif kind == "bad_npz":
        (tmp_path / "bad.npz").write_bytes(b"garbage")
        args += ["--inputs", str(tmp_path / "bad.npz")]
    code, stdout, err = cli(capsys, *args)
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not any(p.name.startswith(".out.onnx") for p in out.parent.glob(".*")) \
        if out.parent.exists() else True


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "strict.onnx"
    code, stdout, err = cli(capsys, "export", F.exported("fff", "legacy"), "-o", str(out), "--atol", "0", "--rtol", "0")
    assert code == 1, err
    assert len(error_lines(err)) == 1 and not out.exists()


def test_verify_subcommand(tmp_path, capsys):
    src = F.exported("ultrafastbert", "legacy")
    out = tmp_path / "u.onnx"
    assert cli(capsys, "export", src, "-o", str(out), "--no-verify")[0] == 0
    code, stdout, err = cli(capsys, "verify", src, str(out))
    assert code == 0 and "PASS" in stdout
    # a model of the same interface with other weights is not a rewrite of the original
    other = F.exported("fff_seq", "legacy")
    code, stdout, err = cli(capsys, "verify", src, other)
    assert code in (1, 2) and "Traceback" not in err


def test_inspect_text_and_json(capsys):
    src = F.exported("transformer", "dynamo")
    code, stdout, err = cli(capsys, "inspect", src)
    assert code == 0 and "would rewrite: 2 FFF layer(s)" in stdout
    code, stdout, err = cli(capsys, "inspect", F.exported("not_a_tree", "legacy"), "--json")
    report = json.loads(stdout)
    assert code == 0 and report["rewritten"] == [] and report["left"] and report["left"][0]["reason"]


def test_engine_without_tensorrt_keeps_the_onnx_file(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the engine would be built")
    except ImportError:
        pass
    out, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    code, stdout, err = cli(capsys, "export", F.exported("fff", "dynamo"), "--target", "trt", "-o", str(out),
                            "--engine", str(plan))
    assert code == 0 and out.exists() and not plan.exists()
    assert "warning: no engine built" in err and "TensorRT" in err


def test_python_dash_m(tmp_path):
    out = tmp_path / "m.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "fffcompile", "export", F.exported("neuron_tree", "dynamo"), "-o",
                           str(out), "--target", "trt"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    bad = subprocess.run([sys.executable, "-m", "fffcompile", "export", str(tmp_path / "none.onnx"), "-o", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
