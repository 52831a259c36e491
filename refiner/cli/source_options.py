"""`--unknown-source` / `--source-from`: what refine and distill do when a network they write back
carries a module source that is not a published release (fileformats.module_sources)."""

from __future__ import annotations

from typing import Any, Callable

import click

from fileformats.module_sources import MODES, SourcePolicy, enforce


def source_options(command: Callable) -> Callable:
    command = click.option(
        "--source-from", metavar="FILE", default=None,
        help="With --unknown-source replace: a network pickle made with the published code; the module "
             "sources it stores replace the unknown ones (matched by class name).")(command)
    return click.option(
        "--unknown-source", type=click.Choice(MODES), default="keep", show_default=True,
        help="A network's stored module source is code that NVIDIA's loader runs; when it is not a "
             "published release: keep (write it, with a warning), error (refuse before any work), or "
             "replace (write the known source --source-from stores).")(command)


def check_sources(obj: Any, name: str, unknown_source: str, source_from: str | None,
                  echo: Callable[[str], None]) -> None:
    """Apply the options to the records reachable from `obj` (a loaded generator or teacher)."""
    enforce(obj, name, SourcePolicy(unknown_source, source_from), echo)
