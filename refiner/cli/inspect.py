"""`refiner inspect`: show what an NVIDIA network pickle holds, without executing anything from it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from common.errors import UserError
from fileformats import module_sources, nvpickle
from fileformats.sources import open_source
from fileformats.torchfiles import is_torch_checkpoint, is_torchscript
from gan_adapters.biggan import is_biggan_folder, read_folder
from refiner.cli.options import check_sha256
from refiner.cli.usage import biggan_folder_usage, pickle_usage, state_dict_usage, torchscript_usage


def jsonable(value: Any) -> Any:
    """Plain JSON data for stored attributes and kwargs: numpy scalars become numbers, non-finite
    floats the strings 'inf' / '-inf' / 'nan', tensors a short description, anything else its repr."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()  # numpy scalars and StyleGAN3's small arrays (sizes)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, nvpickle.PersistentObject):
        return f"<{value.class_name}>"
    return repr(value)


def _own_tensors(node: Any) -> list[dict]:
    state = nvpickle.node_state(node) or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    out = []
    for kind, holder in (("parameter", state.get("_parameters")), ("buffer", state.get("_buffers"))):
        for name, t in (holder or {}).items():
            if t is not None:
                out.append({"name": name, "kind": kind if name not in skip else "non-persistent buffer",
                            "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")})
    return out


def module_tree(node: Any) -> dict:
    """Class name, tensors and children of one module node (record or torch container), recursively."""
    children = {name: module_tree(child) for name, child in nvpickle.node_children(node).items()
                if child is not None}
    tensors = _own_tensors(node)
    own = sum(math.prod(t["shape"]) for t in tensors if t["kind"] == "parameter")
    return {
        "class_name": node.class_name if isinstance(node, nvpickle.PersistentObject) else type(node).__name__,
        "num_params": own + sum(c["num_params"] for c in children.values()),
        "tensors": tensors,
        "children": children,
    }


def source_summary(record: nvpickle.PersistentObject) -> list[dict]:
    """Each distinct module source stored in a network's records: whether it is a published release
    (which one), text without code, or UNKNOWN; with the classes defined by it."""
    by_source: dict[str, list[str]] = {}
    for node in nvpickle.records(record):
        classes = by_source.setdefault(node.module_src, [])
        if node.class_name not in classes:
            classes.append(node.class_name)
    out = []
    for source, classes in by_source.items():
        status = module_sources.classify(source)
        out.append({"status": "known" if status.release else "unknown" if status.has_code else "no code",
                    "release": status.release.describe() if status.release else None,
                    "sha256": status.sha256, "chars": len(source), "classes": classes,
                    "description": status.describe()})
    return out


def network_summary(record: nvpickle.PersistentObject) -> dict:
    state_dict = record.state_dict()
    dtypes = Counter()
    for t in state_dict.values():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
    attributes = {k: jsonable(v) for k, v in record.state.items()
                  if not k.startswith("_") and k != "training"
                  and not isinstance(v, (torch.Tensor, nvpickle.PersistentObject, torch.nn.Module))}
    return {
        "class_name": record.class_name,
        "persistence_version": record.version,
        "module_src_chars": len(record.module_src),
        "module_sources": source_summary(record),
        "init_args": jsonable(record.init_args),
        "init_kwargs": jsonable(record.init_kwargs),
        "attributes": attributes,
        "num_params": sum(t.numel() for t in record.named_parameters().values()),
        "num_state_tensors": len(state_dict),
        "state_elements_by_dtype": dict(dtypes),
        "state_bytes": sum(t.numel() * t.element_size() for t in state_dict.values()),
        "tree": module_tree(record),
    }


def summarize(obj: Any) -> dict:
    """Everything `inspect` shows, as JSON data: one entry per top-level key."""
    items = obj.items() if isinstance(obj, dict) else [("<top>", obj)]
    entries = {}
    for key, value in items:
        if isinstance(value, nvpickle.PersistentObject):
            entries[str(key)] = {"network": network_summary(value)}
        else:
            entries[str(key)] = {"type": type(value).__name__, "value": jsonable(value)}
    return {"kind": nvpickle.describe(obj), "entries": entries}


def _count(n: int) -> str:
    return f"{n:,}"


def _render_tree(name: str, tree: dict, depth: int, max_depth: int | None, tensors: bool,
                 lines: list[str]) -> None:
    indent = "  " * (depth + 1)
    lines.append(f"{indent}{name}: {tree['class_name']}  {_count(tree['num_params'])} params")
    if tensors:
        for t in tree["tensors"]:
            extra = "" if t["kind"] == "parameter" else f"  ({t['kind']})"
            lines.append(f"{indent}  .{t['name']}  {t['shape']} {t['dtype']}{extra}")
    if max_depth is not None and depth >= max_depth:
        if tree["children"]:
            lines.append(f"{indent}  ... {len(tree['children'])} submodules (raise --depth)")
        return
    for child_name, child in tree["children"].items():
        _render_tree(child_name, child, depth + 1, max_depth, tensors, lines)


def render_usage(usage: dict) -> list[str]:
    lines = [f"what it is: {usage['kind']}"]
    lines += [f"  {command}: {use}" for command, use in usage["commands"].items()]
    return lines + [""]


