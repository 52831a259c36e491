"""fileformats.atomic, the one write path: whole files or nothing, temporary files cleaned on failure and
when a run directory is reopened, and a full disk or a missing permission as one `Error:` line.

The disk-full cases run in one child process under a small RLIMIT_FSIZE with SIGXFSZ ignored, so every
write past the limit fails with EFBIG, as on a full disk; the writers are the project's own (checkpoint,
refined StyleGAN2 pickle, grid, report, metrics cache, download cache, log) plus a whole `refiner toy` run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.errors import UserError
from fileformats.atomic import (
    append_text,
    atomic_folder,
    atomic_open,
    atomic_write_text,
    ensure_dir,
    remove_stale_temps,
)
from refiner.cli import cli
from refiner.config import TrainConfig
from refiner.rundir import RunDir
from tests.helpers import DATA, write_edm_teacher

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_written_folder_gets_the_usual_permissions(tmp_path: Path):
    """A refined BigGAN folder is written into a temporary folder (mkdtemp: mode 0700) and renamed into place."""
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_whole_file_or_nothing(tmp_path: Path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "first")
    assert path.read_text() == "first" and oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(ValueError), atomic_open(path, "w") as f:
        f.write("half of the second")
        raise ValueError("the writer failed")
    assert path.read_text() == "first" and _files(tmp_path) == ["sub", "sub/a.txt"]


@pytest.mark.parametrize("code, cause, remedy", [
    (errno.ENOSPC, "no space left on device", "free space or choose another --out"),
    (errno.EDQUOT, "disk quota exceeded", "free space or choose another --out"),
    (errno.EACCES, "permission denied", "make it writable or choose another --out"),
    (errno.EROFS, "read-only file system", "make it writable or choose another --out"),
])
def test_disk_errors_become_one_line(tmp_path: Path, code: int, cause: str, remedy: str):
    path = tmp_path / "state.pt"

    def write(f):
        f.write(b"partial")
        try:
            raise OSError(code, os.strerror(code))
        except OSError:  # torch.save reports it as a RuntimeError raised while handling the OSError
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None

    with pytest.raises(UserError) as info, atomic_open(path) as f:
        write(f)
    assert str(info.value) == f"{cause} while writing {path}; {remedy}"
    assert _files(tmp_path) == []


def test_path_problems_become_one_line(tmp_path: Path):
    """Paths the file system refuses, each written for real: a name over 255 bytes, a symbolic-link loop, a
    dangling link in the way of a folder, a folder where a file should go, and a folder /proc cannot hold.
    The command line prints them as one line too (inspect of a name too long)."""
    from click.testing import CliRunner

    from refiner.cli import cli

    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    (tmp_path / "folder").mkdir()
    for path, cause in [(tmp_path / ("a" * 300), "a name in the path is too long for the file system"),
                        (tmp_path / "loopA" / "x", "too many levels of symbolic links (a link loop) in the path"),
                        (tmp_path / "loopA" , "a file or link of that name is in the way"),
                        (Path("/proc/refiner-test/x"), "no such file or folder")]:
        with pytest.raises(UserError) as info:
            ensure_dir(path)
        assert str(info.value).startswith(f"{cause}") and str(info.value).endswith(
            f"while writing {path}; give another path or choose another --out"), str(info.value)
    with pytest.raises(UserError, match="the path is a folder while writing .*folder; give another path"):
        atomic_write_text(tmp_path / "folder", "x")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / ("a" * 300 + ".pkl"))])
    assert result.exit_code == 2 and "a name in the path is too long for the file system" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1


def test_append_is_whole_or_cut_back(tmp_path: Path, monkeypatch):
    log = tmp_path / "log.jsonl"
    append_text(log, '{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up in the middle of the record
        monkeypatch.setattr(os, "write", _raise_enospc)
        return real_write(fd, bytes(data[:4]))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match=f"no space left on device while writing {log}"):
        append_text(log, '{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n'


def _raise_enospc(fd, data):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_reopened_run_directory_loses_the_temporary_files_of_a_killed_run(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    config = TrainConfig(steps=2, device="cpu")
    run.prepare(config)
    run.save_checkpoint({"step": 1}, 1)
    left = [run.checkpoint_dir / ".state-00000002.pt.k2j4h5g6.tmp", run.path / ".network-refined.pkl.x_9z3w4q.tmp",
            run.path / ".grid-after.png.abcdefgh.tmp"]
    for p in left:
        p.write_bytes(b"half")
    (run.path / ".biggan-refined.abcdefgh.tmp").mkdir()
    (run.path / ".biggan-refined.abcdefgh.tmp" / "config.json").write_text("{}")
    kept = [run.path / "notes.tmp", run.path / ".hidden"]
    for p in kept:
        p.write_text("the user's")
    run.release()  # the killed run's lock went with its process
    assert run.prepare(config, resume=True) == run.checkpoint_dir / "state-00000001.pt"
    assert all(not p.exists() for p in left) and not (run.path / ".biggan-refined.abcdefgh.tmp").exists()
    assert all(p.read_text() == "the user's" for p in kept)
    assert remove_stale_temps(run.path) == []


# -- a full disk, for real -----------------------------------------------------------------------------

_DISK_FULL = textwrap.dedent(r"""
    import http.server, json, pickle, resource, signal, sys, threading
    from pathlib import Path
    import numpy as np, torch
    from click.testing import CliRunner

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    out = Path(sys.argv[1])
    results = {}

    def limited(name, limit, call):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            results[name] = {"ok": call()}
        except Exception as e:
            results[name] = {"error": type(e).__name__, "message": str(e)}
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    from refiner.rundir import RunDir
    run = RunDir(out / "ckpt")
    run.checkpoint_dir.mkdir(parents=True)
    limited("checkpoint", 64 << 10, lambda: run.save_checkpoint({"w": torch.randn(100_000)}, 7))

    (out / "log").mkdir()
    (out / "log" / "log.jsonl").write_text("x" * 1000 + "\n")
    limited("log", 1010, lambda: RunDir(out / "log").log({"step": 2, "loss": 0.5}))

    from gan_adapters.loader import load_generator
    generator = load_generator(sys.argv[2])
    (out / "pickle").mkdir()
    limited("pickle", 64 << 10, lambda: generator.save(out / "pickle" / "network-refined.pkl"))

    from metrics.images import save_image_grid
    from metrics.report import write_report
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    limited("grid", 4096, lambda: save_image_grid(images, out / "grid" / "grid-after.png"))
    limited("report", 4096, lambda: write_report(out / "report", {}, {}, grid_before=images, grid_after=images))

    from metrics.reference import load_reference
    from tests.metrics_helpers import StandInDetector, random_images
    np.savez(out / "ref.npz", x=random_images(40, seed=1))
    limited("metrics", 1024, lambda: float(load_reference(out / "ref.npz", StandInDetector(),
                                                          cache_dir=out / "cache").mu.sum()))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pickle.dumps(bytes(100_000), protocol=4)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from fileformats.sources import open_source
    url = f"http://127.0.0.1:{server.server_address[1]}/net.pkl"
    limited("download", 64 << 10, lambda: open_source(url, cache_dir=out / "dl", timeout=10))
    server.shutdown()

    from refiner.cli import cli
    def toy():
        r = CliRunner().invoke(cli, ["toy", "--out", str(out / "toy"), "--steps", "2", "--batch", "8",
                                     "--samples", "50", "--fake-warmup", "0"])
        return {"exit_code": r.exit_code, "output": r.output}
    limited("toy", 64 << 10, toy)
    for result in results.values():
        if "ok" in result and not isinstance(result["ok"], (dict, float)):
            result["ok"] = repr(result["ok"])
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", _DISK_FULL, str(out), str(DATA / "sg2ada-small-uncond.pkl")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


