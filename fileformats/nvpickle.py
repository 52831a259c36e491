"""Safe reading and faithful re-writing of NVIDIA network pickles (StyleGAN2-ADA, EDM, ...).

Format (docs/pickle_formats.md §1): NVIDIA's `torch_utils.persistence` stores every network as
`_reconstruct_persistent_obj(meta)` with meta = {type: 'class', version: 6, module_src: <source text of
the defining module>, class_name, state: <the object's __dict__>}. NVIDIA's loader `exec`s module_src.
We never do: a restricted unpickler maps an explicit allow-list of globals (docs/pickle_formats.md §1.6) to harmless
stand-ins, each persistent object becomes an inert `PersistentObject` record, and tensor storages
(nested legacy torch.save streams) are decoded by `torch.load(weights_only=True)`. Anything else in
the stream is refused before it can run.

Writing (docs/pickle_formats.md §1.7) re-emits the records with the pure-Python pickler, naming the original globals, so
NVIDIA's own loader reads the result; module_src is carried over from the input file as opaque data.
Loading a file and dumping it again with the same protocol reproduces its bytes.

Hostile files that are not code are bounded too (`ReadLimits`): a length field may not claim more
bytes than the file still holds (checked before anything is allocated), a tensor storage may not
declare more elements than its stream carries, dict keys and set members may not be tuples (whose
hash recurses), and the loaded structure may not nest deeper than `max_depth` nor unfold (shared
references counted once per path, as every recursive walk meets them) into more than
`max_visits(file size)` nodes, nor contain a reference cycle. Each refusal is one `UserError`.
"""

from __future__ import annotations

import _compat_pickle
import copy
import io
import math
import os
import pickle
import pickletools
import re
import struct
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch

from common.errors import UserError
from fileformats.atomic import atomic_open
from fileformats.sources import open_source

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes]]

_SUPPORTED_PROTOCOLS = (2, 3, 4, 5)
_DEFAULT_PROTOCOL = 4  # what NVIDIA's code wrote under Python 3.8+ (EDM); SG2-ADA's published files: 3
_LEGACY_TORCH_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class SourceInfo:
    """How a loaded file was written; `dump` writes the same way by default."""

    protocol: int
    numpy_scalar_module: str | None  # 'numpy.core.multiarray' (numpy 1.x) or 'numpy._core.multiarray'