def render_text(summary: dict, max_depth: int | None, tensors: bool) -> str:
    lines = [f"file: {summary['file']}  ({_count(summary['size_bytes'])} bytes, "
             f"pickle protocol {summary['pickle_protocol']})",
             f"kind: {summary['kind']}",
             f"globals: {', '.join(summary['globals'])}", "", *render_usage(summary["usage"])]
    for key, entry in summary["entries"].items():
        if "network" not in entry:
            lines.append(f"[{key}] {entry['type']}: {json.dumps(entry['value'])}")
            continue
        net = entry["network"]
        dtypes = ", ".join(f"{d} {_count(n)}" for d, n in net["state_elements_by_dtype"].items())
        lines.append(f"[{key}] {net['class_name']}: {_count(net['num_params'])} parameters, "
                     f"{net['num_state_tensors']} state tensors ({dtypes or 'none'}; "
                     f"{net['state_bytes'] / 2**20:.2f} MiB)")
        for src in net["module_sources"]:
            lines.append(f"  source ({src['chars']:,} chars) of {', '.join(src['classes'])}: {src['description']}")
        if net["init_args"]:
            lines.append(f"  init args: {json.dumps(net['init_args'])}")
        for k, v in net["init_kwargs"].items():
            lines.append(f"  init {k} = {json.dumps(v)}")
        if net["tree"]["children"] or net["tree"]["tensors"]:
            _render_tree(key, net["tree"], 0, max_depth, tensors, lines)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


@click.command("inspect")
@click.argument("source", metavar="FILE_OR_URL")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--depth", type=click.IntRange(min=0), default=None,
              help="Show the module tree only this many levels below each network (default: all).")
@click.option("--tensors", is_flag=True, help="List every parameter and buffer with shape and dtype.")
@click.option("--sha256", default=None, metavar="HEX", callback=check_sha256,
              help="Expected sha256 of the file (checked before reading; a URL before it is cached).")
def command(source: str, as_json: bool, depth: int | None, tensors: bool, sha256: str | None) -> None:
    """Show the networks in an NVIDIA pickle, executing nothing.

    Prints the top-level keys and, for each network, its constructor kwargs, parameter counts,
    dtypes and sizes, and its module tree (class names and nesting).

    FILE_OR_URL is a StyleGAN2-ADA / EDM / EDM2 network pickle, a DMD2 / consistency-model state
    dict or a BigGAN-deep / DMD2 checkpoint folder (path, file:// or http(s):// URL; URLs are
    cached); inspect says what it is and how each command can use it. The file is read with a
    restricted unpickler: the module source stored in it is never executed, and files that reference
    anything outside the allow-list are refused.
    """
    if os.path.isdir(source) and is_biggan_folder(source):  # config and weights read, as refine reads them
        _, config, state = read_folder(Path(source))
        summary = {"file": source, "format": "BigGAN-deep folder", "usage": biggan_folder_usage(),
                   "config": dataclasses.asdict(config), "num_tensors": len(state),
                   "num_elements": sum(t.numel() for t in state.values())}
        text = "\n".join([f"folder: {source}  (BigGAN-deep; {summary['num_tensors']} tensors, "
                          f"{_count(summary['num_elements'])} elements)", "", *render_usage(summary["usage"]),
                          f"config.json: {json.dumps(summary['config'])}"])
        click.echo(json.dumps(summary, indent=1) if as_json else text)
        return
    if os.path.isdir(source):  # a DMD2 checkpoint folder holds pytorch_model.bin
        if not os.path.isfile(os.path.join(source, "pytorch_model.bin")):
            raise UserError(f"{source} is a folder without pytorch_model.bin; inspect takes a network file, a "
                            "BigGAN-deep folder (config.json + pytorch_model.bin) or a DMD2 checkpoint folder")
        source = os.path.join(source, "pytorch_model.bin")
    path = open_source(source, sha256=sha256)
    if is_torchscript(path):  # compiled code: described, never loaded
        usage = torchscript_usage()
        summary = {"file": str(path), "size_bytes": path.stat().st_size, "format": "TorchScript archive",
                   "usage": usage}
        text = "\n".join([f"file: {path}  ({_count(summary['size_bytes'])} bytes, TorchScript archive)", "",
                          *render_usage(usage)])
        click.echo(json.dumps(summary, indent=1) if as_json else text)
        return
    if is_torch_checkpoint(str(path)):
        summary = {"file": str(path), "size_bytes": path.stat().st_size, "format": "torch state dict",
                   "usage": state_dict_usage(str(path), str(path))}
        text = "\n".join([f"file: {path}  ({_count(summary['size_bytes'])} bytes, torch state dict; "
                          f"{summary['usage']['num_tensors']} tensors, "
                          f"{_count(summary['usage']['num_elements'])} elements, "
                          f"{', '.join(summary['usage']['dtypes'])})", "", *render_usage(summary["usage"])])
        if "architecture" in summary["usage"]:
            text += f"architecture (from tensor shapes): {json.dumps(jsonable(summary['usage']['architecture']))}\n"
        click.echo(json.dumps(jsonable(summary), indent=1) if as_json else text)
        return
    obj = nvpickle.load(path)
    summary = {"file": str(path), "size_bytes": path.stat().st_size,
               "pickle_protocol": nvpickle.pickle_protocol(path),
               "globals": sorted(f"{m}.{n}" for m, n in nvpickle.globals_in(path)), **summarize(obj),
               "usage": pickle_usage(obj)}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(render_text(summary, depth, tensors), nl=False)
