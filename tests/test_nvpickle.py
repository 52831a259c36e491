"""fileformats.nvpickle: safe loading of the golden NVIDIA pickles, byte-exact re-writing, refusal
of anything outside the allow-list (with a canary file proving nothing ran), clear errors for
files that are not (complete) pickles."""

from __future__ import annotations

import builtins
import copy
import io
import json
import os
import pickle
import pickletools
import subprocess
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from fileformats import nvpickle
from fileformats.nvpickle import EasyDict, PersistentObject
from tests.helpers import assert_same

DATA = Path(__file__).parent / "data"
SG2 = DATA / "sg2ada-small-uncond.pkl"
EDM_COND = DATA / "edm-small-ddpmpp-edm-cond.pkl"
EDM_UNCOND = DATA / "edm-small-ncsnpp-edm-uncond.pkl"
FIXTURES = [SG2, EDM_COND, EDM_UNCOND]

# Globals listed in tests/data/README.md.
COMMON_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
    ("collections", "OrderedDict"), ("numpy", "dtype"), ("numpy._core.multiarray", "scalar"),
}


@pytest.fixture(scope="module")
def loaded() -> dict[Path, object]:
    return {path: nvpickle.load(path) for path in FIXTURES}


def ref(path: Path) -> dict:
    return torch.load(path.with_suffix(".ref.pt"), weights_only=True)


def n_params(record: PersistentObject) -> int:
    return sum(t.numel() for t in record.named_parameters().values())




def as_torch_module(node) -> torch.nn.Module:
    """The same tree as real nn.Modules, so torch itself says what state_dict() must give."""
    state = nvpickle.node_state(node)
    module = torch.nn.Module()
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, t in state["_parameters"].items():
        module.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
    for name, t in state["_buffers"].items():
        module.register_buffer(name, t, persistent=name not in skip)
    for name, child in state["_modules"].items():
        module.add_module(name, None if child is None else as_torch_module(child))
    return module


# --------------------------------------------------------------------------------------------------
# Reading the golden fixtures


def test_sg2ada_fixture_contents(loaded):
    data, golden = loaded[SG2], ref(SG2)
    assert list(data) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    assert data["training_set_kwargs"] == json.loads(golden["training_set_kwargs"])
    assert [data[k].class_name for k in ("G", "D", "G_ema", "augment_pipe")] == [
        "Generator", "Discriminator", "Generator", "AugmentPipe"]
    assert n_params(data["G_ema"]) == golden["n_params_G_ema"] == 263_987
    assert n_params(data["G"]) == 263_987
    assert n_params(data["D"]) == golden["n_params_D"] == 278_753
    g_ema = data["G_ema"]
    assert type(g_ema.init_kwargs["mapping_kwargs"]) is EasyDict
    assert g_ema.init_kwargs["mapping_kwargs"].num_layers == 2
    assert g_ema.children()["synthesis"].state["num_ws"] == golden["num_ws"]
    state_dict = g_ema.state_dict()
    assert state_dict["mapping.w_avg"].shape == (64,)
    assert state_dict["synthesis.b32.torgb.bias"].shape == (3,)
    assert state_dict["synthesis.b4.conv1.noise_const"].shape == (4, 4)
    assert not torch.equal(state_dict["mapping.fc0.weight"], data["G"].state_dict()["mapping.fc0.weight"])
    assert data["augment_pipe"].state_dict()["p"].item() == pytest.approx(0.2)
    weight_gain = g_ema.children()["mapping"].children()["fc0"].state["weight_gain"]
    assert type(weight_gain) is np.float64 and weight_gain == pytest.approx(0.01 / 8)