@dataclass(eq=False)
class PersistentObject:
    """One `torch_utils.persistence` record. `module_src` is opaque text and is never executed.

    `state` is the object's `__dict__` as stored (for an nn.Module: `_parameters`, `_buffers`,
    `_modules`, hook containers, plain attributes, then `_init_args` / `_init_kwargs`).
    """

    class_name: str
    module_src: str
    version: int
    state: dict
    meta: dict | None = field(default=None, repr=False)  # meta keys as read, and its 'type' value
    source: SourceInfo | None = field(default=None, repr=False)  # how the input file was written

    @property
    def init_args(self) -> tuple:
        return self.state.get("_init_args", ())

    @property
    def init_kwargs(self) -> dict:
        return self.state.get("_init_kwargs", {})

    def children(self) -> dict[str, Any]:
        """Direct submodules (`_modules`), None entries included, in stored order."""
        return node_children(self)

    def state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Parameters and persistent buffers with dotted names, ordered as nn.Module.state_dict()
        of the original object: own parameters, own buffers, then each child recursively."""
        return OrderedDict((name, t.detach()) for name, t, _ in _named_tensor_slots(self))

    def named_parameters(self) -> OrderedDict[str, torch.Tensor]:
        """Only the parameters (what NVIDIA's and the golden files' parameter counts count)."""
        return OrderedDict((name, t.detach()) for name, t, kind in _named_tensor_slots(self)
                           if kind == "parameter")

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` into the stored parameters/buffers in place. Keys, shapes and dtypes must
        match `state_dict()` exactly; on any mismatch nothing is changed."""
        slots = {name: tensor for name, tensor, _ in _named_tensor_slots(self)}
        missing = [k for k in slots if k not in tensors]
        unexpected = [k for k in tensors if k not in slots]
        if missing or unexpected:
            raise UserError(
                f"cannot load weights into {self.class_name}: "
                + (f"missing keys {_short_list(missing)}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected keys {_short_list(unexpected)}" if unexpected else "")
                + "; pass exactly the keys of state_dict()")
        for name, old in slots.items():
            new = tensors[name]
            if not isinstance(new, torch.Tensor) or new.shape != old.shape or new.dtype != old.dtype:
                got = (f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor)
                       else type(new).__name__)
                raise UserError(f"cannot load weights into {self.class_name}: '{name}' is "
                                f"{tuple(old.shape)} {old.dtype} in the file but {got} was given; "
                                "give a tensor of the same shape and dtype")
        with torch.no_grad():
            for name, old in slots.items():
                old.copy_(tensors[name])

    def __deepcopy__(self, memo: dict) -> PersistentObject:
        clone = PersistentObject(self.class_name, self.module_src, self.version, {}, self.meta, self.source)
        memo[id(self)] = clone
        clone.state = copy.deepcopy(self.state, memo)
        return clone

    def __reduce__(self):
        """Emit `_reconstruct_persistent_obj(meta)` exactly as torch_utils.persistence does."""
        meta = dict(self.meta) if self.meta is not None else {"type": "class"}
        meta.update(version=self.version, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)
        return _reconstruct_persistent_obj, (meta,)


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access); written back under that name."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    """Target of `torch_utils.persistence._reconstruct_persistent_obj`: builds an inert record."""
    if not isinstance(meta, dict):
        raise UserError(f"malformed persistent object: meta is {type(meta).__name__}, not a dict")
    fields = {"type": str, "version": int, "module_src": str, "class_name": str, "state": dict}
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind):
            raise UserError(f"malformed persistent object: meta[{key!r}] is "
                            f"{type(meta.get(key)).__name__}, expected {kind.__name__}")
    if meta["type"] != "class":
        raise UserError(f"unsupported persistent object type {meta['type']!r} (only 'class' exists)")
    # keep the keys as read (their order and identity matter for byte-exact re-writing) and any
    # value that is not a field of the record ('type'); the fields are filled in when writing
    layout = {k: (None if k in ("version", "module_src", "class_name", "state") else v)
              for k, v in meta.items()}
    return PersistentObject(class_name=meta["class_name"], module_src=meta["module_src"],
                            version=meta["version"], state=meta["state"], meta=layout)


# ---------------------------------------------------------------------------------------------------
# Walking module trees (PersistentObject records and plain torch containers such as ModuleDict)


def node_state(node: Any) -> dict | None:
    """The stored `__dict__` of a module node: a record's state, or a torch container's __dict__."""
    if isinstance(node, PersistentObject):
        return node.state
    if isinstance(node, torch.nn.Module):
        return node.__dict__
    return None


def node_children(node: Any) -> dict[str, Any]:
    """A node's `_modules` (records, torch containers or None), in stored order."""
    state = node_state(node)
    modules = state.get("_modules") if state is not None else None
    return dict(modules) if isinstance(modules, Mapping) else {}


