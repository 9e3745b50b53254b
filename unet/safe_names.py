"""Safe file names for ids that come from outside, and a writer that never leaves its folder.

Used by :mod:`unet.render` to turn ``image_id``s (paths, tar members, ``file.parquet#row``) into
files below one local folder: :func:`safe_relpath` makes an id a relative path that cannot escape,
:func:`file_name` gives the ``.png`` a row's mask gets, :class:`Names` keeps two rows from
overwriting each other, :class:`Writer` refuses to write through links or files where folders
should be. The rules are listed in :mod:`unet.render`'s docstring.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import stat
import uuid

from . import storage
from .runtime import UsageError
from .inference.plan import IMAGE_SUFFIXES

__all__ = ["MAX_NAME_BYTES", "Names", "Writer", "file_name", "is_plain_relative", "safe_relpath"]

MAX_NAME_BYTES = 200  # file/folder name length kept (file systems allow 255; room for "~n.png")

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def _shorten(name: str, keep_suffix: str = "") -> str:
    """``name`` cut to MAX_NAME_BYTES of UTF-8 (keeping ``keep_suffix``) with a hash of the whole."""
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    head = name[:len(name) - len(keep_suffix)] if keep_suffix else name
    budget = MAX_NAME_BYTES - len(keep_suffix.encode()) - len(digest) - 1
    head = head.encode()[:budget].decode("utf-8", errors="ignore")
    return f"{head}-{digest}{keep_suffix}"


def safe_relpath(image_id: str) -> tuple[str, list[str]]:
    """``image_id`` as a relative path that stays inside its folder, and what was changed (empty
    when nothing). The last component keeps its extension; :func:`file_name` swaps it for .png."""
    notes: list[str] = []
    text = image_id
    if _CONTROL.search(text):
        text = _CONTROL.sub("_", text)
        notes.append("backslash or control character replaced by '_'")
    if text.startswith("/") or _DRIVE.match(text):
        notes.append("absolute path made relative")
        if _DRIVE.match(text):
            text = text[0] + "_" + text[2:]
    parts: list[str] = []
    raw = text.split("/")
    if "" in raw[1:]:  # "a//b", "a/"; a leading "" is the absolute path noted above
        notes.append("empty path component dropped")
    for i, part in enumerate(raw):
        if part == "":
            continue
        if part in (".", ".."):
            notes.append(f"'{part}' component replaced")
            part = "_" * len(part)
        last = i == len(raw) - 1
        if not last and part.lower().endswith(".png"):
            notes.append(f"folder {part!r} renamed (ends in .png)")
            part += "_"
        short = _shorten(part)
        if short != part:
            notes.append("over-long name shortened")
        parts.append(short)
    if not parts:
        notes.append("empty id")
        parts = ["_"]
    # Keep the notes in the order they first happened, once each.
    return "/".join(parts), list(dict.fromkeys(notes))


def is_plain_relative(image_id: str) -> bool:
    """True when ``image_id`` is a relative path that cannot leave its folder (no absolute path,
    drive, ``.``/``..``/empty component, backslash or control character)."""
    return not (image_id.startswith("/") or _DRIVE.match(image_id) or _CONTROL.search(image_id)
                or any(p in ("", ".", "..") for p in image_id.split("/")))


def file_name(image_id: str) -> tuple[str, list[str]]:
    """The file a row's mask (and overlay) gets, relative to ``masks/`` (``overlays/``), before
    collisions are resolved; and what was changed in the id to make it safe."""
    rel, notes = safe_relpath(image_id)
    folder, _, name = rel.rpartition("/")
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            name = name[:-len(suffix)]
            break
    name = _shorten((name or "_") + ".png", keep_suffix=".png")
    return (f"{folder}/{name}" if folder else name), notes


class Names:
    """Names already given in this run (case-folded, so that case-insensitive file systems cannot
    merge two of them); on disk, so memory does not grow with the output."""

    def __init__(self, directory: str):
        self._db = sqlite3.connect(os.path.join(directory, "names.sqlite"))
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE names (key TEXT PRIMARY KEY) WITHOUT ROWID")

    def _claim(self, rel: str) -> bool:
        return self._db.execute("INSERT OR IGNORE INTO names VALUES (?)", (rel.casefold(),)).rowcount == 1

    def claim(self, rel: str) -> tuple[str, bool]:
        """A free name for ``rel`` (itself, else ``<stem>~n.png``) and whether it had to change."""
        if self._claim(rel):
            return rel, False
        stem = rel[:-len(".png")]
        n = 2
        while not self._claim(candidate := f"{stem}~{n}.png"):
            n += 1
        return candidate, True

    def close(self) -> None:
        self._db.close()


class Writer:
    """Writes files below one local folder and nowhere else."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._checked: set[str] = set()  # folders made or checked; bounded by the folders written

    def _folder(self, rel_folder: str) -> str:
        path = self.root
        done = ""
        for part in rel_folder.split("/") if rel_folder else ():
            path = os.path.join(path, part)
            done = f"{done}/{part}"
            if done in self._checked:
                continue
            try:
                os.mkdir(path)
            except FileExistsError:
                # A link could lead outside the folder; a file cannot hold files.
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise UsageError(f"{path} exists and is not a folder (a file or a symbolic link); "
                                     f"refusing to write through it: render into an empty folder") from None
            self._checked.add(done)
        return path

    def write(self, rel: str, data: bytes) -> None:
        folder, _, name = rel.rpartition("/")
        parent = self._folder(folder)
        target = os.path.join(parent, name)
        if os.path.commonpath([self.root, os.path.realpath(parent)]) != self.root:
            raise AssertionError(f"{target} is outside {self.root}")  # cannot happen: sanitised names
        # A temporary renamed into place: replaces a symbolic link at the target, never follows it.
        tmp = os.path.join(parent, f".{name[:100]}.tmp-{uuid.uuid4().hex[:8]}")
        with storage.errors(target, "write"):
            try:
                with open(tmp, "xb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except OSError:
                if os.path.lexists(tmp):
                    os.remove(tmp)
                raise