@pytest.mark.parametrize("path", [EDM_COND, EDM_UNCOND], ids=lambda p: p.stem)
def test_edm_fixture_contents(loaded, path):
    data, golden = loaded[path], ref(path)
    assert list(data) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = data["ema"]
    assert (ema.class_name, ema.children()["model"].class_name) == ("EDMPrecond", "SongUNet")
    assert n_params(ema) == golden["n_params"]
    assert ema.state["label_dim"] == golden["label_dim"]
    assert ema.state["sigma_max"] == golden["sigma_max"].item() == float("inf")
    assert ema.init_kwargs["augment_dim"] == golden["augment_dim"]
    enc = ema.children()["model"].children()["enc"]
    assert type(enc) is torch.nn.ModuleDict
    keys = ema.state_dict().keys()
    assert "model.enc.16x16_conv.weight" in keys and "model.dec.16x16_aux_conv.bias" in keys
    assert ("model.map_noise.freqs" in keys) == (path == EDM_UNCOND)  # Fourier embedding buffer
    assert ("model.enc.8x8_aux_residual.weight" in keys) == (path == EDM_UNCOND)
    assert ("model.map_label.weight" in keys) == (path == EDM_COND)
    assert data["loss_fn"].state_dict() == OrderedDict() and data["loss_fn"].state["P_mean"] == -1.2


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_state_dict_matches_torch_order_and_values(loaded, path):
    for key, record in loaded[path].items():
        if isinstance(record, PersistentObject) and "_parameters" in record.state:
            expected = as_torch_module(record).state_dict()
            got = record.state_dict()
            assert list(got) == list(expected), key
            for name in expected:
                assert got[name].data_ptr() == expected[name].data_ptr(), name  # the stored tensors


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_globals_in_fixtures_match_readme(path):
    extra = {("dnnlib.util", "EasyDict")} if path == SG2 else {("torch.nn.modules.container", "ModuleDict")}
    assert nvpickle.globals_in(path) == COMMON_GLOBALS | extra


def test_describe(loaded):
    assert nvpickle.describe(loaded[SG2]).startswith("StyleGAN2-ADA")
    assert nvpickle.describe(loaded[EDM_COND]).startswith("EDM snapshot (ema: EDMPrecond(SongUNet)")
    assert "not a network" in nvpickle.describe([1, 2])


def test_load_accepts_path_bytes_and_file_object(loaded):
    raw = EDM_COND.read_bytes()
    with open(EDM_COND, "rb") as f:
        from_file = nvpickle.load(f)
    assert_same(nvpickle.load(raw), loaded[EDM_COND])
    assert_same(from_file, loaded[EDM_COND])
    assert_same(nvpickle.load(str(EDM_COND)), loaded[EDM_COND])
    assert_same(nvpickle.load(EDM_COND.resolve().as_uri()), loaded[EDM_COND])


# --------------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_round_trip_reproduces_bytes(path):
    data = nvpickle.load(path)
    assert nvpickle.source_info(data) == nvpickle.SourceInfo(4, "numpy._core.multiarray")
    assert nvpickle.dumps(data) == path.read_bytes()


def test_numpy_1_scalar_name_changes_only_that_global(loaded):
    out = nvpickle.dumps(loaded[EDM_COND], numpy_scalar_module="numpy.core.multiarray")
    renamed = (nvpickle.globals_in(EDM_COND) - {("numpy._core.multiarray", "scalar")}) | {
        ("numpy.core.multiarray", "scalar")}
    assert nvpickle.globals_in(out) == renamed
    assert_same(nvpickle.load(out), loaded[EDM_COND])
    # a freshly built record (no source file) gets the name every numpy version can import
    fresh = PersistentObject("X", "", 6, {"gain": np.float64(0.5)})
    assert ("numpy.core.multiarray", "scalar") in nvpickle.globals_in(nvpickle.dumps(fresh))


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_other_protocols_load_identically(loaded, protocol):
    out = nvpickle.dumps(loaded[EDM_COND], protocol)
    assert nvpickle.pickle_protocol(out) == protocol
    again = nvpickle.load(out)
    assert_same(again, loaded[EDM_COND])
    assert nvpickle.dumps(again) == out  # the protocol of the input is kept by default
    names = nvpickle.globals_in(out)
    if protocol == 2:
        assert {("__builtin__", "set"), ("_codecs", "encode")} <= names
    elif protocol == 3:
        assert ("builtins", "set") in names


def old_layout(node) -> None:
    """Rewrite a module's state the way torch 1.7 pickled it (OrderedDicts, fewer hook keys)."""
    state = nvpickle.node_state(node)
    if "_parameters" not in state:
        return
    for child in state["_modules"].values():
        if child is not None:
            old_layout(child)
    old_keys = ["training", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks",
                "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules"]
    own = {k: v for k, v in state.items() if not k.startswith("_") and k != "training"
           or k in ("_init_args", "_init_kwargs")}
    rebuilt = {k: (OrderedDict(state[k]) if k in ("_parameters", "_buffers", "_modules") else state[k])
               for k in old_keys}
    state.clear()
    state.update(rebuilt, **own)