def _named_tensor_slots(node: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, tensor, 'parameter' | 'buffer') in nn.Module.state_dict() order."""
    state = node_state(node)
    if state is None:
        return
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in params.items():
        if tensor is not None:
            yield prefix + name, tensor, "parameter"
    for name, tensor in buffers.items():
        if tensor is not None and name not in skip:
            yield prefix + name, tensor, "buffer"
    for name, child in node_children(node).items():
        if child is not None:
            yield from _named_tensor_slots(child, f"{prefix}{name}.")


def _short_list(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > n else ''}]"


# ---------------------------------------------------------------------------------------------------
# Bounds on what a file can make the reader (and any later walk of its contents) do


@dataclass(frozen=True)
class ReadLimits:
    """What a pickle may make us do. The published networks stay far inside: their structures nest
    about 17 levels deep and unfold into about one node per 600 bytes of file.

    max_depth: containers inside containers. Python's recursion (copy.deepcopy, pickling, any
        recursive walk) needs about three frames per level, and its limit is 1000 frames.
    visits_per_byte, min_visits: a walk of the loaded structure that does not remember what it saw
        (state_dict(), inspect's tree, JSON output) visits every node once per path to it; this
        many visits per byte of file plus a constant are allowed, so a structure that doubles
        through shared references is refused instead of taking exponential time and memory.
    """

    max_depth: int = 64
    visits_per_byte: float = 1 / 16
    min_visits: int = 1_000_000

    def max_visits(self, file_size: int) -> int:
        return self.min_visits + int(file_size * self.visits_per_byte)


LIMITS = ReadLimits()


class _BoundedFile:
    """Read access to a stream that refuses any read reaching past its end, before reading: a
    length field claiming 1 TiB in a small file is refused instead of allocated."""

    def __init__(self, f: IO[bytes], name: str, size: int):
        self._f = f
        self.name = name
        self.position = f.tell()
        self.size = size

    def remaining(self) -> int:
        return self.size - self.position

    def check_length(self, n: int, what: str = "a length field") -> None:
        if n > self.remaining():
            raise UserError(f"{self.name}: the file ends early at byte {self.size} (truncated download?): "
                            f"{what} near byte {self.position} claims {n:,} bytes but only "
                            f"{self.remaining():,} remain (limit: the file's size; nothing was allocated "
                            "or executed); download the file again")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self.check_length(n)
        data = self._f.read(n)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def readline(self) -> bytes:
        data = self._f.readline()
        self.position += len(data)
        return data


def _parts(node: Any) -> list:
    """What a walk of the loaded structure descends into: container items (dict keys and values),
    and the attributes of anything that has them (records, torch containers, tensors' state)."""
    if isinstance(node, dict):
        parts = [*node.keys(), *node.values()]
    elif isinstance(node, (list, tuple, set, frozenset)):
        parts = list(node)
    else:
        parts = []
    attributes = getattr(node, "__dict__", None)
    if isinstance(attributes, dict) and attributes:
        parts.append(attributes)
    return parts


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic, np.dtype)


def check_structure(obj: Any, name: str, file_size: int, limits: ReadLimits = LIMITS) -> None:
    """Refuse a loaded structure that is cyclic, nests deeper than limits.max_depth, or unfolds
    into more than limits.max_visits(file_size) nodes (visits of a walk that follows every
    reference). Iterative, one visit per distinct object: the unfolded size of a node is 1 plus
    that of its parts, memoized by identity, so 2**40 unfolded nodes cost 40 steps to count."""
    budget = limits.max_visits(file_size)
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            parts = _parts(node)
            inner = [p for p in parts if not isinstance(p, _ATOMS)]  # atoms count 1, depth 0
            size[key] = 1 + len(parts) - len(inner) + sum(size[id(p)] for p in inner)
            depth[key] = 1 + max((depth[id(p)] for p in inner), default=0)
            open_nodes.discard(key)
            if depth[key] > limits.max_depth:
                raise UserError(f"{name}: the data nests deeper than {limits.max_depth} levels (limit: "
                                "max_depth); network pickles nest about 17; the file was refused")
            if size[key] > budget:
                raise UserError(f"{name}: shared references make the data unfold into more than "
                                f"{budget:,} nodes (limit: {limits.min_visits:,} + file size / "
                                f"{round(1 / limits.visits_per_byte)}); the file was refused as hostile")
            continue
        if key in size or isinstance(node, _ATOMS):
            continue
        if key in open_nodes:
            raise UserError(f"{name}: the data contains a reference cycle ({type(node).__name__} inside "
                            "itself), which network pickles never have; the file was refused")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((p, False) for p in _parts(node) if not isinstance(p, _ATOMS))


def _check_hashed(keys: Any) -> None:
    """Dict keys and set members: a tuple's hash recurses through it (uncached), so a tuple built
    from shared references takes exponential time to hash. NVIDIA's pickles key by str and int."""
    if any(isinstance(k, tuple) for k in keys):
        raise UserError("refused: the file uses a tuple as a dict key or set member, which network "
                        "pickles never do (hashing it can take unbounded time); nothing in it was executed")


def _storage_stream_counts(payload: bytes) -> None:
    """Check a legacy torch.save stream of one storage before torch decodes it: five pickles (magic
    number, protocol version, system info, the storage's persistent id, its key list), then an
    int64 element count and the raw data (torch.serialization._legacy_save). torch allocates the
    storage from the count in the persistent id before reading any data, so every integer in that
    pickle and the trailing count must fit in the data bytes that follow. The persistent id names
    the storage class (torch.FloatStorage etc.); any other global is refused here already."""
    f = io.BytesIO(payload)
    counts: list[int] = []
    try:
        for index in range(5):
            for op, arg, _ in pickletools.genops(f):
                if index == 3 and op.name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                    counts.append(int(arg))
                elif op.name == "GLOBAL" and not re.fullmatch(r"torch \w+Storage", arg):
                    raise UserError(f"a tensor storage could not be decoded safely (it references "
                                    f"'{arg.replace(' ', '.')}'); the file is refused as unsafe or "
                                    "corrupt (nothing in it was executed)")
    except ValueError:
        raise UserError("a tensor storage is not a legacy torch.save stream; the file is refused as "
                        "unsafe or corrupt (nothing in it was executed)") from None
    data = len(payload) - f.tell() - 8
    if data >= 0:
        counts.append(int.from_bytes(payload[f.tell(): f.tell() + 8], "little", signed=True))
    if data < 0 or any(n < 0 or n > data for n in counts):
        raise UserError(f"a tensor storage declares {max(counts, default=0):,} elements but carries "
                        f"{max(data, 0):,} data bytes (limit: its stream's length); the file is "
                        "corrupt or hostile and was refused (nothing in it was executed)")


def _check_container_args(func: Any, args: Any) -> None:
    """set(items), OrderedDict(pairs), EasyDict(pairs) hash what they are given."""
    if not any(func is f for f in (set, OrderedDict, EasyDict)) or not isinstance(args, (tuple, list)) or not args:
        return
    items = args[0]
    if isinstance(items, (list, tuple, set, frozenset)):
        _check_hashed(items if func is set else
                      [pair[0] for pair in items if isinstance(pair, (list, tuple)) and pair])


# ---------------------------------------------------------------------------------------------------
# The allow-list (docs/pickle_formats.md §1.6): (module, name) -> what the stream gets instead


def _load_storage(payload: Any):
    """`torch.storage._load_from_bytes`: payload is a legacy torch.save stream of one storage."""
    if not isinstance(payload, bytes):
        raise UserError(f"malformed tensor storage: expected bytes, found {type(payload).__name__}")
    _storage_stream_counts(payload)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it references '{found.group(1)}'" if found else type(e).__name__
        raise UserError(f"a tensor storage could not be decoded safely ({reason}); "
                        "the file is refused as unsafe or corrupt (nothing in it was executed)") from None
    if not isinstance(storage, torch.TypedStorage):
        raise UserError(f"malformed tensor storage: decoded to {type(storage).__name__}")
    _remember_header(storage, payload)
    return storage


# Headers of the storage streams as read: untyped storage -> payload without its data bytes. The
# stream embeds an opaque key (torch used the storage's memory address), so re-writing a storage
# byte for byte needs its original header; the data bytes are always taken from the live storage.
_STORAGE_HEADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember_header(storage: torch.TypedStorage, payload: bytes) -> None:
    """Legacy layout: pickled header records, then int64 LE element count, then the raw data."""
    untyped = storage._untyped_storage
    nbytes = untyped.nbytes()
    numel = nbytes // torch.empty(0, dtype=storage.dtype).element_size()
    count = payload[len(payload) - nbytes - 8: len(payload) - nbytes]
    if len(payload) >= nbytes + 8 and count == struct.pack("<q", numel):
        _STORAGE_HEADERS[untyped] = (payload[: len(payload) - nbytes], storage.dtype)


def _storage_payload(storage: torch.TypedStorage) -> bytes | None:
    """The storage's stream with its original header, if it came from a loaded file."""
    untyped = storage._untyped_storage
    entry = _STORAGE_HEADERS.get(untyped)
    if entry is None or entry[1] != storage.dtype or untyped.device.type != "cpu":
        return None
    numel = untyped.nbytes() // torch.empty(0, dtype=storage.dtype).element_size()
    if entry[0][-8:] != struct.pack("<q", numel):  # resized since it was read
        return None
    data = torch.empty(0, dtype=torch.uint8).set_(untyped).numpy().tobytes()
    return entry[0] + data


def _fresh_payload(storage: torch.TypedStorage) -> bytes:
    """What torch writes for a storage (`TypedStorage.__reduce__`: a legacy torch.save stream), with the
    key "0" in its header instead of the storage's memory address, so equal tensors give equal bytes
    (the stream holds one storage; its loader only matches the key within the stream)."""
    buffer = io.BytesIO()
    torch.save(storage, buffer, _use_new_zipfile_serialization=False)
    payload, nbytes = buffer.getvalue(), storage._untyped_storage.nbytes()
    key = str(storage._untyped_storage._cdata).encode()
    header = payload[: len(payload) - nbytes].replace(b"X" + struct.pack("<I", len(key)) + key,
                                                      b"X" + struct.pack("<I", 1) + b"0")
    return header + payload[len(payload) - nbytes:]


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise UserError("a tensor in the file carries serialized hooks; the file is refused as unsafe")


def _rebuild_tensor(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """`torch._utils._rebuild_tensor_v2`, with checked arguments."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UserError(f"malformed tensor: storage is {type(storage).__name__}")
    _no_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
                                           OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """`torch._utils._rebuild_parameter[_with_state]`, with checked arguments. `state` (attributes
    set on the parameter) is refused unless empty: network parameters carry none."""
    if not isinstance(data, torch.Tensor):
        raise UserError(f"malformed parameter: data is {type(data).__name__}")
    _no_hooks(backward_hooks)
    if state and not (isinstance(state, tuple) and not any(state)):
        raise UserError("refused: a parameter in the file carries extra attributes, which network "
                        "pickles never do; the file is refused as unsafe (nothing in it was executed)")
    if state is None:
        return torch._utils._rebuild_parameter(data, requires_grad, OrderedDict())
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, OrderedDict(), state)


def _numpy_scalar(dtype, data=None):
    """`numpy.(_)core.multiarray.scalar`: a numpy scalar from raw bytes; object and structured
    dtypes refused."""
    if (not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None
            or not isinstance(data, bytes)):
        raise UserError("malformed numpy scalar in the file (object dtype or no raw bytes); "
                        "the file is refused as unsafe")
    return _REAL_NUMPY_SCALAR(dtype, data)


_MAX_NUMPY_ARRAY_BYTES = 1 << 20  # StyleGAN3 stores a few small attributes (sizes) as arrays
_NUMPY_ARRAY_KINDS = "biufc"  # bool, signed/unsigned int, float, complex: no object/structured/str


def _numpy_reconstruct(subtype, shape, typecode):
    """`numpy.(_)core.multiarray._reconstruct`: only the empty-ndarray call ndarray.__reduce__ emits;
    its data arrives in the BUILD that follows and is checked by `_check_numpy_array_state`."""
    if subtype is not np.ndarray or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise UserError("unexpected use of numpy's _reconstruct in the file (only plain ndarrays are "
                        "allowed); the file is refused as unsafe")
    return _REAL_NUMPY_RECONSTRUCT(np.ndarray, (0,), b"b")


def _check_numpy_array_state(state: Any) -> None:
    """ndarray.__setstate__ argument (version, shape, dtype, is_fortran, raw bytes): plain numeric
    dtypes and at most `_MAX_NUMPY_ARRAY_BYTES` of data, so no object can be unpickled into an array."""
    ok = (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
          and all(isinstance(n, int) and n >= 0 for n in state[1]) and isinstance(state[2], np.dtype))
    if not ok:
        raise UserError("malformed numpy array in the file; the file is refused as unsafe")
    _, shape, dtype, _, data = state
    if dtype.hasobject or dtype.kind not in _NUMPY_ARRAY_KINDS or dtype.fields is not None:
        raise UserError(f"refused: the file holds a numpy array of dtype {dtype} (only plain numeric "
                        "dtypes are allowed); the file is refused as unsafe (nothing in it was executed)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _MAX_NUMPY_ARRAY_BYTES:
        raise UserError(f"refused: the file holds a numpy array of shape {list(shape)} ({nbytes:,} bytes; "
                        f"network pickles store only small arrays, at most {_MAX_NUMPY_ARRAY_BYTES:,} bytes)")
    if not isinstance(data, bytes) or len(data) != nbytes:
        raise UserError(f"malformed numpy array in the file: shape {list(shape)} {dtype} needs {nbytes} "
                        "bytes of data; the file is refused as unsafe or corrupt")


def _numpy_dtype(spec, align=False, copy=True):
    """`numpy.dtype` as numpy pickles it: np.dtype('f8', False, True). Only a short type string, so
    no structured dtype (whose fields could nest or double) is built."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise UserError("unexpected use of numpy.dtype in the file (not a plain type code); "
                        "the file is refused as unsafe")
    return np.dtype(spec, align, copy)


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as protocol 2 uses it for bytes: only (str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UserError("unexpected use of _codecs.encode in the file; the file is refused as unsafe")
    return text.encode("latin1")


_REAL_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_REAL_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,  # protocol < 4 (protocol 2 writes __builtin__.set)
    ("_codecs", "encode"): _latin1_encode,  # bytes in protocol 2
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1.x writers
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x writers
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # small arrays (StyleGAN3)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("torch.nn.modules.container", "ModuleDict"): torch.nn.ModuleDict,  # EDM enc/dec
    ("torch.nn.modules.container", "ModuleList"): torch.nn.ModuleList,
    ("torch.nn.modules.container", "Sequential"): torch.nn.Sequential,
}


_CONSUMED = object()  # memo entry of a storage payload that was already decoded


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that resolves only allow-listed globals, never BUILDs onto a class
    or function (which could monkey-patch them), and reads through a `_BoundedFile`."""

    dispatch = dict(pickle._Unpickler.dispatch)
    numpy_scalar_module: str | None = None  # as named by the file

    def __init__(self, file: _BoundedFile):
        super().__init__(file)
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as the standard unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        target = _ALLOWED.get((module, name))
        if target is _numpy_scalar or target is _numpy_reconstruct:
            self.numpy_scalar_module = module
        if target is None:
            raise UserError(
                f"refused: the file references '{module}.{name}', which an NVIDIA network pickle "
                "never needs; the file is refused as unsafe (nothing in it was executed). "
                "Load only network pickles you got from a source you trust")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise UserError("refused: the file uses persistent ids (a torch.save checkpoint, not an "
                        "NVIDIA network pickle); nothing in it was executed")

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType,
                               PersistentObject, torch.Tensor)):
            what = next((f"{m}.{n}" for (m, n), obj in _ALLOWED.items() if obj is target),
                        type(target).__name__)
            raise UserError(f"refused: the file tries to set attributes on '{what}'; "
                            "the file is refused as unsafe (nothing in it was executed)")
        if isinstance(target, np.ndarray):
            _check_numpy_array_state(self.stack[-1])
        state = self.stack[-1]
        if isinstance(target, np.dtype) and isinstance(state, tuple) and any(
                x is not None for x in state[2:5]):  # (version, endian, subarray, names, fields, ...)
            raise UserError("refused: the file gives a numpy dtype a subarray or fields (a structured "
                            "dtype), which network pickles never hold; the file is refused as unsafe")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_reduce(self) -> None:
        """REDUCE; after a storage is decoded, drop the memo's references to its payload bytes (and
        their 1-tuple), which the pickler memoized but never references again. Otherwise the memo
        keeps every payload alive until the end of the load: a second copy of every tensor."""
        func, args = self.stack[-2], self.stack[-1]
        _check_container_args(func, args)
        super().load_reduce()
        if func is _load_storage:
            for key in range(len(self.memo) - 1, max(len(self.memo) - 4, -1), -1):
                if self.memo.get(key) is args or self.memo.get(key) is args[0]:
                    self.memo[key] = _CONSUMED

    dispatch[pickle.REDUCE[0]] = load_reduce

    # Everything that hashes what the stream gives it: keys and members are checked first
    # (_check_hashed). After MARK the pure-Python unpickler collects the marked items in self.stack.

    def load_setitem(self) -> None:
        _check_hashed(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self) -> None:
        _check_hashed(self.stack[0::2])
        super().load_setitems()

    def load_dict(self) -> None:
        _check_hashed(self.stack[0::2])
        super().load_dict()

    def load_additems(self) -> None:
        _check_hashed(self.stack)
        super().load_additems()

    def load_frozenset(self) -> None:
        _check_hashed(self.stack)
        super().load_frozenset()

    def _instantiate(self, klass: Any, args: list) -> None:
        _check_container_args(klass, args)
        super()._instantiate(klass, args)

    def load_bytearray8(self) -> None:
        n = struct.unpack("<Q", self.read(8))[0]
        self._file.check_length(n, "a BYTEARRAY8 length")
        data = bytearray(n)
        self.readinto(data)
        self.append(data)

    for _op, _method in ((pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                         (pickle.DICT, load_dict), (pickle.ADDITEMS, load_additems),
                         (pickle.FROZENSET, load_frozenset), (pickle.BYTEARRAY8, load_bytearray8)):
        dispatch[_op[0]] = _method
    del _op, _method


# ---------------------------------------------------------------------------------------------------
# Reading


def _open(source: Source) -> tuple[IO[bytes], str, bool]:
    """(binary file, display name, whether we opened it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), "<bytes>", True
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and "://" in text:
            text = str(open_source(text))
        path = Path(text)
        if not path.is_file():
            raise UserError(f"file not found: {path} (check the path)" if not path.exists()
                            else f"not a file: {path}")
        return open(path, "rb"), str(path), True
    if hasattr(source, "read"):
        if not (hasattr(source, "seekable") and source.seekable()):
            return io.BytesIO(source.read()), getattr(source, "name", "<stream>"), True
        return source, str(getattr(source, "name", "<stream>")), False
    raise TypeError(f"cannot read a pickle from {type(source).__name__}")


