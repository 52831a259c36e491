"""Every command that reads pickles against the hostile corpus (tests/make_hostile_corpus.py): nothing
runs (no canary), every refusal is exit 2 with one line `Error: ...` saying why, in bounded time and
memory. The whole matrix runs in one subprocess under RLIMIT_AS (3 GiB) and a timeout; each cell is a
click CliRunner invocation there. Also: published configurations pass the argument checks, and the
module-source policy of refine and distill."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from common.errors import UserError
from fileformats import module_sources, nvpickle
from fileformats.arguments import check_ranges, meta_shapes, shape_mismatch
from gan_adapters.stylegan2 import GeneratorConfig, StyleGAN2Network
from gan_adapters.stylegan2_adapter import ARGUMENT_BOUNDS as SG2_BOUNDS
from refiner.cli import cli
from teachers.edm_layers import skip_init
from teachers.edm_loader import ARGUMENT_BOUNDS as EDM_BOUNDS
from teachers.edm_precond import EDMPrecond, VPPrecond

TESTS = Path(__file__).parent
DATA = TESTS / "data"
SG2 = DATA / "sg2ada-small-uncond.pkl"
EDM = DATA / "edm-small-ddpmpp-edm-cond.pkl"
MEMORY_LIMIT = 3 * 2**30
MAX_SECONDS = 20.0  # per invocation, on a loaded 2-core machine; refusals take well under a second idle

# command -> (argv with {f} = the corpus file, {g}/{t} = valid generator / teacher, {o} = fresh folder)
COMMANDS = {
    "inspect": ["inspect", "{f}"],
    "sample --teacher": ["sample", "--teacher", "{f}", "--out", "{o}", "--seeds", "0", "--steps", "2",
                         "--device", "cpu"],
    "refine --generator": ["refine", "--generator", "{f}", "--teacher", "{t}", "--out", "{o}", "--steps", "1",
                           "--device", "cpu", "--unknown-source", "error"],
    "refine --teacher": ["refine", "--generator", "{g}", "--teacher", "{f}", "--out", "{o}", "--steps", "1",
                         "--device", "cpu"],
    "distill --teacher": ["distill", "--teacher", "{f}", "--out", "{o}", "--steps", "1", "--device", "cpu",
                          "--unknown-source", "error"],  # (the default, keep, writes a stored source on with a warning)
    "metrics --generator": ["metrics", "--generator", "{f}", "--metrics", "is", "--num", "1", "--device", "cpu"],
    "metrics --detector": ["metrics", "--images", "{i}", "--metrics", "is", "--detector", "{f}", "--device", "cpu"],
}

# refine --teacher first loads a valid generator (most of a second); its teacher is read by the same
# loader as distill's and sample's, which get the whole corpus, so it gets one case of each kind.
SUBSETS = {"refine --teacher": {"os-system", "storage-with-code", "doubling-in-teacher", "deep-nesting-in-teacher",
                                "doubling-tuple-key", "unicode-1tib", "storage-2**36-elements", "truncated",
                                "edm-model-channels-2**20", "edm-arguments-bigger-than-file", "sg2-z-dim-2**31"}}

NOT_TEACHER = "expected an EDM network pickle|StyleGAN2-ADA snapshot"
ONE_STEP = "a one-step generator written by refiner .*, not a diffusion model"
NOT_DETECTOR = "not an Inception detector"


def expectation(command: str, scope: str) -> tuple[int, str | None] | None:
    """(exit code, regex the output must match; None = the case's own refusal), or None: not run
    (the file is readable and the command would start computing)."""
    if scope == "file":
        return 2, None
    if command == "inspect":
        return 0, "UNKNOWN" if scope.endswith("source") else "init"
    if command == "metrics --detector":
        return 2, NOT_DETECTOR
    family = scope.split("-")[0]
    generator = command in ("refine --generator", "metrics --generator")
    if scope.endswith("args"):  # the EDM cases carry refiner's one-step metadata: distill and refine refuse them
        # as teachers before building anything; the generator commands and sample reach the arguments' check
        if generator or family == "edm" and command == "sample --teacher":
            return 2, None
        return (2, ONE_STEP) if family == "edm" else (2, NOT_TEACHER)
    if family == "sg2":
        return {"refine --generator": (2, None), "metrics --generator": None}.get(command, (2, NOT_TEACHER))
    return {"distill --teacher": (2, None), "refine --generator": (2, "sigma-init")}.get(command)


# ------------------------------------------------------------------------------------------------
# The subprocess: build the corpus, run the matrix, write the results as JSON


def _run_matrix(folder: Path) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.path.insert(0, str(TESTS))
    from helpers import write_edm_teacher
    from make_hostile_corpus import write_corpus

    import refiner.cli.metrics as cli_metrics

    load_detector = cli_metrics._load_detector
    canary = folder / "CANARY"
    files = write_corpus(folder / "corpus", canary)
    generator = folder / "generator.pkl"  # a small one-step generator, quick to load
    write_edm_teacher(generator, resolution=8)
    data = nvpickle.load(generator)
    data["refiner"] = {"format": "refiner-one-step-generator/1", "sigma_init": 1.0}
    nvpickle.dump(data, generator, overwrite=True)
    images = folder / "images.npz"
    np.savez(images, x=np.zeros((2, 8, 8, 3), np.uint8))
    results = []
    for command, argv in COMMANDS.items():
        # metrics --generator: a stand-in detector (the generator is read after the detector)
        cli_metrics._load_detector = (load_detector if command != "metrics --generator"
                                      else lambda *args: types.SimpleNamespace(has_logits=True))
        for name, (path, case) in files.items():
            if expectation(command, case.scope) is None or name not in SUBSETS.get(command, {name}):
                continue
            out = folder / f"out-{len(results)}"
            args = [a.format(f=path, g=generator, t=EDM, o=out, i=images) for a in argv]
            start = time.perf_counter()
            result = CliRunner().invoke(cli, args)
            results.append({"command": command, "case": name, "exit": result.exit_code, "output": result.output,
                            "seconds": time.perf_counter() - start, "canary": canary.exists(),
                            "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
                            else repr(result.exception)[:300]})
    (folder / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("hostile")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    results.append({"total_seconds": time.perf_counter() - start})
    return results


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_the_corpus(matrix, command):
    rows = [r for r in matrix if r.get("command") == command]
    assert rows, f"{command} was not run"
    for row in rows:
        where = f"{command} / {row['case']}: {row['output'][-400:]!r}"
        assert not row["canary"], f"{where}: the canary was created"
        assert row["exception"] is None, f"{where}: {row['exception']}"
        assert row["seconds"] < MAX_SECONDS, f"{where}: took {row['seconds']:.1f} s"
        assert "Traceback" not in row["output"], where
        if row["exit"] == 2:
            lines = row["output"].strip().splitlines()
            errors = [line for line in lines if line.startswith("Error: ")]
            assert len(errors) == 1 and errors[0] == lines[-1], where


def test_refusals_say_why(matrix):
    sys.path.insert(0, str(TESTS))
    from make_hostile_corpus import SCOPES, corpus

    cases = {c.name: c for c in corpus(Path("/nonexistent/CANARY"))}
    assert {c.scope for c in cases.values()} == set(SCOPES)
    seen = set()
    for row in (r for r in matrix if "command" in r):
        case = cases[row["case"]]
        code, pattern = expectation(row["command"], case.scope)
        where = f"{row['command']} / {row['case']}: {row['output'][-400:]!r}"
        assert row["exit"] == code, where
        assert re.search(pattern or case.refusal, row["output"]), where
        seen.add((row["command"], case.scope))
    assert {c for c, s in seen} == set(COMMANDS)
    assert matrix[-1]["total_seconds"] < 180


# ------------------------------------------------------------------------------------------------
# Published configurations pass the argument checks (and have their published sizes)


def _edm_count(cls, kwargs) -> int:
    check_ranges("published", cls.__name__, kwargs, EDM_BOUNDS)

    def build():
        with skip_init():
            return cls(**kwargs)

    return sum(math.prod(s) for s in meta_shapes(build).values())


def test_published_edm_configs_pass():
    adm = dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type="DhariwalUNet",
               model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1)  # EDM ImageNet-64
    ddpmpp = dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
                  embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                  augment_dim=9, dropout=0.13)  # EDM CIFAR-10
    # the parameter counts of EDM (Karras et al. 2022, Table 7): ADM 296M, DDPM++ 56M
    assert round(_edm_count(EDMPrecond, adm) / 1e6) == 296
    assert round(_edm_count(VPPrecond, ddpmpp) / 1e6) == 56


def test_published_stylegan2_config_passes():
    kwargs = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                  mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))
    cfg = GeneratorConfig.from_init_kwargs((), kwargs)  # stylegan2-ada-pytorch --cfg=paper1024 (FFHQ)
    values = cfg.to_init_kwargs()
    for group, bounds in SG2_BOUNDS.items():
        check_ranges("published", "G", values if group == "generator" else values[group], bounds)
    with torch.device("meta"):
        network = StyleGAN2Network(cfg)
    assert sum(p.numel() for p in network.parameters()) == 30_370_060  # as stylegan2-ada-pytorch reports


def test_arguments_are_checked_before_anything_is_allocated(monkeypatch):
    data = nvpickle.load(EDM)
    data["ema"].init_kwargs["model_channels"] = 2**20
    built = []
    monkeypatch.setattr(EDMPrecond, "__init__", lambda *a, **k: built.append(1))
    from teachers.edm_loader import build_network

    with pytest.raises(UserError, match=r"model_channels = 1048576 .*1 to 4,096"):
        build_network(data["ema"], "x.pkl")
    assert not built


def test_shape_mismatch_names_what_differs():
    """One message for every loader: counts, the first names of each kind, both shapes of a wrong one."""
    built = {"a": (2, 3), "b": (4,), "c": (1,), "d": (5,), "e": (6,), "f": (7,)}
    found = {"a": (2, 4), "x": (1,)}
    assert shape_mismatch(built, dict(built)) is None
    assert shape_mismatch(built, found) == ("5 entries missing ['b', 'c', 'd'] ...; 1 unexpected ['x']; "
                                            "1 of wrong shape ['a: (2, 4) in the file, (2, 3) built']")
    assert shape_mismatch({"a": (1,)}, {}) == "1 entry missing ['a']"


# ------------------------------------------------------------------------------------------------
# Module sources: inspect names them; refine and distill refuse, keep or replace an unknown one


def test_known_release_is_recognised_by_hash():
    release = module_sources.KNOWN_RELEASES[0]
    fake = "x" * 10
    assert module_sources.classify(fake).release is None and module_sources.classify(fake).has_code
    status = module_sources.SourceStatus(release.sha256, module_sources._BY_HASH[release.sha256], True)
    assert status.trusted and release.describe() in status.describe()
    assert all(len(r.sha256) == 64 and len(r.commit) == 40 for r in module_sources.KNOWN_RELEASES)
    assert module_sources.classify("# placeholder\n\n").describe().startswith("no code")


@pytest.mark.parametrize("raw", [b"x = 1\n", b"x = 1\r\ny = 2", b"\xef\xbb\xbfs = '\xcf\x83'\r"])
def test_hashed_text_is_what_persistence_stores(tmp_path, raw):
    """The table hashes stored_text(file); torch_utils.persistence stores inspect.getsource(module)."""
    import importlib.util
    import inspect

    path = tmp_path / f"mod{len(raw)}.py"
    path.write_bytes(raw)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own three-line file
    assert module_sources.stored_text(raw) == inspect.getsource(module)


def test_structure_limits_leave_deepcopy_and_writing_safe():
    """Data at the depth limit loads, deep-copies and is written again without RecursionError."""
    nested: list = []  # with the dict around it: max_depth containers
    for _ in range(nvpickle.LIMITS.max_depth - 2):
        nested = [nested]
    data = nvpickle.load(nvpickle.dumps({"x": nested}))
    copy = __import__("copy").deepcopy(data)
    assert nvpickle.dumps(copy) == nvpickle.dumps(data)
    with pytest.raises(UserError, match="nests deeper than 64"):
        nvpickle.load(nvpickle.dumps({"x": [nested]}))


def _with_source(path: Path, source: str, target: Path) -> Path:
    data = nvpickle.load(path)
    for record in nvpickle.records(data):
        record.module_src = source
    nvpickle.dump(data, target)
    return target


def test_inspect_reports_sources(tmp_path):
    evil = _with_source(EDM, "import os\nclass EDMPrecond: pass\n", tmp_path / "evil.pkl")
    out = CliRunner().invoke(cli, ["inspect", str(evil), "--depth", "0"]).output
    assert re.search(r"source \(\d+ chars\) of EDMPrecond, .*: UNKNOWN \(sha256 [0-9a-f]{16}", out)
    summary = json.loads(CliRunner().invoke(cli, ["inspect", str(EDM), "--json"]).output)
    sources = summary["entries"]["ema"]["network"]["module_sources"]
    assert [s["status"] for s in sources] == ["no code"] and "EDMPrecond" in sources[0]["classes"]


def test_policy_keep_and_replace(tmp_path):
    evil_src = "import os\nclass EDMPrecond: pass\n"
    record = nvpickle.load(_with_source(EDM, evil_src, tmp_path / "evil.pkl"))["ema"]
    messages: list[str] = []
    with pytest.raises(UserError, match="not a known release.*--unknown-source keep"):
        module_sources.enforce(record, "evil.pkl", module_sources.SourcePolicy("error"), messages.append)
    module_sources.enforce(record, "evil.pkl", module_sources.SourcePolicy(), messages.append)  # keep
    assert record.module_src == evil_src and "NVIDIA's loader will run it" in messages[-1]
    # a donor file whose records carry a (pretend) known release: its text replaces the unknown one
    known = "# pretend release text\nx = 1\n"
    donor = _with_source(EDM, known, tmp_path / "donor.pkl")
    release = module_sources.Release("NVlabs/edm", "training/networks.py", "0" * 40,
                                     module_sources.source_sha256(known))
    module_sources._BY_HASH[release.sha256] = release
    try:
        module_sources.enforce(record, "evil.pkl", module_sources.SourcePolicy("replace", str(donor)), messages.append)
    finally:
        del module_sources._BY_HASH[release.sha256]
    assert all(r.module_src == known for r in nvpickle.records(record))
    with pytest.raises(UserError, match="needs --source-from"):
        module_sources.SourcePolicy("replace")


def test_distill_refuses_an_unknown_source_before_any_work(tmp_path):
    evil = _with_source(EDM, "import os\nclass EDMPrecond: pass\n", tmp_path / "evil.pkl")
    result = CliRunner().invoke(cli, ["distill", "--teacher", str(evil), "--out", str(tmp_path / "run"),
                                      "--steps", "1", "--device", "cpu", "--unknown-source", "error"])
    assert result.exit_code == 2 and "not a known release" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


if __name__ == "__main__":
    _run_matrix(Path(sys.argv[1]))
