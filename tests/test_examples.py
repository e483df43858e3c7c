"""The README's commands and the examples run as a user runs them."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_trains_optimizes_and_reports():
    result = run("examples/demo.py", "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rewritten: 1 FFF layer(s)" in out and re.search(r"tree\s+C\s+4\s+1\s+64->64\s+ok", out)
    soft, hard = map(float, re.search(r"soft \(training form\) ([\d.]+)%, optimized \(hard descent\) ([\d.]+)%", out).groups())
    assert soft > 80 and hard > 75
    assert "speedup" in out


def test_cli_help_and_module_entry_point():
    result = run("-m", "fffcompile", "--help")
    assert result.returncode == 0 and "usage: fffcompile" in result.stdout


def test_readme_quick_start_names_the_two_make_targets_and_they_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
    assert "torch==2.13.0" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
