"""Converted cogvae checkpoints: an atomic folder holding Orbax and/or msgpack parameters.

Layout of a checkpoint folder::

    orbax/             an Orbax PyTree checkpoint of the nested parameter tree (numpy leaves)
    params.msgpack     flax.serialization msgpack of the same nested dict (bf16 round-trips)
    config.json        the diffusers config (``VAEConfig.to_diffusers_config()``)
    provenance.json    where the weights came from and how they were checked
    COMPLETE           the manifest, written last: every file with its size and sha256

Everything is built in a hidden temporary sibling folder (``.{name}.tmp-XXXX``) and renamed into
place at the end, so a conversion killed at any moment leaves no folder at ``out``, and a folder
without a valid ``COMPLETE`` manifest is refused by :func:`read_checkpoint` (and ``load``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np

import ml_dtypes

from cogvae.model import ConfigError, VAEConfig

from .hub import CHECKPOINT_FOLDER, UnreadableError, local_path, not_a_folder, unreadable
from . import interrupts
from .layout import (CONFIG_NAME, FORMAT_PREFIX, MANIFEST_NAME, MSGPACK_NAME, ORBAX_DIR, PROVENANCE_NAME, WEIGHTS_NAME,
                     read_json)
from .st_io import aligned_empty, unholdable

__all__ = [
    "CheckpointError",
    "OutputError",
    "FORMATS",
    "MANIFEST_NAME",
    "write_checkpoint",
    "read_checkpoint",
    "read_format",
    "is_converted_checkpoint",
    "looks_like_checkpoint",
    "atomic_output_dir",
    "check_files",
    "check_not_inside",
    "check_not_source",
    "params_to_model",
    "tensor_digest",
    "nest",
    "flatten",
]

FORMATS = ("orbax", "msgpack")
CHECKPOINT_KIND = "cogvae-checkpoint"
CHECKPOINT_VERSION = 1
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
_MSGPACK_MAX_CHUNK = 2**30  # flax splits larger arrays into chunks; we refuse them instead


class CheckpointError(ValueError):
    """A converted checkpoint that is missing, incomplete or corrupt; the message names the folder."""


class ReplacedWhileReadingError(CheckpointError):
    """The checkpoint was replaced (a conversion or save with --overwrite) each time it was read:
    not a corrupt checkpoint, one to read again once the writing is done."""


class FormatNotHeldError(CheckpointError):
    """A sound checkpoint without the format asked for (``format=``, ``--format``): an option that
    does not fit the input, not a corrupt checkpoint."""


class OutputError(OSError):
    """An output location that cannot be used (exists without overwrite, not writable)."""


class UnreadableCheckpointError(CheckpointError, UnreadableError):
    """A checkpoint file or folder the system will not let us read (permission denied, a name too
    long, an I/O error): a :class:`CheckpointError` and a ``hub.UnreadableError`` (bad input, not
    a corrupt checkpoint); the message names the file and the reason."""


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{'a.b.0.c': x}`` -> ``{'a': {'b': {'0': {'c': x}}}}`` (string keys, insertion order)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tensor_digest(a: np.ndarray) -> str:
    """A cheap identity of one tensor: dtype, shape and crc32 of its bytes."""
    a = np.ascontiguousarray(a)
    crc = zlib.crc32(memoryview(a.reshape(-1).view(np.uint8))) if a.size else 0
    return f"{a.dtype.name}{list(a.shape)}:{crc:08x}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# fsync errors that mean "not supported here" (some file systems cannot sync a folder, or at all);
# any other (EIO, ENOSPC, EDQUOT: a delayed write that failed) means the data is not on disk.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EBADF})


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Sync ``path``'s data (a file) or entries (a folder) to disk. A failed write that the sync
    reports raises OSError naming the path, so that an output whose bytes did not reach the disk
    is not renamed into place; a file system that cannot sync is let be."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise OSError(e.errno, f"{path}: data not written to disk: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _slow_write_hook() -> None:
    """Test-only: ``COGVAE_TEST_SLOW_WRITE=seconds`` sleeps between files (to kill a writer mid-way)."""
    delay = os.environ.get("COGVAE_TEST_SLOW_WRITE")
    if delay:
        time.sleep(float(delay))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------
# atomic output folder
# ----------------------------------------------------------------------------------------


def _is_diffusers_export(folder: Path) -> bool:
    """A folder holding nothing but a diffusers model's files (config.json, diffusion_pytorch_model*),
    what ``export-diffusers`` writes."""
    names = [p.name for p in folder.iterdir()]
    return "config.json" in names and all(n == "config.json" or n.startswith(WEIGHTS_NAME) for n in names)


def _is_replaceable_checkpoint(folder: Path) -> bool:
    """A complete checkpoint and nothing else: a valid ``COMPLETE`` manifest that lists every file
    under ``folder`` (a symlink counts as a file, and is not followed). A folder merely holding
    a file or folder of a checkpoint's name (a training run's ``orbax/``, someone's
    ``provenance.json``) is not one, so ``--overwrite`` never deletes a file cogvae did not write."""
    try:
        listed = set(_read_manifest(folder)["files"]) | {MANIFEST_NAME, OWNER_FILE}
    except (CheckpointError, OSError):
        return False

    def unreadable_folder(e: OSError) -> None:  # a folder that cannot be listed may hold anything
        raise e

    for top, dirs, files in os.walk(folder, onerror=unreadable_folder):
        here = Path(top)
        links = [d for d in dirs if (here / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        if any((here / n).relative_to(folder).as_posix() not in listed for n in files + links):
            return False
    return True


#: What ``overwrite`` may replace, by kind of output: an empty folder, or one of the same kind.
_REPLACEABLE = {"checkpoint": ("a cogvae checkpoint", "every file listed by its COMPLETE manifest",
                               _is_replaceable_checkpoint),
                "diffusers": ("a diffusers model folder", "config.json and diffusion_pytorch_model files only",
                              _is_diffusers_export)}


def _preflight(out: Path, overwrite: bool, replaces: str = "checkpoint") -> None:
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        # replacing it would pull the folder this process (and the user's shell) stands in away
        raise OutputError(f"{out}: the output folder {'is' if out == cwd else 'holds'} the current folder; "
                          "pick another output folder")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: a symlink to {os.readlink(out)}, which does not exist; remove the link or "
                          "pick another output folder")
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out}: output already exists (pass --overwrite / overwrite=True to replace it)")
        if not out.is_dir():
            raise OutputError(f"{out}: output exists and is not a folder; refusing to replace it")
        # --overwrite deletes the old folder: only ever one this kind of output wrote, so that a
        # mistyped --out (the source pipeline, a project folder, ~) is never wiped.
        what, means, ok = _REPLACEABLE[replaces]
        try:
            entries = sorted(p.name for p in out.iterdir())
            replaceable = _replaceable(out, replaces)
        except OSError as e:
            raise OutputError(f"{out}: cannot read the existing output folder: {e.strerror or e}") from None
        if not replaceable:
            shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
            raise OutputError(f"{out}: exists and is not {what} ({means}; it holds {shown}); --overwrite only "
                              f"replaces {what} or an empty folder: remove it yourself or pick another output folder")


def _replaceable(folder: Path, replaces: str) -> bool:
    """An empty folder, or an output of the kind ``replaces`` names (what --overwrite may delete)."""
    return not any(folder.iterdir()) or _REPLACEABLE[replaces][2](folder)


def _may_replace(path: Path, replaces: str) -> bool:
    """Whether what was moved away from the output is one --overwrite may delete: a real folder
    (not a file, not a link) that :func:`_replaceable` accepts; False for one that cannot be
    listed (something else put there meanwhile is never deleted)."""
    try:
        return path.is_dir() and not path.is_symlink() and _replaceable(path, replaces)
    except OSError:
        return False


def check_not_source(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """Refuse an output folder that is the source folder or holds it: writing it would replace
    (with --overwrite, delete) the files being read."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or o in s.parents:
        raise OutputError(f"{out}: the output folder {'is' if o == s else 'contains'} the source {source}; "
                          "pick another output folder")


