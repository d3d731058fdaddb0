"""Every path a command writes, renames or deletes must lie inside the directory it works on.

An experiment (or study) directory may come from someone else, and a symbolic link inside it
(``attacks -> /home/you/results``, ``models/0001 -> /etc/...``) would lead writes, renames and
deletions elsewhere. ``confined`` resolves a path (following every link on the way) and refuses,
with one line naming the link, a path whose resolved location leaves the resolved root. Commands
check the folders they will write before writing anything, and the writers check again at the
moment of writing. Reading through links stays allowed (see docs/trust.md).
"""

from __future__ import annotations

from pathlib import Path

from mia_lightning.errors import MiaError


def _escaping_link(root: Path, path: Path) -> Path:
    """The first component of ``path`` (under ``root``) that is a link resolving outside ``root``; ``path`` itself if none is."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return path
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink() and not within(current.resolve(), root.resolve()):
            return current
    return path


def within(path: Path, root: Path) -> bool:
    """Whether the (already resolved) ``path`` is ``root`` or lies under it."""
    return path == root or root in path.parents


def confined(root: Path, path: Path, action: str = "write, rename or delete") -> Path:
    """``path`` if its resolved location lies inside the resolved ``root``; else a one-line ``MiaError`` naming the link.

    Paths that do not exist yet are resolved through their existing parents, so a file about to be
    created under a linked folder is refused too. ``action`` says what the caller would have done there.
    """
    root, path = Path(root), Path(path)
    if not within(path.resolve(), root.resolve()):
        link = _escaping_link(root, path)
        raise MiaError(
            f"{link}: a symbolic link leading outside {root} ({link.resolve()}); refusing to {action} there "
            "(replace the link with a real folder or copy the directory)"
        )
    return path


def plain_name(name: object, where: str, fix: str | None = None) -> str:
    """``name`` if it is one plain folder or file name (no separator, not hidden, not empty); else a one-line ``MiaError``.

    Names read from files (a run's outputs, a recorded run id) and names of study folders are joined
    into paths: ``..``, ``/etc`` or ``a/b`` would lead a read or write elsewhere. ``fix``: what a name
    read from a file asks for (the command that writes the file again); a name the user typed needs none.
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise MiaError(f"{where} {name!r}: must be a plain folder name (no '/', not empty, not starting with '.')" + (f"; {fix}" if fix else ""))
    return name


def confined_all(root: Path, paths: list[Path]) -> None:
    """Check every path (one-line error at the first that leaves ``root``) before anything is written."""
    for path in paths:
        confined(root, path)