def _check_header(head: bytes, name: str) -> int:
    """The pickle protocol from the first bytes, or a UserError saying what the file is instead."""
    if not head:
        raise UserError(f"{name} is empty, not a network pickle")
    if head[:1] == pickle.PROTO and len(head) >= 2:
        proto = head[1]
        if proto in _SUPPORTED_PROTOCOLS:
            if head[2:4] == b"\x8a\x0a" and head[4:14] == _LEGACY_TORCH_MAGIC:
                raise UserError(f"{name} is a legacy torch.save checkpoint (a state_dict file), not an "
                                "NVIDIA network pickle")
            return proto
        raise UserError(f"{name}: unsupported pickle protocol {proto} (expected 2 to 5)")
    if head[:4] == b"PK\x03\x04":
        raise UserError(f"{name} is a zip archive (a torch.save checkpoint or a zip file), not an "
                        "NVIDIA network pickle")
    text = head.lstrip()[:1]
    looks = " (it looks like JSON or text)" if text in (b"{", b"[", b"<", b"#") or head.isascii() else ""
    raise UserError(f"{name} is not a pickle{looks}: it starts with {head[:16]!r}; "
                    "give a .pkl network snapshot")


def _size(f: IO[bytes]) -> int:
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end


def _load_stream(f: IO[bytes], name: str, limits: ReadLimits = LIMITS) -> tuple[Any, SourceInfo]:
    start = f.tell()
    proto = _check_header(f.read(16), name)
    f.seek(start)
    size = _size(f)
    unpickler = _RestrictedUnpickler(_BoundedFile(f, name, size))
    try:
        obj = unpickler.load()
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(f"{name}: ") else f"{name}: {e}") from None
    except Exception as e:
        f.seek(start)
        raise UserError(f"{name}: {_diagnose(_BoundedFile(f, name, size), size - start, e)}") from None
    check_structure(obj, name, size - start, limits)
    return obj, SourceInfo(proto, unpickler.numpy_scalar_module)