def check_not_inside(out: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Refuse an output folder inside a checkpoint that is read: its files would join the
    checkpoint's, which then no longer matches its manifest (under ``orbax/`` it is refused)."""
    o, c = Path(out).expanduser().resolve(), Path(checkpoint).expanduser().resolve()
    if c in o.parents:
        raise OutputError(f"{out}: the output folder is inside the checkpoint {checkpoint} it comes from, which "
                          "it would corrupt; pick a folder outside it")


OWNER_FILE = ".cogvae-owner"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling_prefix(out: Path, kind: str) -> str:
    """The name prefix of ``out``'s hidden temporary (``kind`` 'tmp') or set-aside ('old') siblings:
    ``.{name}.{kind}-``, with a long name shortened (plus a hash of it) so that the sibling's name
    still fits the file system's 255 bytes wherever ``out``'s own name does."""
    name = out.name
    raw = os.fsencode(name)  # the name's bytes on disk: a name that is not UTF-8 comes as surrogate escapes
    if len(raw) > 200:
        name = raw[:180].decode(errors="ignore") + "~" + hashlib.sha1(raw).hexdigest()[:8]
    return f".{name}.{kind}-"


#: A temporary sibling without an owner file is one only for the instant between its owner file's
#: removal and the swap (or the owner file's return into a swapped-out old output); one this old
#: was left by a killed run (or an older cogvae, which removed the owner file for longer).
OWNERLESS_STALE_S = 600.0


def _owner_stale(d: Path, host: str) -> bool:
    try:
        owner_host, pid = (d / OWNER_FILE).read_text().split()
        return owner_host == host and not _pid_alive(int(pid))
    except FileNotFoundError:
        try:
            return time.time() - d.stat().st_mtime > OWNERLESS_STALE_S
        except OSError:
            return False
    except (OSError, ValueError):
        return False


def _remove_owner_last(d: Path) -> None:
    """Delete the folder ``d``, its owner file last: a run killed midway leaves the rest with the
    owner file, which the next run recognises as stale and finishes deleting."""
    try:
        children = [c for c in d.iterdir() if c.name != OWNER_FILE]
    except OSError:
        return
    for c in children:
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                c.unlink()
    with contextlib.suppress(OSError):
        (d / OWNER_FILE).unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Clean up after a killed conversion to ``out``: delete its ``.{name}.tmp-*`` siblings, and
    put back the old output a killed ``--overwrite`` had set aside (``.{name}.old-*``) when ``out``
    is missing, deleting it only when ``out`` is there.

    Only folders whose owner file names this host and a process that no longer exists are
    touched, so a conversion running concurrently into the same parent is never disturbed.
    """
    import glob

    removed = []
    host = socket.gethostname()
    for kind in ("old", "tmp"):  # set-aside outputs first: one may need to go back to ``out``
        for d in out.parent.glob(glob.escape(_sibling_prefix(out, kind)) + "*"):
            if not _owner_stale(d, host):
                continue
            if kind == "old" and (d / "old").is_dir() and not (out.exists() or out.is_symlink()):
                try:
                    os.rename(d / "old", out)  # the killed run never put its new output in place
                except OSError:
                    continue  # left as it is: nothing is deleted that could not be put back
            _remove_owner_last(d)
            removed.append(d)
    return removed


def _tree_state(path: Path) -> list:
    out = []
    for p in path.rglob("*"):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _remove_tree(path: Path, *, settle: float = 0.5, timeout: float = 15.0) -> None:
    """Remove a failed output's temporary folder once nothing writes into it any more: a failed
    Orbax save returns while tensorstore still completes writes it had started (recreating the
    folders they go to), so the tree must be still for ``settle`` seconds first."""
    deadline = time.monotonic() + timeout
    last, still_since = None, time.monotonic()
    while time.monotonic() < deadline:
        state = _tree_state(path)
        if state != last:
            last, still_since = state, time.monotonic()
        elif time.monotonic() - still_since >= settle:
            break
        time.sleep(0.05)
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.1)
        if not path.exists():
            return


_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``; False where the C library, kernel or file system cannot
    (the caller then does without); any other failure raises OSError naming ``b``."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL("libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc, or a glibc before 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the folders at ``a`` and ``b`` (``RENAME_EXCHANGE``); False where the
    system cannot, so the caller renames in two steps."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_new(tmp: Path, out: Path, given) -> None:
    """Rename ``tmp`` to ``out``, which must not exist: never replaces anything that appeared at
    ``out`` since it was checked (a plain rename would replace an empty folder there; a folder
    of files would be deleted by an exchange). ``RENAME_NOREPLACE`` where the system has it."""
    import errno

    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
        if out.exists() or out.is_symlink():  # without renameat2: the check closest to the rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{given}: output already exists: it appeared while the output was being "
                              "written (pass --overwrite / overwrite=True to replace it)") from None
        raise


def _os_path(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path naming what the system opens for it: the folders above its last
    part resolved as the system resolves them (a symlink first, then ``..``: ``link/../x`` is next
    to the link's target, where readers will look, not next to the link as ``abspath`` has it). The
    last part is kept, a symlink included (its target is dealt with by the caller)."""
    s = os.fspath(out)
    s = os.path.join(os.getcwd(), s) if not os.path.isabs(s) else s
    s = s.rstrip(os.sep) or os.sep  # "ckpt/" is "ckpt"
    head, name = os.path.split(s)
    if name in ("", ".", ".."):
        return Path(os.path.realpath(s))
    return Path(os.path.realpath(head)) / name


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False, replaces: str = "checkpoint") -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; on success rename it to ``out``.

    An existing ``out`` is refused unless ``overwrite``, and even then unless it is empty or an
    output of the same kind (``replaces``: 'checkpoint' or 'diffusers'); it is then swapped with
    the new one in one atomic step where the system can (Linux ``renameat2``), else set aside,
    replaced and deleted, with a killed run's set-aside output put back by the next run. An ``out``
    that is a symlink to a folder keeps the link: the folder it points to is replaced. On any
    exception the temporary folder (and any parent folders created for ``out``) is removed and
    ``out`` is untouched. Failures to create or rename raise :class:`OutputError` naming the path.
    """
    given = out

    out = _os_path(local_path(out))
    try:
        if out.is_symlink():  # replace what the link points to; the link stays
            _preflight(out, overwrite, replaces)
            out = out.resolve()
        if out.parent.is_dir():  # first: a killed --overwrite's set-aside output goes back to ``out``
            remove_stale_temporaries(out)
        _preflight(out, overwrite, replaces)
    except OutputError:
        raise
    except OSError as e:  # a parent without search permission, a name too long, ...
        raise OutputError(f"{given}: cannot use as output folder: {e.strerror or e}") from None
    created = []  # parent folders made for ``out``, removed again if nothing is written
    for anc in [out.parent, *out.parent.parents]:
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise OutputError(f"{given}: cannot create output folder: {anc} is not a folder")
            break
        created.append(anc)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(created)
        raise OutputError(f"{given}: cannot create output folder: {e.strerror or e}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        _remove_created(created)
        # e.g. a writable mount point inside a read-only folder: the output itself may be writable
        raise OutputError(f"{given}: cannot create a temporary folder in {out.parent} ({e.strerror or e}): the "
                          f"output is written next to where it goes and renamed into place, so {out.parent} "
                          "must be writable") from None
    old, foreign = None, False
    try:
        yield tmp
        # every file's data on disk before the rename makes the output visible; a failed delayed
        # write shows here (EIO, ENOSPC) and stops the output
        try:
            for f in sorted(tmp.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    _fsync_path(f)
            _fsync_path(tmp, directory=True)
        except OSError as e:  # an output problem for every writer (the message names the file)
            raise OutputError(f"{given}: cannot write: {e.strerror or e}") from None
        interrupts.check()  # a Ctrl-C CPython discarded: the output the user meant to keep stays
        _preflight(out, overwrite, replaces)  # it may have appeared meanwhile
        try:
            (tmp / OWNER_FILE).unlink()
            if not (overwrite and out.exists()):
                _rename_new(tmp, out, given)
            elif _exchange(tmp, out):
                # tmp now holds what was at ``out``: never deleted until it is known to be the output
                # --overwrite may replace (something else may have been put there since the check:
                # a file, a folder that cannot be read, which _replaceable raises for)
                foreign = True
                if not _may_replace(tmp, replaces):
                    _exchange(tmp, out)
                    foreign = False
                    raise OutputError(f"{given}: exists and is not {_REPLACEABLE[replaces][0]} (it was put there "
                                      "while the output was being written); left as it is")
                foreign, old = False, tmp  # the previous output: owned again, so a kill leaves it to the next run
                (old / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            else:
                old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=out.parent))
                (old / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
                os.rename(out, old / "old")
                if not _may_replace(old / "old", replaces):
                    os.rename(old / "old", out)
                    raise OutputError(f"{given}: exists and is not {_REPLACEABLE[replaces][0]} (it was put there "
                                      "while the output was being written); left as it is")
                _rename_new(tmp, out, given)
        except OutputError:
            raise
        except OSError as e:
            if foreign:
                raise OutputError(f"{given}: what was put there while the output was being written is not "
                                  f"{_REPLACEABLE[replaces][0]}, and could not be put back: it is at {tmp} "
                                  f"({e.strerror or e})") from None
            raise OutputError(f"{given}: cannot move the finished output into place: {e.strerror or e}") from None
        try:  # the output is in place, its files on disk: the rename's own durability is best effort
            _fsync_path(out.parent, directory=True)
        except OSError:
            pass
        if old is not None:
            _remove_owner_last(old)
    except BaseException:
        aside = old is not None and old != tmp
        if aside and (old / "old").exists() and not out.exists():
            with contextlib.suppress(OSError):  # else left with its owner file: the next run puts it back
                os.rename(old / "old", out)
        if tmp.exists() and not foreign:  # the unfinished output or, once swapped in, the previous one
            _remove_tree(tmp)
        if aside and old.exists() and not (old / "old").exists():
            shutil.rmtree(old, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[Path]) -> None:
    """Remove the parent folders made for an output that was not written, deepest first, as long
    as they are empty (something else may have been put there meanwhile)."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------


