"""Writing a refined generator back in its input's format: the one path that `refine`, `distill`, the
Python API and the jobs' snapshots use.

`writeback_for(generator)` gives the `WriteBack` of the generator's format:

    format                            output in the run directory   --in-place replaces
    StyleGAN2-ADA / StyleGAN3 pickle  network-refined.pkl           the pickle (D and the rest kept)
    BigGAN-deep folder                biggan-refined/               the folder's two files
    one-step EDM generator            network-refined.pkl           a pickle of only 'ema' and refiner's
                                                                    metadata (others are refused)

With `snapshots` (distill) every snapshot gets its own output instead, named by the images seen:
network-snapshot-NNNNNNNNN.pkl (biggan-snapshot-NNNNNNNNN/).

Each output is written by the generator's own `save` (nvpickle.dump, BigGANGenerator.save), every file
through a temporary file and a rename, so a killed run never leaves a half-written one. `--in-place`
(refine) is `in_place_backup` before training, `WriteBack.check_in_place` once the input is loaded and
`replace_input` after the last snapshot.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from common.errors import UserError
from fileformats import nvpickle
from fileformats.atomic import atomic_copy, atomic_folder, remove_stale_temps
from fileformats.torchfiles import is_torch_checkpoint
from gan_adapters.biggan import BigGANGenerator
from gan_adapters.onestep import METADATA_KEY, OneStepGenerator
from gan_adapters.resize import Resized
from gan_adapters.stylegan2_adapter import StyleGAN2Generator

REFINED_PICKLE = "network-refined.pkl"
REFINED_FOLDER = "biggan-refined"
# Diff-Instruct / EDM name their snapshots by whole kimg (network-snapshot-KKKKKK.pkl), which repeats when two
# snapshots are less than 1000 images apart; ours count every image seen (9 digits), so each is kept.
SNAPSHOT_PICKLE = "network-snapshot-{nimg:09d}.pkl"
SNAPSHOT_FOLDER = "biggan-snapshot-{nimg:09d}"
IN_PLACE_ADVICE = "run without --in-place and take the refined file from --out"


def save_native(generator: nn.Module, path: Path, **options: Any) -> None:
    """The generator's own `save` (its family's format), replacing the output of an earlier snapshot."""
    generator.save(path, overwrite=True, **options)


@dataclass(frozen=True)
class WriteBack:
    """How one format's generator goes to disk: its name in the run directory, the writer, and what an
    --in-place replacement of the input would lose."""

    name: str  # file or folder name; with a '{nimg}' field (images seen) every snapshot gets its own
    save: Callable[[nn.Module, Path], None] = save_native  # writes one output atomically
    keeps: frozenset[str] | None = None  # the top-level pickle entries written; None: all that were read

    def path(self, out: Path, nimg: int) -> Path:
        """The output of the snapshot taken after `nimg` images, inside the run directory `out`."""
        return out / self.name.format(nimg=nimg)

    def check_in_place(self, source: str) -> None:
        """Refuse --in-place where writing this format over `source` would lose part of it."""
        if self.keeps is None:
            return
        if os.path.isdir(source) or is_torch_checkpoint(source):
            raise UserError(f"--in-place would replace {source} (a torch state dict) with a network pickle "
                            f"('ema' and refiner's metadata); {IN_PLACE_ADVICE}")
        dropped = sorted(set(nvpickle.load(source)) - self.keeps)
        if dropped:
            raise UserError(f"--in-place would drop {', '.join(dropped)} from {source} (a refined one-step "
                            f"generator is written as 'ema' and refiner's metadata); take it from --out instead")


def writeback_for(generator: nn.Module, keep_G: bool = False, snapshots: bool = False) -> WriteBack:
    """The `WriteBack` of `generator`'s format (a `Resized` generator: the wrapped one's). `keep_G`: a
    StyleGAN2-ADA pickle gets the refined weights in G_ema only. `snapshots`: each snapshot gets its own
    file or folder (distill); otherwise every snapshot rewrites the one output (refine)."""
    native = generator.gen if isinstance(generator, Resized) else generator
    if keep_G and not isinstance(native, StyleGAN2Generator):
        raise UserError("--keep-G applies to StyleGAN2-ADA pickles (they hold G and G_ema); leave it out")
    if isinstance(native, BigGANGenerator):
        return WriteBack(SNAPSHOT_FOLDER if snapshots else REFINED_FOLDER)
    name = SNAPSHOT_PICKLE if snapshots else REFINED_PICKLE
    if isinstance(native, OneStepGenerator):
        return WriteBack(name, keeps=frozenset({"ema", METADATA_KEY}))
    return WriteBack(name, functools.partial(save_native, keep_G=True) if keep_G else save_native)


def in_place_backup(source: str) -> Path:
    """Before anything is loaded: --in-place needs a local file or folder (not a symbolic link, which the
    replacement would turn into a copy), a free SOURCE.bak for the backup and room for it
    (`check_free_space`). Returns the backup's path."""
    if "://" in source or not os.path.exists(source):
        raise UserError(f"--in-place needs a local generator file or folder; {source} is not one")
    if os.path.islink(source):
        raise UserError(f"--in-place would replace {source}, a symbolic link to {os.path.realpath(source)}, by a "
                        "file or folder: give the link's target itself, or leave out --in-place")
    parent = os.path.dirname(os.path.abspath(source))
    if not os.access(parent, os.W_OK):  # access(2) also reports a read-only file system, even to root
        raise UserError(f"--in-place writes {source}.bak and the refined generator into {parent}, which this user "
                        "cannot write (permissions or a read-only file system): leave out --in-place and take the "
                        "refined generator from --out")
    remove_stale_temps(parent, of=os.path.basename(source))  # what a killed --in-place left beside its input
    backup = Path(f"{source}.bak")
    if backup.exists():
        raise UserError(f"--in-place would keep the input as {backup}, which already exists; move it away first")
    check_free_space(Path(source))
    return backup


