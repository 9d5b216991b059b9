"""Names that become file names, and writes and deletes proven to stay inside their root.

Task names, domain names and run ids come from user data (a dataset's attribute header, its
folder names, a configuration) and end up in paths (a sweep's ``single-<task>_seed0`` run
directory). :func:`check_name` is applied where such a name enters gradlens, and
:func:`inside` / :func:`remove_tree` check every path built from one against the root it must
stay in, after resolving symlinks and ``..``.

Example:
    >>> check_name("left_digit", "task name")
    'left_digit'
    >>> check_name("a/../../victim", "task name")
    Traceback (most recent call last):
    ...
    gradlens._errors.GradlensError: `task name` should be a name usable as a file name ...
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from pathlib import Path

from gradlens._errors import GradlensError

__all__: list[str] = []

#: The longest name accepted (run ids are built from several names; file names stop at 255 bytes).
MAX_NAME = 100
_FORBIDDEN = '/\\:*?"<>|'


def check_name(name: object, what: str) -> str:
    """``name`` if it is safe as one path component, else a :class:`GradlensError` naming ``what``.

    Safe: a string of 1 to :data:`MAX_NAME` characters with no path separator, no character
    that Windows forbids in file names, no control or format character (NUL, newline, bidi
    overrides...), not starting with ``.`` (so never ``.``, ``..`` or a hidden file) and without
    leading or trailing spaces.
    """
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and not name.startswith(".")
        and name == name.strip()
        and not any(c in _FORBIDDEN or unicodedata.category(c)[0] == "C" for c in name)
    )
    if not ok:
        shown = ", ".join(repr(c) for c in _FORBIDDEN)
        raise GradlensError(
            f"`{what}` should be a name usable as a file name (1 to {MAX_NAME} characters, no "
            f"{shown}, control characters, no leading '.' or surrounding spaces); found "
            f"{name!r:.120}."
        )
    return name  # type: ignore[return-value]  # checked to be a str above


def inside(
    root: str | os.PathLike[str], path: str | os.PathLike[str], *, follow: bool = True
) -> Path:
    """``path`` if it resolves to a strict descendant of ``root``; else a GradlensError.

    With ``follow=False`` a symlink as the last component is not followed (the link itself is
    what is checked: it is about to be removed, not written through).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> inside(d, Path(d) / "run").name
        'run'
        >>> inside(d, Path(d) / "x" / ".." / ".." / "victim")
        Traceback (most recent call last):
        ...
        gradlens._errors.GradlensError: Refusing to use ... outside ...
    """
    base = Path(root).resolve()
    p = Path(path)
    if follow or p.name in ("", ".", ".."):
        target = p.resolve()
    else:
        target = p.parent.resolve() / p.name
    if target == base or base not in target.parents:
        raise GradlensError(
            f"Refusing to use {Path(path)}: it resolves to {target}, outside the directory "
            f"{base} that gradlens writes, deletes and reads run files in."
        )
    return Path(path)


def remove_tree(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Delete ``path`` (a directory, or a file or link) after checking it lies inside ``root``.

    A symlink is removed itself, never followed.
    """
    p = Path(path)
    if p.is_symlink():
        inside(root, p, follow=False)  # the link itself must be inside; its target is kept
        p.unlink()
        return
    inside(root, p)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