def _late_callback_on_a_closed_loop(unraisable) -> bool:
    """Whether an unraisable exception is tensorstore completing a read for an event loop that
    is closed: Orbax runs each restore in its own ``asyncio.run``, and when one read fails (a
    checkpoint replaced mid-read, read again by ``read_checkpoint``) the loop closes while the
    other reads are still in flight; each of them then calls ``loop.call_soon_threadsafe`` from
    a tensorstore thread, which raises with no Python caller. Nothing is lost: their results
    belonged to the failed read."""
    import traceback

    exc = unraisable.exc_value
    frames = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
    return (unraisable.object is None and type(exc) is RuntimeError and str(exc) == "Event loop is closed"
            and frames == ["call_soon_threadsafe", "_check_closed"])


def _drop_late_callbacks_on_closed_loops() -> None:
    """Keep those callbacks (see :func:`_late_callback_on_a_closed_loop`) off stderr: one failed
    Orbax read printed hundreds of "RuntimeError: Event loop is closed" tracebacks. Every other
    unraisable exception goes to the hook that was there. Installed once per process."""
    previous = sys.unraisablehook
    if getattr(previous, "_cogvae_filter", False):
        return

    def hook(unraisable):
        if not _late_callback_on_a_closed_loop(unraisable):
            previous(unraisable)

    hook._cogvae_filter = True
    sys.unraisablehook = hook


def _orbax_checkpointer():
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    # numpy leaves are written straight from our arrays (no deep copy: the save is synchronous
    # and nothing mutates them), uncompressed, so writing costs about one pass over the bytes.
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler()),
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    _drop_late_callbacks_on_closed_loops()
    return ocp.Checkpointer(handler)


#: Characters Orbax cannot have in a checkpoint's path: it finds its per-process OCDBT parts with
#: a glob (a "[...]" in any parent folder matches nothing, so the parts are never merged and the
#: checkpoint does not restore), and tensorstore takes a backslash for a folder separator.
_ORBAX_UNSAFE = frozenset("[]*?\\")


def _orbax_unsafe(text: str) -> bool:
    """Whether Orbax mishandles a path holding ``text``: one of ``_ORBAX_UNSAFE``, or bytes that are
    not UTF-8 (a name Python holds as surrogate escapes; tensorstore cannot take such a str)."""
    if _ORBAX_UNSAFE & set(text):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@contextlib.contextmanager
