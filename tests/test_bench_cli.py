"""``fffcompile bench``: registered, bad input refused in one line (the benchmark itself is not a test)."""
import pytest

from fffcompile.cli import build_parser, main


def test_bench_is_a_subcommand():
    args = build_parser().parse_args(["bench", "--quick", "--shapes", "ufb", "--batches", "1", "4"])
    assert args.command == "bench" and args.quick and args.batches == [1, 4] and args.shapes == ["ufb"]


@pytest.mark.parametrize("argv,message", [
    (["bench", "--batches", "0"], "--batches must be positive"),
    (["bench", "--threads", "0"], "--threads must be between"),
    (["bench", "--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--shapes", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_spread_is_the_10th_and_90th_percentile_of_the_rounds():
    from fffcompile.benchmark import spread
    stats = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["rounds"] == 5
    assert stats["p10"] == pytest.approx(1.4) and stats["p90"] == pytest.approx(4.6)
    assert spread([2.0]) == {"median": 2.0, "p10": 2.0, "p90": 2.0, "rounds": 1}


def test_results_record_the_spread_and_the_table_prints_it():
    """measure() on a tiny layer: every method's row in the JSON has its median, p10 <= median <= p90."""
    import json

    import torch
    from fffcompile import benchmark, reference
    from specs import make_spec
    spec = make_spec(form="neuron_tree", depth=2, d_in=8, d_out=8, trees=1, seed=1)
    shape = benchmark.Shape("ufb", "tiny", spec, methods={"dense": torch.nn.Linear(8, 8),
                                                          "fffcompile": lambda x: reference.hard(spec, x)})
    row = benchmark.make_row("ufb", 4, 1, benchmark.measure(shape, 4, 1, rounds=3, budget_s=1.0))
    assert set(row["seconds"]) == set(row["spread"]) == {"dense", "fffcompile"}
    for method, s in row["spread"].items():
        assert set(s) == {"p10", "p90", "rounds"} and s["rounds"] == 3
        assert s["p10"] <= row["seconds"][method] <= s["p90"]
    assert json.loads(json.dumps(row)) == row
    line = benchmark.format_row(row)
    assert line.count("+-") == 2 and "x" in line


def test_methods_option_and_the_bf16_column():
    from fffcompile import benchmark
    from fffcompile.cli import bench
    assert bench.METHOD_CHOICES == benchmark.METHODS and "fffcompile_bf16" in benchmark.METHODS
    args = build_parser().parse_args(["bench", "--methods", "torch_hard"])
    assert args.methods == ["torch_hard"]