_RAN_OUT = re.compile(r"not enough data|but only \d+ remain|exhausted before seeing STOP|no newline found")


def _diagnose(f: _BoundedFile, size: int, error: Exception) -> str:
    """Why a stream failed to load: a second pass with pickletools (structure only) tells a file
    that ends early from one that is damaged inside."""
    position = 0
    try:
        for _, _, offset in pickletools.genops(f):
            position = offset
    except ValueError as e:
        if _RAN_OUT.search(str(e)):
            return f"the file ends early at byte {size} (truncated download?); download it again"
        at = re.search(r"at position (\d+)", str(e))
        return (f"corrupt pickle near byte {at.group(1) if at else position} ({e}); "
                "download or copy the file again")
    return (f"corrupt pickle ({type(error).__name__}: {str(error)[:200]}); "
            "download or copy the file again")


def load(source: Source) -> Any:
    """Read an NVIDIA network pickle safely. Returns the top-level object (usually a dict) with a
    `PersistentObject` in place of every persistent object; nothing from the file is executed.

    `source`: a path, a URL (through fileformats.sources), bytes, or a binary file object.
    Every record remembers how the file was written (`record.source`: protocol, numpy scalar
    module), and `dump` writes the same way unless told otherwise.
    """
    f, name, owned = _open(source)
    try:
        obj, info = _load_stream(f, name)
    finally:
        if owned:
            f.close()
    for record in records(obj):
        record.source = info
    return obj