_FULL = "file too large (over the file system's or this process's file-size limit) while writing"


@pytest.mark.parametrize("case, target, advice", [
    ("checkpoint", "ckpt/checkpoints/state-00000007.pt", "choose another --out"),
    ("log", "log/log.jsonl", "choose another --out"),
    ("pickle", "pickle/network-refined.pkl", "choose another --out"),
    ("grid", "grid/grid-after.png", "choose another --out"),
    ("report", "report/report.html", "choose another --out"),
    ("download", "dl/downloads/*_net.pkl", "set REFINER_CACHE to another folder"),
])
def test_disk_full_is_one_line_and_leaves_nothing_partial(disk_full, case, target, advice):
    out, results = disk_full
    result = results[case]
    assert result.get("error") == "UserError", result
    folder, name = target.rsplit("/", 1)
    assert result["message"].startswith(f"{_FULL} {out / folder}/")
    assert Path(result["message"].split(" while writing ")[1].split(";")[0]).match(name)
    assert result["message"].endswith(f"; free space or {advice}")
    files = _files(out / target.split("/")[0])
    assert not any(f.endswith(".tmp") for f in files), files
    if case == "log":  # cut back to the whole records it had
        assert files == ["log.jsonl"] and (out / "log" / "log.jsonl").read_text() == "x" * 1000 + "\n"
    else:
        assert not any(Path(f).match(name) for f in files), files


