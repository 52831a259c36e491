"""The `refiner` command line: a click group whose commands live one per module in this package."""

from __future__ import annotations

import importlib
import signal
import sys

import click

from common.errors import UserError
from fileformats.atomic import os_error_message

# command name -> module that defines `command` (a click.Command). Imported on first use.
COMMANDS: dict[str, str] = {
    "toy": "refiner.cli.toy",
    "inspect": "refiner.cli.inspect",
    "metrics": "refiner.cli.metrics",
    "sample": "refiner.cli.sample",
    "refine": "refiner.cli.refine",
    "distill": "refiner.cli.distill",
    "demo": "refiner.cli.demo",
    "data": "refiner.cli.data",
}


class _UserFacingError(click.ClickException):
    """A user mistake: printed as one line `Error: ...`, exit code 2."""

    exit_code = 2


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise _UserFacingError(str(e)) from None
        except OSError as e:  # a full disk or a missing permission where no writer expected one
            message = os_error_message(e)
            if message is None:
                raise
            raise _UserFacingError(message) from None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="refiner")
def cli() -> None:
    """Refine GANs and distill EDM teachers with Diff-Instruct (Luo et al., NeurIPS 2023)."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    # SIGTERM (kill, Slurm, Kubernetes) ends the command as Ctrl-C does: through its cleanup (temporary files
    # removed, the run's lock released), not at once as Python's default does
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="refiner")
