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