def test_metrics_keep_the_statistics_they_could_not_cache(disk_full):
    out, results = disk_full
    assert isinstance(results["metrics"].get("ok"), float) and results["metrics"]["ok"] != 0.0
    assert "warning: the reference statistics were not cached: file too large" in results["stderr"]
    assert _files(out / "cache") == ["metrics"]


def test_disk_full_toy_run_exits_2_with_one_error_line(disk_full):
    out, results = disk_full
    toy = results["toy"]["ok"]
    assert toy["exit_code"] == 2, toy
    errors = [line for line in toy["output"].splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {_FULL} {out / 'toy' / 'checkpoints' / 'state-00000002.pt'}; free space or "
                      "choose another --out"], toy["output"]
    assert "Traceback" not in toy["output"]
    assert not any(f.endswith(".tmp") or f.endswith(".pt") for f in _files(out / "toy"))


# -- an --out that cannot be written -------------------------------------------------------------------

@contextlib.contextmanager
def _unprivileged():
    """Permission checks as an ordinary user: as root (who may write anywhere), drop the effective uid. What
    the commands import is imported first, as the Python installation may be unreadable to that user."""
    if os.geteuid() != 0:
        yield
        return
    import psutil  # noqa: F401

    import refiner.cli.sample  # noqa: F401
    import refiner.cli.toy  # noqa: F401
    import refiner.toy  # noqa: F401

    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def locked(tmp_path: Path):
    """A folder nobody may write into (mode 0o555), reachable by every user, holding a small teacher."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_edm_teacher(folder / "teacher.pkl")
        (folder / "teacher.pkl").chmod(0o644)
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


@pytest.mark.parametrize("command", [
    ["toy", "--steps", "2", "--batch", "8", "--samples", "50"],
    ["sample", "--teacher", "{teacher}", "--seeds", "0", "--steps", "2", "--device", "cpu"],
])
@pytest.mark.parametrize("where", ["locked", "under-a-file"])
def test_unwritable_out_exits_2_with_one_error_line(locked: Path, tmp_path: Path, command, where):
    if where == "locked":
        out = locked / "run"
    else:
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "run"
    before = _files(locked)
    args = [a.format(teacher=locked / "teacher.pkl") for a in command] + ["--out", str(out)]
    with _unprivileged() if where == "locked" else contextlib.nullcontext():
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(out) in errors[0], result.output
    cause = "permission denied" if where == "locked" else "a part of the path is a file, not a folder"
    assert cause in errors[0]
    assert "Traceback" not in result.output
    assert _files(locked) == before and not out.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_disk_error_no_writer_expected_is_still_one_line(monkeypatch):
    import refiner.cli.inspect as inspect_cli

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/net.pkl")

    monkeypatch.setattr(inspect_cli, "open_source", denied)
    result = CliRunner().invoke(cli, ["inspect", "net.pkl"])
    assert result.exit_code == 2
    assert result.output == "Error: permission denied (/data/net.pkl); check the path, its permissions and the " \
                            "free space\n"

    def other(*args, **kwargs):  # not a disk problem: a bug, shown as such
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    monkeypatch.setattr(inspect_cli, "open_source", other)
    assert isinstance(CliRunner().invoke(cli, ["inspect", "net.pkl"]).exception, ConnectionResetError)


@pytest.mark.parametrize("one_step", [True, False])
def test_an_existing_folder_is_swapped_whole(tmp_path: Path, monkeypatch, one_step: bool):
    """The new folder takes the old one's place, in one exchange where the system has it and by two renames
    where it does not: no file of the old one stays, none is mixed in, and no temporary folder is left."""
    import fileformats.atomic

    if not one_step:
        monkeypatch.setattr(fileformats.atomic, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "stale.bin").write_text("old")
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("new")
        assert (out / "config.json").read_text() == "old"  # nothing changes until the block ends
    assert _files(tmp_path) == ["out", "out/config.json"] and (out / "config.json").read_text() == "new"


def test_exchange_swaps_two_folders_in_one_step_or_changes_nothing(tmp_path: Path):
    from fileformats.atomic import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    if not exchange(a, b):
        assert _files(tmp_path) == ["a", "a/from_a", "b", "b/from_b"]  # nothing changed
        pytest.skip("this system offers no renameat2 exchange (atomic_folder takes the two-rename path)")
    assert _files(tmp_path) == ["a", "a/from_b", "b", "b/from_a"]
    with pytest.raises(FileNotFoundError):  # a missing side is an error, not a silent rename
        exchange(a, tmp_path / "missing")
    assert _files(tmp_path) == ["a", "a/from_b", "b", "b/from_a"]