def test_old_torch_layout(loaded):
    data = nvpickle.load(EDM_COND)
    expected = data["ema"].state_dict()
    old_layout(data["ema"])
    old = nvpickle.load(nvpickle.dumps(data, 3))
    ema = old["ema"]
    assert type(ema.state["_parameters"]) is OrderedDict and "_non_persistent_buffers_set" not in ema.state
    got = ema.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert n_params(ema) == n_params(loaded[EDM_COND]["ema"])


def test_load_state_dict_and_write_back(tmp_path, loaded):
    data = nvpickle.load(EDM_COND)
    ema = data["ema"]
    changed = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.load_state_dict(changed)
    out = tmp_path / "refined.pkl"
    nvpickle.dump(data, out)
    again = nvpickle.load(out)
    assert all(torch.equal(again["ema"].state_dict()[k], changed[k]) for k in changed)
    layer = again["ema"].children()["model"].children()["map_layer0"]
    assert type(layer.state["_parameters"]["weight"]) is torch.nn.Parameter
    assert_same(again["augment_pipe"], loaded[EDM_COND]["augment_pipe"])
    assert nvpickle.globals_in(out) == nvpickle.globals_in(EDM_COND)
    with pytest.raises(UserError, match="already exists"):
        nvpickle.dump(data, out)
    assert nvpickle.load(out)["ema"].state_dict().keys() == changed.keys()


def test_load_state_dict_rejects_mismatches(loaded):
    record = copy.deepcopy(loaded[EDM_COND]["ema"])
    tensors = dict(record.state_dict())
    before = {k: v.clone() for k, v in tensors.items()}
    bad_shape = {**tensors, "model.map_layer0.weight": torch.zeros(3)}
    with pytest.raises(UserError, match=r"'model\.map_layer0\.weight' is \(64, 16\) torch.float32"):
        record.load_state_dict({k: (v + 1 if k != "model.map_layer0.weight" else v)
                                for k, v in bad_shape.items()})
    assert all(torch.equal(record.state_dict()[k], before[k]) for k in before)  # nothing changed
    with pytest.raises(UserError, match=r"'model\.map_layer0\.bias'.*dtype"):
        record.load_state_dict({**tensors, "model.map_layer0.bias": torch.zeros(64, dtype=torch.float64)})
    missing = {k: v for k, v in tensors.items() if k != "sigma_data"}
    missing.pop("model.dec.16x16_aux_conv.bias")
    with pytest.raises(UserError, match=r"missing keys \['model\.dec\.16x16_aux_conv\.bias'\]"):
        record.load_state_dict(missing)
    with pytest.raises(UserError, match=r"unexpected keys \['extra'\]"):
        record.load_state_dict({**tensors, "extra": torch.zeros(1)})


def test_deepcopy_of_record_is_independent(loaded):
    record = loaded[EDM_COND]["ema"]
    clone = copy.deepcopy(record)
    assert_same(clone, record)
    assert clone.source == record.source and clone.module_src is record.module_src
    next(iter(clone.state_dict().values())).add_(1)
    assert not torch.equal(next(iter(clone.state_dict().values())), next(iter(record.state_dict().values())))


# --------------------------------------------------------------------------------------------------
# Refusing unsafe pickles: a canary file would appear if anything ran


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _raw_global(module: str, name: str, tail: bytes = b")R.") -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + tail