def replace_input(target: Path, refined: Path, backup: Path, reference: nn.Module, options: dict[str, Any]) -> None:
    """Re-read the refined output (with the options it was loaded with) and check it holds `reference`'s
    weights (a `Resized` one's: the wrapped generator's); then copy the input to `backup` and put the refined
    file in its place, each copy atomic. A folder is replaced whole: a copy of it with the refined files
    written over takes its place in one swap (`atomic_folder`), so files of the input that refine does not
    write stay. If anything fails before the input is replaced, it is as it was and neither a backup nor a
    temporary copy is left; once it is replaced (the path names another inode), the backup stays whatever
    happens after, an interrupt included."""
    from gan_adapters.loader import load_generator

    reference = reference.gen if isinstance(reference, Resized) else reference
    reread = load_generator(refined, **options).state_dict()
    expected = reference.state_dict()
    if reread.keys() != expected.keys() or not all(torch.equal(reread[k], expected[k].cpu()) for k in expected):
        raise UserError(f"{refined} did not read back as the refined generator; {target} was left unchanged")
    check_free_space(target)
    original = os.stat(target).st_ino
    atomic_copy(target, backup, advice=IN_PLACE_ADVICE)
    try:
        if refined.is_dir():
            with atomic_folder(target, advice=IN_PLACE_ADVICE) as staged:
                shutil.copytree(target, staged, dirs_exist_ok=True, symlinks=True)
                shutil.copytree(refined, staged, dirs_exist_ok=True)
        else:
            atomic_copy(refined, target, advice=IN_PLACE_ADVICE)
    except BaseException:
        if _inode(target) == original:  # not replaced: the backup is a needless copy
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        raise


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def check_free_space(target: Path) -> None:
    """--in-place writes a backup of the input and a temporary copy of the refined one beside it: twice the
    input's size must be free there (checked before training, and again before replacing)."""
    needed, free = 2 * _size(target), shutil.disk_usage(target.resolve().parent).free
    if free < needed:
        in_mib = [f"{n / 2**20:.1f} MiB" for n in (needed, free)]
        need_text, free_text = in_mib if in_mib[0] != in_mib[1] else (f"{needed:,} bytes", f"{free:,} bytes")
        raise UserError(f"--in-place needs {need_text} free beside {target} (a backup and a temporary copy), "
                        f"only {free_text} are: free some space, or leave out --in-place and take the refined "
                        "file from --out")
