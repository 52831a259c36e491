"""`refiner inspect`: text and --json output on the golden pickles, checked against the numbers and
constructor kwargs recorded in their .ref.pt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from refiner.cli import cli

DATA = Path(__file__).parent / "data"
SG2 = DATA / "sg2ada-small-uncond.pkl"
EDM_COND = DATA / "edm-small-ddpmpp-edm-cond.pkl"


def run(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def ref(path: Path) -> dict:
    return torch.load(path.with_suffix(".ref.pt"), weights_only=True)


def test_inspect_json_sg2ada():
    result = run(str(SG2), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    golden = ref(SG2)
    assert summary["pickle_protocol"] == golden["pickle_protocol"] == 4
    assert summary["size_bytes"] == SG2.stat().st_size
    assert "dnnlib.util.EasyDict" in summary["globals"]
    entries = summary["entries"]
    assert list(entries) == ["training_set_kwargs", "G", "D", "G_ema", "augment_pipe"]
    assert entries["training_set_kwargs"]["value"] == json.loads(golden["training_set_kwargs"])
    init_kwargs = json.loads(golden["init_kwargs"])
    for key in ("G", "D", "G_ema", "augment_pipe"):
        assert entries[key]["network"]["init_kwargs"] == init_kwargs[key], key
    g_ema = entries["G_ema"]["network"]
    assert g_ema["num_params"] == golden["n_params_G_ema"]
    assert entries["D"]["network"]["num_params"] == golden["n_params_D"]
    assert g_ema["attributes"]["num_ws"] == golden["num_ws"]
    tree = g_ema["tree"]
    assert tree["class_name"] == "Generator" and tree["num_params"] == golden["n_params_G_ema"]
    assert tree["num_params"] == sum(c["num_params"] for c in tree["children"].values())
    torgb = tree["children"]["synthesis"]["children"]["b32"]["children"]["torgb"]
    assert torgb["class_name"] == "ToRGBLayer"
    assert {"name": "bias", "kind": "parameter", "shape": [3], "dtype": "float32"} in torgb["tensors"]
    # every element counted once: parameters plus persistent buffers
    assert sum(g_ema["state_elements_by_dtype"].values()) * 4 == g_ema["state_bytes"]


def test_inspect_json_edm_via_file_url():
    result = run(EDM_COND.resolve().as_uri(), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    golden = ref(EDM_COND)
    init_kwargs = json.loads(golden["init_kwargs"])
    ema = summary["entries"]["ema"]["network"]
    assert ema["num_params"] == golden["n_params"]
    assert ema["init_kwargs"] == init_kwargs["ema"]
    assert ema["attributes"]["sigma_max"] == "inf" and ema["attributes"]["label_dim"] == golden["label_dim"]
    model = ema["tree"]["children"]["model"]
    assert model["class_name"] == "SongUNet"
    assert model["children"]["enc"]["class_name"] == "ModuleDict"
    assert list(model["children"]["enc"]["children"]) == ["16x16_conv", "16x16_block0", "8x8_down",
                                                          "8x8_block0"]
    assert summary["entries"]["dataset_kwargs"]["value"] == json.loads(golden["dataset_kwargs"])
    assert summary["kind"].startswith("EDM snapshot")


def test_inspect_text():
    result = run(str(EDM_COND), "--depth", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[ema] EDMPrecond: 189,667 parameters" in out
    assert "    model: SongUNet  189,667 params" in out
    assert "... 7 submodules (raise --depth)" in out
    assert "init model_type = \"SongUNet\"" in out
    assert "[loss_fn] EDMLoss: 0 parameters" in out
    full = run(str(SG2), "--tensors").output
    assert "          .noise_const  [4, 4] float32  (buffer)" in full
    assert "      b32: SynthesisBlock" in full


@pytest.mark.parametrize("content, message", [
    (b'{"G": 1}', "not a pickle (it looks like JSON or text)"),
    (b"\x80\x04\x95", "ends early at byte 3 (truncated download?)"),
])
def test_inspect_errors_are_one_line(tmp_path, content, message):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(content)
    result = run(str(bad))
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")


def test_inspect_missing_file(tmp_path):
    result = run(str(tmp_path / "none.pkl"))
    assert result.exit_code == 2 and "file not found" in result.output


def test_a_torchscript_archive_is_described_without_loading_it_and_refused_as_weights(tmp_path):
    """NVIDIA's Inception detector is TorchScript: inspect names it (no torch.load, so no warning from torch's
    TorchScript dispatch), and a command that wants weights refuses it in one line."""
    import warnings

    from common.errors import UserError
    from gan_adapters.loader import load_generator

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(str(path), "--json")
        with pytest.raises(UserError, match=r"inception-2015-12-05.pt: a TorchScript archive .* not weights; give"):
            load_generator(path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["format"] == "TorchScript archive" and summary["usage"]["commands"]["metrics"].startswith(
        "as --detector") and summary["usage"]["commands"]["refine"].startswith("no")
    assert not caught, [str(w.message) for w in caught]


def test_inspect_takes_a_biggan_folder_its_weights_and_a_dmd2_checkpoint_folder(tmp_path):
    from helpers import seeded_state_dict

    folder = DATA / "biggan-deep-small"
    result = run(str(folder), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert summary["format"] == "BigGAN-deep folder" and summary["num_tensors"] == len(state)
    assert summary["num_elements"] == sum(t.numel() for t in state.values())
    assert summary["config"]["z_dim"] == json.loads((folder / "config.json").read_text())["z_dim"]
    assert summary["usage"]["commands"]["refine"].startswith("yes, as --generator")
    weights = run(str(folder / "pytorch_model.bin"))
    assert "BigGAN-deep weights" in weights.output and "refine: yes: give the folder" in weights.output

    checkpoint = tmp_path / "checkpoint_model_001000"  # DMD2's folder: its pytorch_model.bin is shown
    checkpoint.mkdir()
    torch.save(seeded_state_dict(torch.load(DATA / "dmd2-small.ref.pt")), checkpoint / "pytorch_model.bin")
    dmd2 = run(str(checkpoint))
    assert dmd2.exit_code == 0 and "DMD2 one-step generator" in dmd2.output, dmd2.output
    empty = run(str(tmp_path))
    assert empty.exit_code == 2 and "a folder without pytorch_model.bin; inspect takes" in empty.output
