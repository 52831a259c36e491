"""A corpus of hostile network pickles, generated (never committed) for the tests of every command that
reads pickles (tests/test_hostile_corpus.py).

Two families:
- code: each file tries to run something that creates the canary file (os.system, eval, exec,
  subprocess, getattr, INST / OBJ / NEWOBJ / STACK_GLOBAL / EXT / BUILD tricks, torch's rebuild
  functions with hooks or attributes, persistent ids, storage streams and zip files carrying code,
  module sources that write the canary);
- resources: files that are not code but try to exhaust memory, time or the stack (shared references
  doubling 40 times, nesting thousands deep, tuple keys whose hash doubles, cycles, length fields
  claiming 1 TiB, storages declaring 2**36 elements, absurd constructor arguments, truncated files,
  wrong protocols).

`corpus(canary, data)` returns the cases; `python tests/make_hostile_corpus.py DIR` writes them to DIR.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from fileformats import nvpickle

DATA = Path(__file__).parent / "data"

# What a case holds, which decides what each command must do with it:
# 'file'       refused while reading the file, by every command;
# 'edm-args'   a readable EDM file with absurd constructor arguments: refused when a network is built;
# 'sg2-args'   the same for a StyleGAN2-ADA generator;
# 'edm-source' / 'sg2-source'  a readable network whose stored module source writes the canary:
#              never run; reported by inspect, refused by a command that would write it into a new file.
SCOPES = ("file", "edm-args", "sg2-args", "edm-source", "sg2-source")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    refusal: str  # regex the one-line error must match
    scope: str = "file"


class _Reduce:
    """Pickles as func(*args): how an attacker makes a pickle call something."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _storage_stream(tensor: torch.Tensor) -> bytes:
    """The legacy torch.save stream that torch.storage._load_from_bytes reads (what NVIDIA's pickles embed)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what the pickles hold
        warnings.simplefilter("ignore")
        torch.save(tensor.storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _claim_elements(stream: bytes, count: int) -> bytes:
    """The stream with the element count in its storage's persistent id replaced by `count`."""
    f = io.BytesIO(stream)
    for index in range(5):
        for op, _, pos in pickletools.genops(f):
            if index == 3 and op.name == "BININT1":
                return stream[:pos] + b"\x8a\x08" + count.to_bytes(8, "little", signed=True) + stream[pos + 2:]
    raise AssertionError("no element count found")


def _doubling(levels: int = 40) -> list:
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return x


