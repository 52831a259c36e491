"""`refiner data`: fetch the data sets refiner's demo uses (downloads with sha256 checks)."""

from __future__ import annotations

import click


@click.group("data")
def command() -> None:
    """Find or download data sets (Fashion-MNIST for the demo and its asset build)."""


@command.command("fashion-mnist")
@click.option("--dir", "root", type=click.Path(file_okay=False), default=None,
              help="Put the files into this folder (default: use what is installed, else the download cache).")
def fashion_mnist(root: str | None) -> None:
    """Locate Fashion-MNIST (4 IDX files), downloading what is missing; every file's sha256 is checked.

    Looked for, in order: $REFINER_FASHION_MNIST, /usr/share/datasets/fashion-mnist (Debian/Ubuntu:
    apt-get install dataset-fashion-mnist), the download cache ($REFINER_CACHE, default ~/.cache/refiner).
    """
    from refiner.demo.fashion_mnist import download

    for name, path in download(root).items():
        click.echo(f"{name}: {path}")
