"""The `minillm` command line: thin Click commands that parse flags and call library functions."""

import sys

import click

from minillm import __version__


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 1."""


@click.group()
@click.version_option(__version__, prog_name="minillm")
def cli():
    """Train, sample and check small language models written from scratch in NumPy/Numba."""


# --- tokenizer commands ---
# --- end tokenizer commands ---


def main(argv=None):
    """Entry point: run the CLI, turning expected failures into one clear line and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="minillm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (UserError, ValueError, OSError, UnicodeDecodeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