def _deep_list(depth: int) -> bytes:
    """A list nested `depth` deep, written without recursion: EMPTY_LIST x depth, then APPEND x depth-1."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def _with_record_attribute(path: Path, key: str, name: str, value) -> bytes:
    data = _network(path, key)
    data[key].state[name] = value
    return _dump_deep(data)


def _dump_deep(data) -> bytes:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        return nvpickle.dumps(data)
    finally:
        sys.setrecursionlimit(limit)


def _network(path: Path, key: str) -> dict:
    """Only the network of a fixture that the loaders read (smaller files, quicker to write)."""
    return {key: nvpickle.load(path)[key]}


def _edm_generator_file(**init_kwargs) -> bytes:
    """The EDM fixture's network with refiner's one-step metadata (so generator commands build it too)
    and `init_kwargs` overriding the stored arguments."""
    data = _network(DATA / "edm-small-ddpmpp-edm-cond.pkl", "ema")
    data["ema"].init_kwargs.update(init_kwargs)
    data["refiner"] = {"format": "refiner-one-step-generator/1", "sigma_init": 1.0}
    return nvpickle.dumps(data)


def _sg2_file(group: str | None, **kwargs) -> bytes:
    data = _network(DATA / "sg2ada-small-uncond.pkl", "G_ema")
    target = data["G_ema"].init_kwargs if group is None else data["G_ema"].init_kwargs[group]
    target.update(kwargs)
    return nvpickle.dumps(data)


def _with_source(path: Path, key: str, source: str) -> bytes:
    data = _network(path, key)
    for record in nvpickle.records(data):
        record.module_src = source
    return nvpickle.dumps(data)


def _torch_zip_with(payload: bytes) -> bytes:
    """A torch.save zip archive whose data.pkl is `payload`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def corpus(canary: Path) -> list[Case]:
    touch = f"touch {canary}"
    write = f"open({str(canary)!r}, 'w').write('ran')"
    system = f"{os.system.__module__}.system"
    storage = _storage_stream(torch.arange(3, dtype=torch.float32))
    evil_storage = io.BytesIO()
    torch.save(_Reduce(os.system, touch), evil_storage, _use_new_zipfile_serialization=False)
    zip_storage = io.BytesIO()
    torch.save(torch.zeros(3).untyped_storage(), zip_storage)
    tensor = nvpickle.dumps(torch.zeros(2), 2)
    hooks = OrderedDict([(0, OrderedDict)])  # an allowed callable as a hook
    tuple_key: tuple = ()
    for _ in range(40):
        tuple_key = (tuple_key, tuple_key)
    key = pickle.dumps(tuple_key, 2)[2:-1]  # never hashed here: a dict or set of it would take 2**40 steps
    cycle: list = []
    cycle.append(cycle)
    deep_attr: list = []
    for _ in range(300):
        deep_attr = [deep_attr]
    tib = 2**40
    edm_src = f"import os\nos.system({touch!r})\nclass EDMPrecond:\n    pass\n"
    sg2_src = f"import os\nos.system({touch!r})\nclass Generator:\n    pass\n"
    return [
        # ---- code
        Case("os-system", pickle.dumps(_Reduce(os.system, touch), 4), system),
        Case("eval", pickle.dumps(_Reduce(builtins.eval, write), 4), "builtins.eval"),
        Case("exec-python2-name", pickle.dumps(_Reduce(builtins.exec, write), 2), "builtins.exec"),
        Case("subprocess", pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(canary)]), 3), "subprocess.Popen"),
        Case("getattr-builtins", _proto2(b"cbuiltins\ngetattr\ncbuiltins\nobject\n" + _unicode("__subclasses__")
                                         + b"\x86R."), "builtins.getattr"),
        Case("inst", _proto2(b"(" + _unicode(touch) + b"ios\nsystem\n."), "os.system"),
        Case("obj", _proto2(b"(cos\nsystem\n" + _unicode(touch) + b"o."), "os.system"),
        Case("newobj", _proto2(b"cos\nsystem\n" + _unicode(touch) + b"\x85\x81."), "os.system"),
        Case("stack-global-from-memo", b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93"
             + b"\x8c" + bytes([len(touch)]) + touch.encode() + b"\x85R.", "os.system"),
        Case("dotted-name", _proto2(b"ctorch._utils\n_rebuild_tensor_v2.__globals__\n."), "__globals__"),
        Case("ext-opcode", _proto2(b"\x82\x01."), "corrupt"),
        Case("build-on-function", _proto2(b"ctorch._utils\n_rebuild_tensor_v2\nN}" + _unicode("__code__")
                                          + b"K\x01s\x86b."), "set attributes"),
        Case("build-on-class", _proto2(b"cdnnlib.util\nEasyDict\nN}" + _unicode("__reduce__")
                                       + b"K\x01s\x86b."), "set attributes"),
        Case("build-on-tensor", tensor[:-1] + b"N}\x86b.", "set attributes"),
        Case("tensor-hooks", pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, torch.zeros(2).untyped_storage(), 0,
                                                  (2,), (1,), False, hooks), 2), "hooks"),
        Case("parameter-attributes", pickle.dumps(_Reduce(torch._utils._rebuild_parameter_with_state,
                                                          torch.zeros(2), False, OrderedDict(), {"grad": 1}), 2),
             "extra attributes"),
        Case("persistent-id", _proto2(_unicode(touch) + b"Q."), "persistent ids"),
        Case("storage-with-code", pickle.dumps(_Reduce(torch.storage._load_from_bytes, evil_storage.getvalue()), 4),
             system),
        Case("storage-zip-payload", pickle.dumps(_Reduce(torch.storage._load_from_bytes, zip_storage.getvalue()), 4),
             "not a legacy torch.save stream"),
        Case("torch-zip-with-code", _torch_zip_with(pickle.dumps(_Reduce(os.system, touch), 2)),
             r"zip archive|other than tensors and plain data, which are never loaded|is a torch state dict"),
        Case("codecs-misuse", _proto2(b"c_codecs\nencode\n" + _unicode("x") + _unicode("zlib") + b"\x86R."),
             "_codecs.encode"),
        Case("numpy-object-scalar", _proto2(b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n" + _unicode("O")
                                            + b"\x85R" + _unicode("x") + b"\x86R."), "object"),
        Case("numpy-structured-dtype", _proto2(b"cnumpy\ndtype\n]" + _unicode("a") + _unicode("f8")
                                               + b"\x86a\x85R."), "numpy.dtype"),
        Case("edm-module-source", _with_source(DATA / "edm-small-ddpmpp-edm-cond.pkl", "ema", edm_src),
             "not a known release", "edm-source"),
        Case("sg2-module-source", _with_source(DATA / "sg2ada-small-uncond.pkl", "G_ema", sg2_src),
             "not a known release", "sg2-source"),
        # ---- resources
        Case("doubling-references", pickle.dumps({"G_ema": _doubling()}, 4), "unfold into more than"),
        Case("doubling-in-teacher", _with_record_attribute(DATA / "edm-small-ddpmpp-edm-cond.pkl", "ema", "x",
                                                           _doubling()), "unfold into more than"),
        Case("deep-nesting", _deep_list(5000), "nests deeper than 64"),
        Case("deep-nesting-in-teacher", _with_record_attribute(DATA / "edm-small-ddpmpp-edm-cond.pkl", "ema", "x",
                                                               deep_attr), "nests deeper than 64"),
        Case("doubling-tuple-key", _proto2(b"}" + key + b"K\x01s."), "tuple as a dict key"),
        Case("doubling-tuple-in-set", _proto2(b"\x8f(" + key + b"\x90."), "tuple as a dict key or set member"),
        Case("cycle", pickle.dumps({"G_ema": cycle}, 4), "reference cycle"),
        Case("unicode-1tib", b"\x80\x04\x8d" + struct.pack("<Q", tib) + b"abc.", "claims 1,099,511,627,776 bytes"),
        Case("unicode-4gib", _proto2(b"X\xff\xff\xff\xffabc."), "claims 4,294,967,295 bytes"),
        Case("bytes-1tib", b"\x80\x04\x8e" + struct.pack("<Q", tib) + b"abc.", "claims 1,099,511,627,776 bytes"),
        Case("bytearray-1tib", b"\x80\x05\x96" + struct.pack("<Q", tib) + b"abc.", "claims 1,099,511,627,776 bytes"),
        Case("frame-1tib", b"\x80\x04\x95" + struct.pack("<Q", tib) + b"N.", "claims 1,099,511,627,776 bytes"),
        Case("storage-2**36-elements", pickle.dumps(_Reduce(torch.storage._load_from_bytes,
                                                            _claim_elements(storage, 2**36)), 2),
             "declares 68,719,476,736 elements"),
        Case("huge-text-int", _proto2(b"L" + b"9" * 100_000 + b"L\n."), "corrupt"),
        Case("truncated", (DATA / "edm-small-ddpmpp-edm-cond.pkl").read_bytes()[:400_000], "ends early"),
        Case("protocol-9", b"\x80\x09N.", "unsupported pickle protocol 9"),
        Case("protocol-0", b"(dp0\n.", "not a pickle|cannot read it as a torch file"),
        Case("edm-model-channels-2**20", _edm_generator_file(model_channels=2**20),
             r"model_channels = 1048576 is outside .* \(an integer from 1 to 4,096\)", "edm-args"),
        Case("edm-resolution-2**40", _edm_generator_file(img_resolution=2**40), "img_resolution", "edm-args"),
        Case("edm-channel-mult-long", _edm_generator_file(channel_mult=[1] * 10_000), "channel_mult", "edm-args"),
        Case("edm-arguments-bigger-than-file", _edm_generator_file(model_channels=4096, num_blocks=8),
             "do not fit EDMPrecond", "edm-args"),
        Case("sg2-channel-base-2**40", _sg2_file("synthesis_kwargs", channel_base=2**40), "channel_base", "sg2-args"),
        Case("sg2-z-dim-2**31", _sg2_file(None, z_dim=2**31), "z_dim", "sg2-args"),
        Case("sg2-mapping-layers-10**6", _sg2_file("mapping_kwargs", num_layers=10**6), "num_layers", "sg2-args"),
        Case("sg2-arguments-bigger-than-file", _sg2_file("synthesis_kwargs", channel_max=4096, channel_base=2**20),
             "do not match a generator built from its constructor arguments", "sg2-args"),
    ]


def write_corpus(directory: Path, canary: Path) -> dict[str, tuple[Path, Case]]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for case in corpus(canary):
        path = directory / f"{case.name}.pkl"
        path.write_bytes(case.data)
        out[case.name] = (path, case)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    files = write_corpus(target, target / "CANARY")
    print(f"{len(files)} files in {target}; none of them may create {target / 'CANARY'}")