def _malicious(canary: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, text the refusal must contain)."""
    write = f"open({str(canary)!r}, 'w').write('ran')"
    legacy_evil = io.BytesIO()
    torch.save(_Reduce(os.system, f"touch {canary}"), legacy_evil, _use_new_zipfile_serialization=False)
    return {
        "os.system": (pickle.dumps(_Reduce(os.system, f"touch {canary}"), 4),
                      f"{os.system.__module__}.system"),
        "builtins.eval": (pickle.dumps(_Reduce(builtins.eval, write), 4), "builtins.eval"),
        "builtins.exec": (pickle.dumps(_Reduce(builtins.exec, write), 2), "builtins.exec"),
        "subprocess.Popen": (pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(canary)]), 3),
                             "subprocess.Popen"),
        "unknown class": (_raw_global("training.networks", "Generator"), "training.networks.Generator"),
        "nested in a record": (nvpickle.dumps({"G": PersistentObject("G", "", 6, {"x": _Reduce(
            builtins.exec, write)})}), "builtins.exec"),
        "storage stream": (pickle.dumps(_Reduce(torch.storage._load_from_bytes, legacy_evil.getvalue()), 4),
                           f"could not be decoded safely (it references '{os.system.__module__}.system')"),
        "build on a function": (_raw_global("torch._utils", "_rebuild_tensor_v2",
                                            b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."),
                                "set attributes on 'torch._utils._rebuild_tensor_v2'"),
        "build on a class": (_raw_global("dnnlib.util", "EasyDict",
                                         b"N}X\x07\x00\x00\x00__new__K\x01s\x86b."),
                             "set attributes on 'dnnlib.util.EasyDict'"),
        "persistent id": (b"\x80\x02X\x01\x00\x00\x00xQ.", "persistent ids"),
        "codecs misuse": (_raw_global("_codecs", "encode", b"X\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."),
                          "_codecs.encode"),
        "object scalar": (_raw_global("numpy.core.multiarray", "scalar",
                                      b"cnumpy\ndtype\nX\x01\x00\x00\x00O\x85RX\x01\x00\x00\x00x\x86R."),
                          "object dtype"),
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "unknown class", "nested in a record", "storage stream",
                                  "build on a function", "build on a class", "persistent id",
                                  "codecs misuse", "object scalar"])
def test_unsafe_pickles_are_refused(tmp_path, case):
    canary = tmp_path / "canary"
    payload, needle = _malicious(canary)[case]
    source = tmp_path / "evil.pkl"
    source.write_bytes(payload)
    with pytest.raises(UserError) as info:
        nvpickle.load(source)
    message = str(info.value)
    assert needle in message
    assert "unsafe" in message or "refused" in message
    assert "\n" not in message
    assert not canary.exists()


def test_module_src_is_never_executed(tmp_path):
    canary = tmp_path / "canary"
    src = f"open({str(canary)!r}, 'w').write('ran')\nclass Net:\n    pass\n"
    data = nvpickle.load(nvpickle.dumps({"G": PersistentObject("Net", src, 6, {"a": 1})}, 4))
    assert data["G"].module_src == src and data["G"].state == {"a": 1}
    assert not canary.exists()


# --------------------------------------------------------------------------------------------------
# Files that are not (complete) pickles


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file(tmp_path, cut):
    raw = EDM_COND.read_bytes()
    n = int(len(raw) * cut)
    with pytest.raises(UserError, match=rf"ends early at byte {n} \(truncated download\?\)"):
        nvpickle.load(_write(tmp_path, "short.pkl", raw[:n]))


def test_missing_stop_opcode(tmp_path):
    raw = EDM_COND.read_bytes()
    with pytest.raises(UserError, match=rf"ends early at byte {len(raw) - 1}"):
        nvpickle.load(raw[:-1])


def test_damage_inside_is_not_called_truncation():
    raw = bytearray(EDM_COND.read_bytes())
    position = next(pos for op, _, pos in pickletools.genops(bytes(raw)) if op.name == "STACK_GLOBAL")
    raw[position] = 0xFF  # no such opcode
    with pytest.raises(UserError, match=rf"corrupt pickle near byte {position} "):
        nvpickle.load(bytes(raw))


def test_not_pickles(tmp_path):
    rng = np.random.default_rng(0)
    noise = bytes([0x13]) + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases = {
        "noise.bin": (noise, "is not a pickle"),
        "noise.pkl": (b"\x80\x04" + noise, "corrupt pickle near byte|ends early"),
        "data.json": (json.dumps({"G": [1, 2]}).encode(), r"not a pickle \(it looks like JSON or text\)"),
        "empty.pkl": (b"", "is empty"),
        "proto9.pkl": (b"\x80\x09N.", "unsupported pickle protocol 9"),
    }
    for name, (content, pattern) in cases.items():
        with pytest.raises(UserError, match=pattern):
            nvpickle.load(_write(tmp_path, name, content))
    zip_path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(2)}, zip_path)
    assert zipfile.is_zipfile(zip_path)
    with pytest.raises(UserError, match="zip archive"):
        nvpickle.load(zip_path)
    legacy = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="legacy torch.save checkpoint"):
        nvpickle.load(legacy)
    with pytest.raises(UserError, match="file not found"):
        nvpickle.load(tmp_path / "nope.pkl")
