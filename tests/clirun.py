"""Run the minillm CLI in-process for the tests: a traceback would escape and fail the test."""

from minillm import cli


def run_cli(capsys, *args):
    """cli.main(args) -> (exit code, stdout, stderr)."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
