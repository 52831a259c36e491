"""Module sources stored in NVIDIA network pickles, recognised by hash.

`torch_utils.persistence` stores with every persistent object the full source text of the module that
defined its class (`inspect.getsource(module)`), and NVIDIA's loader `exec`s that text. refiner never
runs it, but a file refiner writes (a refined GAN, a distilled snapshot) carries it on to NVIDIA's
loader. So each stored source is compared with the published releases by SHA-256: `KNOWN_RELEASES`
holds the hashes (never the text) of the modules with persistent classes, at the commits listed, of
NVlabs/edm, NVlabs/stylegan2-ada-pytorch, NVlabs/stylegan3, pkulwj1994/diff_instruct and
mingyuanzhou/SiD, taken of `stored_text(file)` (what inspect.getsource returns) and listed by
scripts/module_source_hashes.py from a clone of each repository.

A source that is only comments and blank lines contains no code (refiner's own files and the test
fixtures carry such placeholders); anything else is UNKNOWN.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import UserError
from fileformats import nvpickle


@dataclass(frozen=True)
class Release:
    """One module of a published code base: where its text came from and the SHA-256 of that text."""

    repo: str
    path: str
    commit: str
    sha256: str

    def describe(self) -> str:
        return f"{self.repo} {self.path} @ {self.commit[:7]}"


KNOWN_RELEASES = (
    Release("NVlabs/edm", "training/networks.py", "b2a26c921c5776cb52f7498248761d60649007a8",
            "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284"),
    Release("NVlabs/edm", "training/networks.py", "0a2ff34f0b80415ace7af7311074bd2255da0d1e",
            "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef"),
    Release("NVlabs/edm", "training/loss.py", "0a2ff34f0b80415ace7af7311074bd2255da0d1e",
            "b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415"),
    Release("NVlabs/edm", "training/augment.py", "0a2ff34f0b80415ace7af7311074bd2255da0d1e",
            "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5"),
    Release("NVlabs/stylegan2-ada-pytorch", "training/networks.py", "375a436003d13acc8a3d287340fdc7877e252e93",
            "53b4e1ec457171d4e2c1454d48013765ab626141c35cdd383b020950effe11a5"),
    Release("NVlabs/stylegan2-ada-pytorch", "training/augment.py", "375a436003d13acc8a3d287340fdc7877e252e93",
            "77eb17876bc7ba87cdc9281caf925daf507ce0937b84d0f32134d4d08e13061e"),
    Release("NVlabs/stylegan3", "training/networks_stylegan2.py", "583f2bdd139e014716fc279f23d362959bcc0f39",
            "b6f14e8fa2a95de4d38218fef31380c6a70de770f585107e209ff83075c307ef"),
    Release("NVlabs/stylegan3", "training/networks_stylegan2.py", "8fb5177d77556d19bf3ccfa03621aa4cbdf29dc9",
            "b6f14e8fa2a95de4d38218fef31380c6a70de770f585107e209ff83075c307ef"),
    Release("NVlabs/stylegan3", "training/networks_stylegan3.py", "583f2bdd139e014716fc279f23d362959bcc0f39",
            "06082fb3e8929e477f58fb8bc78e7ecb9a9209eb01444272d1d153c85a6a89f7"),
    Release("NVlabs/stylegan3", "training/networks_stylegan3.py", "8fb5177d77556d19bf3ccfa03621aa4cbdf29dc9",
            "06082fb3e8929e477f58fb8bc78e7ecb9a9209eb01444272d1d153c85a6a89f7"),
    Release("NVlabs/stylegan3", "training/augment.py", "583f2bdd139e014716fc279f23d362959bcc0f39",
            "43c6b98bc68d5d214dd2e2775a10eb007dee034c005766fbc310005147bfb788"),
    Release("NVlabs/stylegan3", "training/augment.py", "8fb5177d77556d19bf3ccfa03621aa4cbdf29dc9",
            "43c6b98bc68d5d214dd2e2775a10eb007dee034c005766fbc310005147bfb788"),
    Release("pkulwj1994/diff_instruct", "training/networks.py", "55c754c7c9f9511c48afe9ba5f5168c7ff53e996",
            "530db78590f5bf8a5fc136a054dedca8bc2cc6e6aa12b014ec295ae1ba974c2d"),
    Release("pkulwj1994/diff_instruct", "training/augment.py", "55c754c7c9f9511c48afe9ba5f5168c7ff53e996",
            "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5"),
    Release("pkulwj1994/diff_instruct", "training/di_loss.py", "55c754c7c9f9511c48afe9ba5f5168c7ff53e996",
            "16dbd8c8fafe4decf1635b0a3d2d9a51ce3c1a11eddf95d25ef4f2d352b03d98"),
    Release("mingyuanzhou/SiD", "training/networks.py", "cc1a31d954cb50678731f23bfede4e3aa51e0d86",
            "2c02ea22779577e80489c3f8861489dab0a0e88164f5c2b6e7a3cc0fec5a38c6"),
    Release("mingyuanzhou/SiD", "training/augment.py", "cc1a31d954cb50678731f23bfede4e3aa51e0d86",
            "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5"),
    Release("mingyuanzhou/SiD", "training/sid_loss.py", "f43bbd9eb1d2348ed73721e364fe33a2ccb46322",
            "10a41111c3b30647d4a253f87cc39b1a6042876a3d16083030bf1d3b02138b96"),
    Release("mingyuanzhou/SiD", "training/sid_loss.py", "cc1a31d954cb50678731f23bfede4e3aa51e0d86",
            "67c13bee0ddc578b7a1692441c77ea2bf037a7a0c0965de7e62f75e3f7bc7cb6"),
)
_BY_HASH: dict[str, Release] = {}
for _release in KNOWN_RELEASES:
    _BY_HASH.setdefault(_release.sha256, _release)

MODES = ("error", "keep", "replace")


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


def stored_text(file_bytes: bytes) -> str:
    """The text torch_utils.persistence stores for a module file: inspect.getsource(module), i.e. the
    file decoded as UTF-8 without a BOM, universal newlines, and a final newline (linecache adds one)."""
    text = file_bytes.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    return text if not text or text.endswith("\n") else text + "\n"


@dataclass(frozen=True)
class SourceStatus:
    """What a stored module source is: a known release, text without code, or unknown."""

    sha256: str
    release: Release | None
    has_code: bool

    @property
    def trusted(self) -> bool:
        return self.release is not None or not self.has_code

    def describe(self) -> str:
        if self.release is not None:
            return f"known release {self.release.describe()}"
        if not self.has_code:
            return "no code (a placeholder: comments only)"
        return f"UNKNOWN (sha256 {self.sha256[:16]}; not a published release, its code would run in NVIDIA's loader)"


def classify(source: str) -> SourceStatus:
    digest = source_sha256(source)
    has_code = any(line.strip() and not line.lstrip().startswith("#") for line in source.splitlines())
    return SourceStatus(digest, _BY_HASH.get(digest), has_code)


@dataclass(frozen=True)
class SourcePolicy:
    """What a command that writes stored sources into a new file does with an UNKNOWN one:
    'keep' writes it with a warning (the default), 'error' refuses, 'replace' writes instead the known
    source that `donor` (another network pickle) stores for the same class."""

    mode: str = "keep"
    donor: str | None = None
    option: str = "--unknown-source"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"{self.option} must be one of {', '.join(MODES)} (got {self.mode!r})")
        if (self.mode == "replace") != (self.donor is not None):
            raise UserError(f"{self.option} replace needs --source-from FILE (a network pickle with the "
                            "known release's source), and --source-from is only used with replace")


def enforce(obj: Any, name: str, policy: SourcePolicy, warn: Callable[[str], None]) -> None:
    """Apply `policy` to every record reachable from `obj` (records are changed in place for
    'replace'), before anything is computed, so a refusal costs nothing."""
    unknown: dict[str, list[nvpickle.PersistentObject]] = {}
    for record in nvpickle.records(obj):
        if not classify(record.module_src).trusted:
            unknown.setdefault(record.module_src, []).append(record)
    if not unknown:
        return
    classes = sorted({r.class_name for group in unknown.values() for r in group})
    shown = ", ".join(classes[:4]) + (f" and {len(classes) - 4} more" if len(classes) > 4 else "")
    hashes = ", ".join(source_sha256(s)[:16] for s in unknown)
    if policy.mode == "error":
        raise UserError(f"{name}: the module source stored for {shown} is not a known release (sha256 {hashes}); "
                        "the file written would carry its code to NVIDIA's loader, which runs it. Check it "
                        "with `refiner inspect`, then pass --unknown-source keep if you trust it, or "
                        "--unknown-source replace --source-from FILE to write a known release's source instead")
    if policy.mode == "keep":
        warn(f"warning: {name}: the module source stored for {shown} is not a known release (sha256 "
             f"{hashes}); it is kept in the file written, and NVIDIA's loader will run it. Check it with "
             "`refiner inspect`; --unknown-source error refuses such files, --unknown-source replace "
             "--source-from FILE writes a known release's source instead")
        return
    donor = _known_sources_by_class(policy.donor)
    missing = sorted({r.class_name for group in unknown.values() for r in group} - set(donor))
    if missing:
        raise UserError(f"--source-from {policy.donor} stores no known release's source for "
                        f"{', '.join(missing[:4])}; give a network pickle of the same family made with "
                        "the published code")
    for group in unknown.values():
        for record in group:
            record.module_src = donor[record.class_name]
    warn(f"warning: {name}: the unknown module source stored for {shown} is replaced by the known "
         f"release that {policy.donor} stores")


def _known_sources_by_class(path: str | None) -> dict[str, str]:
    data = nvpickle.load(path)
    return {r.class_name: r.module_src for r in nvpickle.records(data) if classify(r.module_src).release}