def pickle_protocol(source: Source) -> int:
    """The pickle protocol a file was written with (from its PROTO opcode)."""
    f, name, owned = _open(source)
    try:
        return _check_header(f.read(16), name)
    finally:
        if owned:
            f.close()


def records(obj: Any) -> Iterator[PersistentObject]:
    """Every PersistentObject reachable through records, containers, torch modules and other objects'
    attributes (e.g. a generator that keeps the snapshot it was loaded from), each once."""
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, PersistentObject):
            yield item
            stack.append(item.state)
        elif isinstance(item, torch.nn.Module):
            stack.append(item.__dict__)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif (isinstance(getattr(item, "__dict__", None), dict)
              and not isinstance(item, (torch.Tensor, types.ModuleType))):
            stack.append(item.__dict__)


def globals_in(source: Source) -> set[tuple[str, str]]:
    """(module, name) of every global the outer pickle stream references, found by disassembly
    (pickletools; nothing is loaded). Storages' nested torch.save streams are not descended into."""
    f, name, owned = _open(source)
    try:
        _check_header(f.read(16), name)
        f.seek(0)
        found: set[tuple[str, str]] = set()
        memo: dict[int, Any] = {}
        recent: list[Any] = []  # values of the last pushes (strings where known)
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    module, _, attr = arg.partition(" ")
                    found.add((module, attr))
                elif op.name == "STACK_GLOBAL":
                    found.add((recent[-2], recent[-1]))
                if op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif op.stack_after:
                    recent.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
                del recent[:-2]
        except ValueError as e:
            raise UserError(f"{name}: corrupt or truncated pickle ({e})") from None
        return found
    finally:
        if owned:
            f.close()


