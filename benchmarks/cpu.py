"""CPU benchmark of issue 4 (``fffcompile.benchmark``): the same as ``fffcompile bench``.

    python benchmarks/cpu.py [--quick] [--shapes ufb leaf] [--batches 1 128 1024 4096] [--threads 1 2]
                             [--rounds 9] [--no-compile] [--json PATH] [--plot PATH]

Prints a table (time per call and ratio to the dense layer for every method), writes the JSON
results and a PNG plot. See ``fffcompile/benchmark.py`` for what is timed and how.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fffcompile.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