def _orbax_path(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` (absolute), or, when it holds a character Orbax mishandles (``_ORBAX_UNSAFE``), the
    same folder reached through a symlink to its parent from a fresh temporary folder, removed
    afterwards. Orbax renames inside the real parent, so the result is the same as writing there."""
    path = Path(path).absolute()
    if not _orbax_unsafe(str(path)):
        yield path
        return
    link_dir = Path(tempfile.mkdtemp(prefix="cogvae-orbax-"))
    try:
        if _orbax_unsafe(str(link_dir)) or _orbax_unsafe(path.name):
            raise OutputError(f"{path}: Orbax cannot use this path (it holds one of {''.join(sorted(_ORBAX_UNSAFE))} "
                              f"or bytes that are not UTF-8, and so does the temporary folder {link_dir}); "
                              "set TMPDIR to a plain folder")
        os.symlink(path.parent, link_dir / "p", target_is_directory=True)
        yield link_dir / "p" / path.name
    finally:
        shutil.rmtree(link_dir, ignore_errors=True)  # the link only, never what it points to


def _write_orbax(path: Path, params: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp

    tree = nest({k: np.ascontiguousarray(v) for k, v in params.items()})
    ckptr = _orbax_checkpointer()
    try:  # (a failed save may still be writing: atomic_output_dir waits for that before removing)
        with _orbax_path(path) as where:
            ckptr.save(where, args=ocp.args.PyTreeSave(tree))
            # What Orbax wrote must read back as this tree (shapes and dtypes, from its metadata: no
            # tensor bytes), or no manifest is written for it, validation or not.
            got = _orbax_shapes(ckptr, where)
    except (OutputError, AssertionError):
        raise
    except Exception as e:  # noqa: BLE001 -- an OS error code is mapped by _orbax_save
        if "os_error_code" in str(e):
            raise
        raise OutputError(f"{path}: Orbax wrote a checkpoint that does not read back: {type(e).__name__}: {e}") from e
    finally:
        ckptr.close()
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in params.items()}
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise OutputError(f"{path}: Orbax wrote a checkpoint whose tree differs from the parameters given "
                          f"({len(bad)} entries, e.g. {bad[0]!r})")


def _orbax_save(path: Path, params: dict[str, np.ndarray]) -> None:
    """``_write_orbax``, its write failures as OSError."""
    try:
        _write_orbax(path, params)
    except (ValueError, RuntimeError) as e:
        # tensorstore reports a failed write (disk full, file too large, permissions) as a
        # ValueError carrying the OS error code: an OSError for the callers, who name the output.
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code)) from e


def _ndarray_ext_parts(packer, a: np.ndarray) -> list:
    """The msgpack bytes of ``ExtType(1, packb((shape, dtype_name, data)))`` (flax's ndarray
    encoding) as [headers, data view], so the tensor's bytes are written without copying."""
    import struct

    import msgpack

    n = a.nbytes
    binhdr = (b"\xc4" + struct.pack(">B", n) if n < 2**8 else
              b"\xc5" + struct.pack(">H", n) if n < 2**16 else b"\xc6" + struct.pack(">I", n))
    inner_head = msgpack.packb((tuple(int(d) for d in a.shape), a.dtype.name), use_bin_type=True)[1:]
    inner_head = b"\x93" + inner_head + binhdr
    total = len(inner_head) + n
    fixext = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    if total in fixext:
        exthdr = fixext[total]
    elif total < 2**8:
        exthdr = b"\xc7" + struct.pack(">B", total)
    elif total < 2**16:
        exthdr = b"\xc8" + struct.pack(">H", total)
    else:
        exthdr = b"\xc9" + struct.pack(">I", total)
    data = memoryview(a.reshape(-1).view(np.uint8)) if n else b""
    return [exthdr + struct.pack(">b", _NDARRAY_EXT) + inner_head, data]


def _write_msgpack(path: Path, params: dict[str, np.ndarray]) -> str:
    """Stream ``nest(params)`` as flax.serialization msgpack, one tensor at a time.

    The bytes equal ``flax.serialization.msgpack_serialize(nest(params))``; returns their sha256.
    """
    import msgpack

    packer = msgpack.Packer(use_bin_type=True, strict_types=True)
    h = hashlib.sha256()
    # sha256 runs in a second thread on the same buffers while this one writes (both release
    # the GIL on large buffers), so hashing costs no extra wall time on a machine with 2 cores.
    chunks: queue.Queue = queue.Queue(maxsize=256)

    def hash_chunks() -> None:
        while (b := chunks.get()) is not None:
            h.update(b)

    hasher = threading.Thread(target=hash_chunks, name="cogvae-msgpack-sha256", daemon=True)
    hasher.start()
    try:
        _stream_msgpack(path, params, packer, chunks.put)
    finally:
        chunks.put(None)
        hasher.join()
    return h.hexdigest()


def _stream_msgpack(path: Path, params: dict[str, np.ndarray], packer, also: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:

        def w(b: bytes) -> None:
            f.write(b)
            also(b)

        def walk(node: dict[str, Any]) -> None:
            w(packer.pack_map_header(len(node)))
            for k, v in sorted(node.items()):  # flax's msgpack_serialize sorts keys (a jax tree_map)
                w(packer.pack(k))
                if isinstance(v, dict):
                    walk(v)
                    continue
                a = np.asarray(v)
                if a.nbytes > _MSGPACK_MAX_CHUNK:
                    raise OutputError(f"{path}: tensor {k!r} is over 1 GiB; msgpack format cannot hold it")
                a = np.require(a, requirements="C")  # (ascontiguousarray would make 0-d arrays 1-d)
                for part in _ndarray_ext_parts(packer, a):  # no copy of the tensor bytes
                    w(part)

        walk(nest(params))


def _manifest(folder: Path, formats: Iterable[str], known_sha: dict[str, str]) -> dict[str, Any]:
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST_NAME, OWNER_FILE)]
    rels = [p.relative_to(folder).as_posix() for p in paths]
    todo = [p for p, rel in zip(paths, rels) if rel not in known_sha]
    from .engine import default_workers

    with concurrent.futures.ThreadPoolExecutor(max_workers=default_workers()) as pool:  # hashlib drops the GIL
        hashed = dict(zip(todo, pool.map(_sha256, todo)))
    files = {rel: {"size": p.stat().st_size, "sha256": known_sha.get(rel) or hashed[p]} for p, rel in zip(paths, rels)}
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "formats": list(formats), "files": files}


def normalize_formats(formats: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = FORMATS if formats == "both" else (formats,)
    out = tuple(dict.fromkeys(formats))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"unknown checkpoint format(s) {bad or list(out)}; use 'orbax', 'msgpack' or both")
    return out


def _check_free_space(folder: Path, need: int) -> None:
    """Fail before writing when the file system cannot hold ``need`` bytes: a disk filling up
    in the middle of an Orbax save makes its writer threads print a traceback for every chunk
    still in flight (hundreds of lines around the one error that matters)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        import errno

        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the checkpoint needs {human_size(need)}, "
                                    f"{human_size(free)} free at {folder.parent}")


def human_size(n: int) -> str:
    """``1.7 GB``, ``2.1 MB``, ``512 B``: the unit that shows the figure (a tiny file system too)."""
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def write_into(
    folder: Path,
    params: dict[str, np.ndarray],
    config: VAEConfig,
    *,
    formats: Iterable[str] = FORMATS,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, str]:
    """Write config and parameter files into an existing (temporary) folder; returns known sha256s."""
    formats = normalize_formats(formats)
    known: dict[str, str] = {}
    note = progress or (lambda _msg: None)
    _check_free_space(folder, sum(a.nbytes for a in params.values()) * len(formats))
    _write_json(folder / CONFIG_NAME, config.to_diffusers_config())
    orbax_job = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        if "orbax" in formats:
            _slow_write_hook()
            # Orbax writes from its own threads while this one streams the msgpack file: the two
            # formats are written at the same time from the same arrays (read-only, never copied).
            orbax_job = pool.submit(_orbax_save, folder / ORBAX_DIR, params)
        if "msgpack" in formats:
            _slow_write_hook()
            known[MSGPACK_NAME] = _write_msgpack(folder / MSGPACK_NAME, params)
            note("msgpack")
        if orbax_job is not None:
            orbax_job.result()
            note("orbax")
    _slow_write_hook()
    return known


def finish_into(folder: Path, formats: Iterable[str], provenance: dict, known_sha: dict[str, str]) -> dict:
    """Write provenance and, last, the ``COMPLETE`` manifest. ``folder`` is an
    ``atomic_output_dir``'s temporary folder, which syncs every file to disk before the rename
    that makes the checkpoint visible."""
    _write_json(folder / PROVENANCE_NAME, provenance)
    manifest = _manifest(folder, normalize_formats(formats), known_sha)
    _slow_write_hook()
    _write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def write_checkpoint(
    out_dir: str | os.PathLike,
    params: dict[str, np.ndarray],
    config: VAEConfig,
    *,
    formats: Iterable[str] = FORMATS,
    provenance: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted checkpoint atomically (see the module docstring); returns its path.

    ``params`` must fit ``config``'s architecture (every parameter, with its shape, nothing extra),
    with dtypes cogvae stores and finite values: what ``load`` requires, checked before writing."""
    formats = normalize_formats(formats)
    out = local_path(out_dir)  # the path returned is the one written: ~ expanded
    from flax import nnx

    from cogvae.model import abstract_model

    problems = param_problems(params, list(nnx.to_flat_state(nnx.split(abstract_model(config))[1])), str(out))
    if problems:
        raise _unfit(out, problems)
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            known = write_into(tmp, params, config, formats=formats)
            finish_into(tmp, formats, dict(provenance or {}), known)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{out}: cannot write checkpoint: {e.strerror or e}") from None
    return out


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """A folder with any converted-checkpoint file (complete or not): load() treats it as one. A
    folder that cannot be looked into is not taken for one (reading it then names the problem)."""
    p = local_path(path)
    # OWNER_FILE marks a conversion's temporary folder from its first moment (it is removed just
    # before the rename), so a folder killed before any parameter file was written still reads as
    # an interrupted conversion rather than as a diffusers folder with its config.json.
    # (provenance.json is no such file: other tools write one too, and a diffusers folder that
    # holds one is still a diffusers folder, as diffusers' from_pretrained sees it)
    names = (MANIFEST_NAME, ORBAX_DIR, MSGPACK_NAME, OWNER_FILE)
    try:
        return p.is_dir() and any((p / n).exists() for n in names)
    except OSError:  # permission denied, a name too long
        return False


def _read_manifest(folder: Path) -> dict[str, Any]:
    mpath = folder / MANIFEST_NAME
    try:
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such checkpoint folder")
    except OSError as e:  # a parent that cannot be searched, a name too long
        raise unreadable(folder, e, UnreadableCheckpointError) from None
    if not folder.is_dir():
        raise CheckpointError(not_a_folder(folder, CHECKPOINT_FOLDER))
    try:
        listed = mpath.is_file()
    except OSError as e:  # the folder cannot be searched
        raise unreadable(folder, e, UnreadableCheckpointError) from None
    if not listed:
        raise CheckpointError(
            f"{folder}: incomplete or not a cogvae checkpoint: no {MANIFEST_NAME} manifest "
            "(was the conversion interrupted?)"
        )
    try:
        manifest = read_json(mpath)
    except OSError as e:  # unreadable, not corrupt
        raise unreadable(mpath, e, UnreadableCheckpointError) from None
    except ValueError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    try:
        if manifest.get("kind") != CHECKPOINT_KIND or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a cogvae checkpoint manifest")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{mpath}: unsupported checkpoint version {manifest.get('version')!r}")
    problems = _manifest_problems(manifest)
    if problems:
        raise CheckpointError(_listed(f"{mpath}: corrupt manifest", problems))
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _listed(header: str, problems: list[str]) -> str:
    """One problem on the header's line; several one per line below it."""
    if len(problems) == 1:
        return f"{header}: {problems[0]}"
    return f"{header}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _manifest_problems(manifest: dict) -> list[str]:
    """What a manifest must hold for every reader to trust it: each entry a plain relative path
    inside the folder with an integer size and a sha256; each declared format with its files
    listed (a manifest missing them would leave that format's files unchecked), and the config."""
    problems = []
    files = manifest["files"]
    for rel, meta in files.items():
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            problems.append(f"{rel!r}: not a relative path inside the checkpoint folder")
        elif not (isinstance(meta, dict) and type(meta.get("size")) is int and meta["size"] >= 0
                  and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])):
            problems.append(f"{rel}: entry {json.dumps(meta)[:80]} is not {{\"size\": <bytes>, \"sha256\": <hex>}}")
    formats = manifest.get("formats")
    if not isinstance(formats, list) or not formats or any(f not in FORMATS for f in formats):
        problems.append(f"formats {json.dumps(formats)[:80]}: expected a non-empty list of {', '.join(FORMATS)}")
    else:
        for f in formats:
            if not any(rel.startswith(FORMAT_PREFIX[f]) for rel in files):
                problems.append(f"lists no {f} files, though its formats include {f}")
    if CONFIG_NAME not in files:
        problems.append(f"does not list {CONFIG_NAME}")
    return problems


def _blocking_folder(folder: Path, p: Path) -> Path:
    """The folder that stops a stat of ``p`` (under ``folder``): the parent of the first path on the
    way down that cannot be looked at (a folder without search permission)."""
    for q in [*reversed(p.relative_to(folder).parents), Path(p.relative_to(folder))][1:]:
        try:
            os.stat(folder / q)
        except OSError:
            return (folder / q).parent
    return p.parent


def _verify_files(folder: Path, manifest: dict, prefixes: Iterable[str], hashes: bool, only: bool = False,
                  opened: bool = False) -> None:
    """Every file the manifest lists must be there with its size (``only``: just those under
    ``prefixes``), and with ``hashes`` those under ``prefixes`` must have its sha256. ``opened``
    (without ``hashes``): those are opened for reading, so that one that cannot be read is named
    as the hashing names it, not later by the format's reader."""
    problems = []
    prefixes = tuple(prefixes)
    for rel, meta in manifest["files"].items():
        if only and not rel.startswith(prefixes):
            continue
        p = folder / rel
        try:
            size = p.stat().st_size if p.is_file() else None
        except OSError as e:  # a stat: a folder on the way to the file cannot be searched
            raise unreadable(_blocking_folder(folder, p), e, UnreadableCheckpointError) from None
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != meta.get("size"):
            problems.append(f"{rel}: size {size}, manifest says {meta.get('size')}")
        elif hashes and rel.startswith(prefixes):
            try:
                digest = _sha256(p)
            except OSError as e:  # unreadable, not corrupt
                raise unreadable(p, e, UnreadableCheckpointError) from None
            if digest != meta.get("sha256"):
                problems.append(f"{rel}: sha256 differs from the manifest (corrupt file)")
        elif opened and rel.startswith(prefixes):
            try:
                os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))  # (a FIFO put there since: no wait)
            except OSError as e:  # unreadable, not corrupt
                raise unreadable(p, e, UnreadableCheckpointError) from None
    if problems:
        raise CheckpointError(_listed(f"{folder}: corrupt checkpoint", problems))


def check_files(path: str | os.PathLike, *, hashes: bool = True) -> None:
    """Raise :class:`CheckpointError` naming every problem unless ``path`` is a complete converted
    checkpoint: a valid manifest, and every file it lists present with its size and (``hashes``)
    its sha256. ``push`` checks this before uploading, so a repo never gets a file that every
    reader (``load``, ``verify``, ``export-diffusers``) would refuse."""
    folder = local_path(path)
    _verify_files(folder, _read_manifest(folder), ("",), hashes=hashes)


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """A complete converted checkpoint: valid manifest, every listed file present with its size."""
    try:
        folder = local_path(path)
        _verify_files(folder, _read_manifest(folder), (), hashes=False)
        return True
    except CheckpointError:
        return False


def _read_orbax(path: Path) -> dict[str, np.ndarray]:
    """``{dotted path: numpy array}`` from an Orbax folder (for device arrays see :func:`iter_orbax`)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = _orbax_checkpointer()
    try:
        with _orbax_path(path) as path:
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                  _orbax_tree_meta(ckptr, path))
            tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        ckptr.close()
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


def _msgpack_dtype(name: str, where: str) -> np.dtype:
    """The dtype a flax msgpack leaf names (``dtype.name``; bfloat16 from ml_dtypes): a number type
    in this machine's byte order, which is what JAX arrays hold. A byte-swapped one (``'>f4'``)
    would read, but no JAX array can be made of it."""
    try:
        dt = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    except TypeError:
        raise ValueError(f"{where}: unknown dtype {name!r}") from None
    if dt.kind not in "biufc" and dt != np.dtype(ml_dtypes.bfloat16):
        raise ValueError(f"{where}: dtype {name!r} is not a number type")
    if not dt.isnative:
        raise ValueError(f"{where}: dtype {name!r} is not in this machine's byte order ({dt.byteorder!r}); "
                         "JAX arrays cannot hold it")
    return dt


class _MsgpackStream:
    """The subset of msgpack that flax's ``msgpack_serialize`` writes for a parameter tree: maps
    with string keys, and leaves that are its ndarray extension ``ExtType(1, (shape, dtype, data))``.

    Parsed straight from the file, so each tensor's bytes are read once, into their own aligned
    array; the file is never held in memory as a whole.
    """

    def __init__(self, f):
        self.f = f

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("file ended early (truncated msgpack)")
        return b

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def map_len(self, tag: int) -> int:
        if 0x80 <= tag <= 0x8F:
            return tag & 0x0F
        if tag == 0xDE:
            return self.uint(2)
        if tag == 0xDF:
            return self.uint(4)
        raise ValueError(f"expected a map, found msgpack type byte 0x{tag:02x}")

    def key(self) -> str:
        tag = self.take(1)[0]
        if 0xA0 <= tag <= 0xBF:
            n = tag & 0x1F
        elif tag in (0xD9, 0xDA, 0xDB):
            n = self.uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[tag])
        else:
            raise ValueError(f"expected a string key, found msgpack type byte 0x{tag:02x}")
        return self.take(n).decode("utf-8")

    def ext(self, tag: int, where: str, data: bool = True):
        """The ndarray at this position; with ``data=False`` only ``(shape, dtype)``, its bytes skipped."""
        import msgpack

        fixed = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if tag in fixed:
            size = fixed[tag]
        elif tag in (0xC7, 0xC8, 0xC9):
            size = self.uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[tag])
        else:
            raise ValueError(f"{where}: expected a map or an ndarray, found msgpack type byte 0x{tag:02x}")
        code = int.from_bytes(self.take(1), "big", signed=True)
        if code != _NDARRAY_EXT:
            raise ValueError(f"{where}: unexpected msgpack extension type {code}")
        # (shape, dtype name, bin): a few dozen header bytes, then the tensor's bytes
        head = self.take(min(size, 256))
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(head)
        if unpacker.read_array_header() != 3:
            raise ValueError(f"{where}: malformed ndarray extension")
        shape = tuple(int(d) for d in unpacker.unpack())
        dtype_name = unpacker.unpack()
        pos = unpacker.tell()
        btag = head[pos]
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(btag)
        if width is None:
            raise ValueError(f"{where}: malformed ndarray extension (no data)")
        nbytes = int.from_bytes(head[pos + 1 : pos + 1 + width], "big")
        data_at = pos + 1 + width
        if data_at + nbytes != size:
            raise ValueError(f"{where}: ndarray extension sizes disagree")
        name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
        dt = _msgpack_dtype(name, where)
        if any(d < 0 for d in shape):
            raise ValueError(f"{where}: shape {list(shape)} has a negative size")
        if why := unholdable(shape, dt):
            raise ValueError(f"{where}: shape {list(shape)} cannot be read as an array ({why})")
        if math.prod(shape) * dt.itemsize != nbytes:
            raise ValueError(f"{where}: {nbytes} data bytes do not fit shape {shape} {name}")
        if not data:
            rest = nbytes - len(head) + data_at
            if rest > 0:
                self.f.seek(rest, os.SEEK_CUR)
            return shape, dt
        out = aligned_empty(shape, dt)
        buf = memoryview(out.reshape(-1).view(np.uint8)) if nbytes else memoryview(bytearray())
        have = head[data_at:]
        buf[: len(have)] = have
        got = len(have)
        while got < nbytes:
            n = self.f.readinto(buf[got:])
            if not n:
                raise ValueError(f"{where}: file ended early (truncated msgpack)")
            got += n
        return out

    def items(self, prefix: str = "", data: bool = True) -> Iterator[tuple[str, Any]]:
        """(dotted path, array) for every leaf under the map that starts here, in file order
        (``data=False``: (dotted path, (shape, dtype))).

        A key given twice in one map (msgpack allows it; flax would keep the last silently) and a
        key that is empty or holds a "." (it would name another tensor's dotted path, or none) are
        refused: which of two values a tensor has must never depend on the reader."""
        seen: set[str] = set()
        for _ in range(self.map_len(self.take(1)[0])):
            k = self.key()
            if k in seen:
                raise ValueError(f"{prefix}{k}: key {k!r} appears more than once in its map")
            if not k or "." in k:
                raise ValueError(f"{prefix}{k}: key {k!r} is not a parameter name (empty, or holds a '.')")
            seen.add(k)
            tag = self.take(1)[0]
            if 0x80 <= tag <= 0x8F or tag in (0xDE, 0xDF):
                self.f.seek(-1, os.SEEK_CUR)
                yield from self.items(f"{prefix}{k}.", data)
            else:
                yield f"{prefix}{k}", self.ext(tag, f"{prefix}{k}", data)


def iter_msgpack(path: str | os.PathLike, *, data: bool = True) -> Iterator[tuple[str, Any]]:
    """Stream a parameter msgpack file: ``(dotted path, array)`` one tensor at a time.

    Reads the format of ``flax.serialization.msgpack_serialize`` (nested string-keyed maps of
    ndarrays; bf16 as ``ml_dtypes.bfloat16``). Each array is freshly allocated and 64-byte aligned.
    ``data=False`` yields ``(dotted path, (shape, dtype))`` and skips the tensor bytes.
    Raises ``ValueError`` for anything else, a truncated file or trailing bytes.
    """
    with open(path, "rb") as f:
        first = f.read(1)
        if not first:
            raise ValueError("empty file")
        f.seek(0)
        yield from _MsgpackStream(f).items(data=data)
        if f.read(1):
            raise ValueError("trailing data after the parameter tree")
        if not data and f.tell() != os.fstat(f.fileno()).st_size:
            raise ValueError("file ended early (truncated msgpack)")


class _NoItemMetadataWarning:
    """A logging filter for Orbax's "Failed to get item metadata from directory" warning: when
    its metadata cannot be read, :func:`_orbax_tree_meta` raises a CheckpointError naming the
    folder, so the warning would be a second, vaguer line before the one ``Error:`` line."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith("Failed to get item metadata from directory")


def _orbax_tree_meta(ckptr, path: Path):
    import logging

    absl = logging.getLogger("absl")
    absl.addFilter(_NoItemMetadataWarning)
    try:
        meta = ckptr.metadata(path)
    finally:
        absl.removeFilter(_NoItemMetadataWarning)
    tree_meta = getattr(meta, "item_metadata", meta)
    tree = getattr(tree_meta, "tree", tree_meta)
    if not isinstance(tree, Mapping):  # Orbax returns None (and logs a warning) when it cannot read it
        raise CheckpointError(f"{path}: cannot read the Orbax checkpoint's metadata (its _METADATA or OCDBT "
                              "files are damaged or missing)")
    return dict(tree)


def _orbax_shapes(ckptr, path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` of the Orbax checkpoint at ``path``, from its metadata (no
    tensor bytes read)."""
    return {k: (tuple(int(d) for d in m.shape), np.dtype(m.dtype))
            for k, m in flatten(_orbax_tree_meta(ckptr, path)).items()}


def iter_orbax(path: str | os.PathLike, *, chunk_bytes: int = 64 << 20) -> Iterator[tuple[str, Any]]:
    """Stream an Orbax parameter folder: ``(dotted path, jax array on the default device)``.

    Orbax restores whole trees; this restores the tree in groups of at most ``chunk_bytes``
    (``partial_restore``), so only one group is in flight on top of what the caller keeps.
    """
    import jax
    import orbax.checkpoint as ocp

    import dataclasses

    if "partial_restore" not in {f.name for f in dataclasses.fields(ocp.args.PyTreeRestore)}:
        chunk_bytes = 1 << 62  # an Orbax without partial restores: one group, the whole tree
    ckptr = _orbax_checkpointer()
    with contextlib.ExitStack() as stack:
        path = stack.enter_context(_orbax_path(path))
        stack.callback(ckptr.close)
        flat = flatten(_orbax_tree_meta(ckptr, path))
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        groups: list[list[str]] = [[]]
        size = 0
        for k, m in flat.items():
            n = int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize
            if groups[-1] and size + n > chunk_bytes:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += n
        for group in groups:
            sub = nest({k: flat[k] for k in group})
            restore_args = jax.tree_util.tree_map(
                lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape, dtype=m.dtype), sub)
            item = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
            partial = {"partial_restore": True} if len(groups) > 1 else {}
            got = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, **partial))
            yield from flatten(got).items()
            del got


def _format_target(folder: str | os.PathLike, fmt: str) -> Path:
    """The file or folder holding one format's parameters in ``folder``; it must exist."""
    folder = Path(folder)
    target = folder / (ORBAX_DIR if fmt == "orbax" else MSGPACK_NAME)
    if not target.exists():
        raise CheckpointError(f"{folder}: no {fmt} parameters ({target.name} missing)")
    return target


def format_meta(folder: str | os.PathLike, fmt: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{dotted path: (shape, dtype)}`` of one format in ``folder``, read without the tensor bytes."""
    target = _format_target(folder, fmt)
    try:
        if fmt == "msgpack":
            return dict(iter_msgpack(target, data=False))
        ckptr = _orbax_checkpointer()
        try:
            with _orbax_path(target) as where:
                return _orbax_shapes(ckptr, where)
        finally:
            ckptr.close()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any reader failure is a corrupt file; say which
        raise CheckpointError(f"{target}: cannot read {fmt} parameters: {type(e).__name__}: {e}") from None


def iter_format(folder: str | os.PathLike, fmt: str) -> Iterator[tuple[str, Any]]:
    """Stream one format's parameters as ``(dotted path, jax array)``, a tensor or a small group
    at a time (see :func:`iter_msgpack` and :func:`iter_orbax`); errors as :class:`CheckpointError`."""
    target = _format_target(folder, fmt)
    try:
        if fmt == "orbax":
            yield from iter_orbax(target)
        else:
            for k, a in iter_msgpack(target):
                yield k, adopt_array(a)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{target}: cannot read {fmt} parameters: {type(e).__name__}: {e}") from None


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    return dict(iter_msgpack(path))


def read_format(folder: str | os.PathLike, fmt: str, *, as_jax: bool = False) -> dict[str, Any]:
    """Parameters of one format in ``folder``, without manifest checks (used to validate a temp dir).

    ``as_jax``: jax arrays on the default device instead of numpy arrays; the weights are then
    held once, by the device (Orbax restores into device buffers; msgpack arrays are adopted).
    """
    if as_jax:
        return dict(iter_format(folder, fmt))
    target = _format_target(folder, fmt)
    try:
        return _read_orbax(target) if fmt == "orbax" else _read_msgpack(target)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any reader failure is a corrupt file; say which
        raise CheckpointError(f"{target}: cannot read {fmt} parameters: {type(e).__name__}: {e}") from None


#: How often ``read_checkpoint`` reads a checkpoint again that was replaced while it read it.
REPLACED_RETRIES = 3


def _identity(folder: Path) -> Optional[tuple[int, int, Optional[str]]]:
    """The checkpoint ``folder`` names now: its device and inode (through a symlink) and the
    SHA-256 of its manifest (None if unreadable); None if there is no folder. The inode alone is
    not enough: a file system reuses a freed inode for the next folder made, so a checkpoint
    swapped out, deleted and replaced again can come back under the same number. The manifest
    lists every file's sha256, so two checkpoints with one manifest hold the same bytes."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino, _manifest_digest(folder / MANIFEST_NAME)


_MANIFEST_DIGEST_LIMIT = 64 << 20  # a manifest lists a few dozen files: far below this


def _manifest_digest(path: Path) -> Optional[str]:
    """SHA-256 of the manifest at ``path`` when it is a regular file of sane size, else None. It
    runs before ``_read_manifest`` refuses anything else: opened without waiting (a FIFO there
    would block a plain read) and never read past its size (a link to /dev/zero never ends)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MANIFEST_DIGEST_LIMIT:
            return None
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


class TensorMeta(NamedTuple):
    """A stored tensor's shape and dtype, without its values (``read_checkpoint(values=False)``)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def read_checkpoint(
    path: str | os.PathLike, format: Optional[str] = None, *, verify: bool = True, as_jax: bool = False,
    values: bool = True,
) -> tuple[VAEConfig, dict[str, Any], dict[str, Any]]:
    """Read a converted checkpoint -> ``(config, {dotted_path: np.ndarray}, info)``.

    ``format``: 'orbax' (default when present) or 'msgpack' (default when orbax is absent).
    The ``COMPLETE`` manifest must exist; the files read (config and the chosen format) must be
    there with their listed sizes, and with ``verify`` match their sha256. The other format's
    files may be absent (a Hub download fetches one format).
    ``info``: ``{'path', 'format', 'formats', 'manifest', 'provenance'}``. ``as_jax``: jax arrays
    on the default device instead of numpy arrays (see :func:`read_format`). ``~`` in ``path`` is
    expanded; a file that cannot be read raises :class:`UnreadableCheckpointError`.
    ``values=False``: each parameter is a :class:`TensorMeta` (shape, dtype) read from the format's
    metadata, the tensor bytes left unread (``inspect``; with ``verify=False`` too, only the file
    sizes are checked against the manifest).

    Files are read by path, so a checkpoint replaced meanwhile (``--overwrite`` swaps the whole
    folder in one rename) could give the hashes of one and the bytes of the other: the folder
    ``path`` names is compared before and after, and a checkpoint replaced during the read is
    read again (the new one is complete), up to ``REPLACED_RETRIES`` times, else refused.
    """
    folder = local_path(path)
    for _attempt in range(REPLACED_RETRIES + 1):
        before = _identity(folder)
        try:
            result = _read_checkpoint_once(folder, format, verify, as_jax, values)
        except Exception as e:  # noqa: BLE001 - a file gone mid-read: the checkpoint was replaced, read it again
            if isinstance(e, AssertionError) or before is None or _identity(folder) in (before, None):
                raise
            continue
        if _identity(folder) == before:
            return result
    raise ReplacedWhileReadingError(f"{folder}: replaced while it was being read, {REPLACED_RETRIES + 1} times in a "
                                    "row (a conversion or save with --overwrite writing it over and over?); read it "
                                    "when it is done")


def _read_checkpoint_once(folder: Path, format: Optional[str], verify: bool, as_jax: bool, values: bool = True
                          ) -> tuple[VAEConfig, dict[str, Any], dict[str, Any]]:
    manifest = _read_manifest(folder)
    formats = manifest.get("formats") or []
    if format is None:
        format = "orbax" if "orbax" in formats else "msgpack"
    if format not in FORMATS:
        raise CheckpointError(f"{folder}: unknown format {format!r}; use 'orbax' or 'msgpack'")
    if format not in formats:
        raise FormatNotHeldError(f"{folder}: holds no {format} parameters (formats: {', '.join(formats) or 'none'})")
    want = (CONFIG_NAME, FORMAT_PREFIX[format])
    _verify_files(folder, manifest, want, hashes=verify, only=True, opened=True)
    prefix = FORMAT_PREFIX[format]
    if prefix.endswith("/"):  # Orbax reads whatever its folder holds: all of it must be what was checked
        unlisted = sorted(rel for rel in (p.relative_to(folder).as_posix() for p in (folder / prefix).rglob("*")
                                          if p.is_file()) if rel not in manifest["files"])
        if unlisted:
            raise CheckpointError(_listed(f"{folder}: corrupt checkpoint",
                                          [f"{rel}: not in the {MANIFEST_NAME} manifest" for rel in unlisted]))
    try:
        config = VAEConfig.from_json_file(folder / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(f"{folder}: bad config: {e}") from None
    if as_jax:  # jax would turn a stored float64 into float32 unseen: check the stored dtypes first
        from .engine import ALLOWED_DTYPES, value_problem

        bad = [f"{folder}: parameter {k!r}: {value_problem(np.zeros(0, dt))}"
               for k, (_shape, dt) in sorted(format_meta(folder, format).items()) if np.dtype(dt).name not in ALLOWED_DTYPES]
        if bad:
            raise _unfit(folder, bad)
    if values:
        params = read_format(folder, format, as_jax=as_jax)
    else:
        params = {k: TensorMeta(tuple(int(n) for n in shape), np.dtype(dt))
                  for k, (shape, dt) in format_meta(folder, format).items()}
    provenance = {}
    try:
        # only a regular file of the size the manifest lists: a FIFO would block the read and a
        # link to /dev/zero never end it (it is informational; a damaged one is left out)
        prov = folder / PROVENANCE_NAME
        listed = manifest["files"].get(PROVENANCE_NAME) or {}
        if prov.is_file() and prov.stat().st_size == listed.get("size"):
            provenance = read_json(prov)
    except (OSError, ValueError):
        pass
    info = {"path": str(folder), "format": format, "formats": formats, "manifest": manifest, "provenance": provenance}
    return config, params, info


# ----------------------------------------------------------------------------------------
# model building
# ----------------------------------------------------------------------------------------


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _glibc():
    """glibc, or None where it is not the C library."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_heap_lean(threshold: int = 256 << 10) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own ``mmap`` (glibc ``mallopt``).

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB) each time such a block is
    freed, after which tensor-sized blocks come from per-thread heaps, where a block freed by one
    thread is not reused by another. A conversion allocates tensors in worker threads, tensorstore
    threads and the main thread in turn, and without this its resident memory grows to about
    twice the live data. A fixed threshold returns every freed tensor to the OS at once.
    Process-wide; a no-op where glibc is not the allocator.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


#: glibc's ceiling for its dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX):
#: where the threshold settles in a long-running process that frees large blocks.
_SETTLED_MMAP_THRESHOLD = 32 << 20


@contextlib.contextmanager
def lean_heap_while_loading():
    """:func:`keep_heap_lean` while a checkpoint is read into the caller's process, then the
    threshold glibc's own adjustment ends at. Loading reads through tensorstore's threads and
    casts in the main thread; without it, resident memory after ``load`` of Orbax was 1.4x the
    weights (1.8x with ``dtype=bfloat16``), none of it given back after ``del``. Kept lean
    afterwards, every activation of a CPU decode of 256 KiB or more would be a fresh mmap (page
    faults; about 5% slower decodes on a 2-core CPU), so the user's process gets glibc's settled
    threshold instead. A no-op where glibc is not the allocator."""
    keep_heap_lean()
    try:
        yield
    finally:
        keep_heap_lean(_SETTLED_MMAP_THRESHOLD)


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors are allocated by worker threads (conversion), tensorstore's threads (Orbax) and the
    main thread; glibc keeps each thread's freed blocks in that thread's arena, where another
    thread's allocations cannot reuse them. Trimming between phases keeps the process's resident
    memory near what is actually live.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def adopt_array(a: np.ndarray):
    """A jax array with the contents of ``a``, which must not be used or changed afterwards.

    On CPU, XLA adopts a 64-byte-aligned, C-contiguous host buffer without a copy, so the model
    and the arrays we read share one copy of the weights; other arrays are first moved into an
    aligned buffer (the unaligned one is then freed). Elsewhere this is a plain ``device_put``.
    """
    import jax

    if isinstance(a, jax.Array):
        return a
    a = np.asarray(a)
    if a.size and (a.ctypes.data % 64 or not a.flags.c_contiguous):
        b = aligned_empty(a.shape, a.dtype)
        b[...] = a
        a = b
    return jax.device_put(a)


def _unfit(name: Any, problems: list[str]) -> CheckpointError:
    """The one error for parameters that do not fit their config, a problem per line."""
    return CheckpointError(f"{name}: parameters do not fit the config: {len(problems)} problem(s):\n"
                           + "\n".join(f"  - {p}" for p in problems))


def param_problems(params: dict[str, Any], flat_state: list, source_name: str) -> list[str]:
    """Every way ``params`` ({dotted path: numpy or jax array}) fails the model whose abstract
    state is ``flat_state``: extra or missing parameters, shapes, dtypes cogvae does not store,
    non-finite values (for arrays in host memory: numpy, or jax on the CPU; an accelerator's
    arrays are not copied to the host for it)."""
    import jax

    from .engine import architecture_problems, path_to_str, value_problem

    expected = {path_to_str(p): tuple(v.get_value().shape) for p, v in flat_state}
    problems = architecture_problems({k: tuple(a.shape) for k, a in params.items()}, expected, source_name)
    for k, want in expected.items():
        a = params.get(k)
        if a is None or tuple(a.shape) != want:
            continue  # named above
        if isinstance(a, jax.Array) and not _on_host(a):
            # On an accelerator only the dtype: counting non-finite values would compile a kernel
            # per tensor shape (seconds per load). The writers check values, and the manifest's
            # sha256 guarantees the bytes loaded are the bytes they checked.
            problem = value_problem(np.zeros(0, a.dtype))
        else:
            problem = value_problem(np.asarray(a))  # (a CPU jax array is viewed, not copied)
        if problem:
            problems.append(f"{source_name}: parameter {k!r}: {problem}")
    return problems


def _on_host(a) -> bool:
    try:
        return all(d.platform == "cpu" for d in a.devices())
    except Exception:  # noqa: BLE001 - a tracer or an array without devices: treat as on device
        return False



def params_to_model(
    config: VAEConfig,
    params: dict[str, np.ndarray],
    *,
    dtype: Any = None,
    compute_dtype: Any = None,
    source_name: str = "<checkpoint>",
    adopt: bool = False,
):
    """Build the NNX VAE from ``{dotted_path: array}``: ``nnx.eval_shape`` + split + fill + merge.

    Strict: every parameter must be present with its shape and no extra ones may exist. The dict
    is consumed (arrays are popped as they become jax arrays) so memory stays near one copy.
    ``adopt=True`` (for arrays nobody else holds, such as a reader's output): on CPU the jax
    arrays take over the numpy buffers instead of copying them (see :func:`adopt_array`).
    """
    import jax.numpy as jnp
    from flax import nnx

    from cogvae.model import abstract_model

    from .engine import narrows, overflow_problem, path_to_str
    from .loading import resolve_dtype

    cast = resolve_dtype(dtype)
    graphdef, abstract_state = nnx.split(abstract_model(config, dtype=resolve_dtype(compute_dtype, "compute_dtype")))
    flat_state = list(nnx.to_flat_state(abstract_state))
    problems = param_problems(params, flat_state, source_name)
    if problems:
        raise _unfit(source_name, problems)
    pairs = []
    for path, var in flat_state:
        k = path_to_str(path)
        a = params.pop(k)
        if cast is not None and a.dtype != np.dtype(cast):
            x = jnp.asarray(a).astype(cast)
            if narrows(a.dtype, cast):  # dtype="float16" of a float32 weight beyond 65504 gives Inf
                bad = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
                problem = overflow_problem(cast, bad, x.size, float(np.max(np.abs(a.astype(np.float32)))) if bad else 0.0)
                if problem:
                    problems.append(f"{source_name}: parameter {k!r}: {problem}")
        else:
            x = adopt_array(a) if adopt else jnp.asarray(a)
        del a
        pairs.append((path, var.replace(x)))
    if problems:
        raise CheckpointError(f"{source_name}: cannot load as {np.dtype(cast).name}: {len(problems)} problem(s):\n"
                              + "\n".join(f"  - {p}" for p in problems))
    return nnx.merge(graphdef, nnx.from_flat_state(pairs))