# ---------------------------------------------------------------------------------------------------
# Writing


_NUMPY_SCALAR_MODULE = "numpy.core.multiarray"  # old numpy (NVIDIA's environments) cannot import numpy._core


class _Writer(pickle._Pickler):
    """Pure-Python pickler that writes our stand-ins under NVIDIA's global names (docs/pickle_formats.md §1.7)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: IO[bytes], protocol: int, numpy_scalar_module: str):
        super().__init__(file, protocol)
        self._aliases = {
            _reconstruct_persistent_obj: ("torch_utils.persistence", "_reconstruct_persistent_obj"),
            EasyDict: ("dnnlib.util", "EasyDict"),
            _REAL_NUMPY_SCALAR: (numpy_scalar_module, "scalar"),
            _REAL_NUMPY_RECONSTRUCT: (numpy_scalar_module, "_reconstruct"),
        }

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.TypedStorage):
            payload = _storage_payload(obj)
            return torch.storage._load_from_bytes, (payload if payload is not None else _fresh_payload(obj),)
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        alias = self._aliases.get(obj)
        if alias is None:
            return super().save_global(obj, name)
        module, qualname = alias
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)

    # plain functions are dispatched to the base class's save_global directly
    dispatch[types.FunctionType] = save_global


def source_info(obj: Any) -> SourceInfo | None:
    """How the file that `obj` was loaded from was written (None for objects built in memory)."""
    return next((r.source for r in records(obj) if r.source is not None), None)


def dump(obj: Any, file: str | os.PathLike | IO[bytes], protocol: int | None = None, *,
         numpy_scalar_module: str | None = None, overwrite: bool = False) -> None:
    """Write `obj` (as returned by `load`, tensors possibly changed) so NVIDIA's loader reads it.

    protocol: default = the protocol of the file the records were loaded from, else 4.
    numpy_scalar_module: the module numpy scalars are said to live in; default = what the input file
    said, else 'numpy.core.multiarray' (importable by numpy 1.x and 2.x; old numpy has no numpy._core).
    Unchanged input thus round-trips byte for byte. A path is written atomically and an existing
    file is refused unless overwrite=True.
    """
    info = source_info(obj)
    protocol = protocol or (info.protocol if info else _DEFAULT_PROTOCOL)
    if protocol not in _SUPPORTED_PROTOCOLS:
        raise UserError(f"pickle protocol {protocol} is not supported (use 2 to 5)")
    numpy_module = (numpy_scalar_module or (info.numpy_scalar_module if info else None)
                    or _NUMPY_SCALAR_MODULE)

    def write(f: IO[bytes]) -> None:
        _Writer(f, protocol, numpy_module).dump(obj)

    if hasattr(file, "write"):
        write(file)  # type: ignore[arg-type]
        return
    path = Path(file)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another output path (it is not overwritten)")
    with atomic_open(path, "wb") as f:
        write(f)


def dumps(obj: Any, protocol: int | None = None, **kwargs: Any) -> bytes:
    """`dump` into bytes."""
    buf = io.BytesIO()
    dump(obj, buf, protocol, **kwargs)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Describing


def _network_name(node: Any) -> str:
    if isinstance(node, PersistentObject):
        inner = node.children().get("model")
        return f"{node.class_name}({_network_name(inner)})" if inner is not None else node.class_name
    return type(node).__name__


def describe(obj: Any) -> str:
    """One line saying what kind of file this is, for error messages of the loaders."""
    if isinstance(obj, PersistentObject):
        return f"a single network ({_network_name(obj)})"
    if not isinstance(obj, dict):
        return f"a pickle of {type(obj).__name__}, not a network snapshot"
    parts = ", ".join(f"{k}: {_network_name(v)}" if isinstance(v, PersistentObject) else f"{k}"
                      for k, v in obj.items())
    keys = set(obj)
    if {"G", "D", "G_ema"} <= keys:
        kind = "StyleGAN2-ADA/StyleGAN3 snapshot"
    elif "ema" in keys:
        kind = "EDM snapshot"
    elif any(isinstance(v, PersistentObject) for v in obj.values()):
        kind = "network pickle"
    else:
        kind = "pickle without networks"
    return f"{kind} ({parts})"
