"""Memory-mapped safetensors reading and writing with bfloat16 support, and sharded checkpoints.

The reader parses the safetensors header itself and memory-maps the data, so tensors are read one
at a time and a converter's peak memory stays near one copy of the weights. It validates the header
at least as strictly as the ``safetensors`` library (hence diffusers) does -- JSON, dtypes, shapes,
``__metadata__``, and offsets that tile the data area exactly (no overlap, gap, truncation or
trailing bytes) -- and a sharded index and its shards (no shard outside the index's folder, no
tensor in two shards). Every problem found is reported in one :class:`SafetensorsError`, one per
line, naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

__all__ = [
    "SafetensorsError",
    "SafetensorsFile",
    "ShardedSafetensors",
    "aligned_empty",
    "open_safetensors",
    "read_index",
    "save_safetensors",
]

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's limit


def _pread_all(fd: int, n: int, pos: int) -> bytes:
    """Up to ``n`` bytes at ``pos`` (fewer only at the end of the file)."""
    parts, done = [], 0
    while done < n:
        got = os.pread(fd, n - done, pos + done)
        if not got:
            break
        parts.append(got)
        done += len(got)
    return b"".join(parts)


def _identity(st: os.stat_result) -> tuple[int, int]:
    """What changes when a file is written: its size and modification time (not its ctime, which
    also changes when the file is merely unlinked or renamed over: replaced, not written)."""
    return (st.st_size, st.st_mtime_ns)


#: XLA's CPU client adopts a host buffer without copying when it is 64-byte aligned; numpy's
#: allocator only promises 16. Arrays we read are allocated aligned, so ``jax.device_put`` of them
#: on CPU shares the memory instead of holding a second copy of the weights.
ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on an ``ALIGN``-byte boundary."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off : off + n].view(dt).reshape(shape)


class SafetensorsError(ValueError):
    """A safetensors file (or sharded set) that cannot be read: names the file and what is wrong.

    ``problems``: every problem found, one per item, each naming its file (and tensor). A message
    with several problems lists them one per line.
    """

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


def _error(where: Path, what: str, problems: list[str]) -> SafetensorsError:
    """One error for all ``problems`` of ``where``: a single line, or a header line and one line each."""
    if len(problems) == 1:
        msg = f"{where}: {what}: {problems[0]}"
    else:
        msg = f"{where}: {what}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
    return SafetensorsError(msg, [f"{where}: {p}" for p in problems])


def _strict_json(text: str, duplicates: list[str]) -> Any:
    """``json.loads`` as strict as the safetensors library's parser (serde_json): no NaN/Infinity,
    no lone surrogate in an object's keys or string values; keys given twice in one object are appended to ``duplicates`` (Python would keep the last)."""

    def pairs(items: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for k, v in items:
            for text in (k, v) if isinstance(v, str) else (k,):
                try:  # a "\ud800" escape gives Python a lone surrogate; serde_json refuses it
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{_show(text)} holds a lone surrogate (not valid Unicode)") from None
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "an array" if isinstance(v, list) else "an object"


def _show(v: Any, limit: int = 80) -> str:
    """A header value as JSON text, cut short."""
    text = json.dumps(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(keys: list[str]) -> str:
    """``'a', 'b', 'c'``: every name, none elided (every tensor a problem touches is named)."""
    return ", ".join(repr(k) for k in keys)


def unholdable(shape: tuple[int, ...], dt: np.dtype) -> Optional[str]:
    """Why numpy cannot make an array of this shape and dtype (too many dimensions, or more
    elements than it can address), or None. Asked of numpy itself, with a zero-stride view of one
    element, so that no memory is allocated whatever the shape."""
    try:
        np.ndarray(shape, dt, buffer=np.zeros(1, dt), strides=(0,) * len(shape))
    except (ValueError, OverflowError) as e:
        return str(e).rstrip(".")
    return None


def _is_uint(v: Any) -> bool:
    """A JSON non-negative integer (what safetensors reads as usize); not a bool, float or string."""
    return type(v) is int and 0 <= v < 2**64


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only, lazily loaded view of one ``.safetensors`` file: ``key -> np.ndarray`` (memmap).

    The header is checked as strictly as the ``safetensors`` library (hence diffusers) checks it,
    and every problem found is reported at once: a JSON object of tensor entries, each with a
    supported ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` (a pair of
    non-negative integers) spanning exactly ``prod(shape) * itemsize`` bytes; ``__metadata__`` an
    object of string to string; and the tensors' byte ranges, sorted, tile the data area exactly:
    no overlap, no gap, no byte past the end of the file or left over after the last tensor.
    """

    def __init__(self, path: str | os.PathLike, *, strict: bool = True):
        """``strict=False``: a file whose header can be read but has problems is opened anyway,
        with every problem in ``problems`` (each naming the file) and the tensors that cannot be
        read in ``unreadable`` (key -> this file); the others read as usual. A converter reports
        those problems together with every problem of the readable tensors (one error). An
        unreadable header raises SafetensorsError either way."""
        self.path = Path(path)
        self.problems: list[str] = []
        self.unreadable: dict[str, Path] = {}
        self._fd: Optional[int] = None
        self._mm = None
        # One descriptor, opened here and kept: the header, every tensor and the file's digest are
        # read from it, so a source replaced on disk mid-conversion (a re-download renaming a new
        # file into place) cannot mix two files' bytes; an edit of the file in place is caught by
        # change_problems (its size and mtime against these).
        try:
            # O_NONBLOCK: opening a FIFO (a shard named in an index, say) would wait for a writer
            # forever; it is refused below, as is anything else that is not a regular file.
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise SafetensorsError(f"{self.path}: not a regular file (a FIFO, socket or device): cannot read it")
            self._stat = _identity(st)
            size = st.st_size
            head = _pread_all(self._fd, 8, 0)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise SafetensorsError(
                    f"{self.path}: garbage or truncated safetensors header (declares {n} header bytes, "
                    f"file has {size})"
                )
            raw = _pread_all(self._fd, n, 8)
        except OSError as e:
            self.close()
            raise SafetensorsError(f"{self.path}: cannot read: {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise
        self.size = size
        try:
            self._parse(raw, n, size, strict)
        except BaseException:
            self.close()
            raise

    def _parse(self, raw: bytes, n: int, size: int, strict: bool) -> None:
        duplicates: list[str] = []
        try:
            header = _strict_json(raw.decode("utf-8"), duplicates)
            if not isinstance(header, dict):
                raise ValueError(f"header is {_json_type(header)}, not a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SafetensorsError(f"{self.path}: garbage safetensors header ({e})") from None
        self._data_start = 8 + n
        data_size = size - self._data_start
        problems = [f"key {k!r} appears more than once in the header" for k in dict.fromkeys(duplicates)]
        self.metadata = self._check_metadata(header.pop("__metadata__", None), problems)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans: list[tuple[int, int, str]] = []  # (start, end, key) of every entry with usable offsets
        all_spans = True
        for key, info in header.items():
            span = self._check_entry(key, info, problems)
            if span is None:
                all_spans = False
            else:
                spans.append(span)
        past = self._check_coverage(spans, data_size, all_spans, problems)
        if not problems:
            return
        if strict:
            raise _error(self.path, "bad safetensors file", problems)
        self.problems = [f"{self.path}: {p}" for p in problems]
        # not readable: an entry with a bad field, one given twice (which one was meant?), one past the end
        for key in [k for k in header if k not in self._entries] + duplicates + past:
            self._entries.pop(key, None)
            self.unreadable[key] = self.path

    @staticmethod
    def _check_metadata(meta: Any, problems: list[str]) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            problems.append(f"__metadata__ is {_json_type(meta)}, not an object of string to string")
            return {}
        bad = [k for k, v in meta.items() if not isinstance(v, str)]
        problems.extend(f"__metadata__ entry {k!r} is {_json_type(meta[k])}, not a string" for k in bad)
        return {} if bad else meta

    def _check_entry(self, key: str, info: Any, problems: list[str]) -> Optional[tuple[int, int, str]]:
        """Check one tensor's header entry; record it if sound. Returns its byte span when the
        offsets are usable (for the coverage check), else None."""
        where = f"tensor {key!r}"
        if not isinstance(info, dict):
            problems.append(f"{where}: header entry is {_json_type(info)}, not an object")
            return None
        lacking = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if lacking:
            problems.append(f"{where}: header entry lacks {', '.join(lacking)}")
        dt = shape = span = None
        if "dtype" in info:
            name = info["dtype"]
            if isinstance(name, str) and name in _DTYPES:
                dt = _DTYPES[name]
            else:
                problems.append(f"{where}: unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})")
        if "shape" in info:
            s = info["shape"]
            if not (isinstance(s, list) and all(_is_uint(d) for d in s)):
                problems.append(f"{where}: shape {_show(s)} is not an array of non-negative integers")
            elif dt is not None and (why := unholdable(tuple(s), dt)):
                # A zero-size tensor's bytes (none) always fit the file, so only numpy's own limits
                # (dimensions, element count) stand between such a shape and a traceback on read.
                problems.append(f"{where}: shape {_show(s)} cannot be read as an array ({why})")
            else:
                shape = tuple(s)
        if "data_offsets" in info:
            o = info["data_offsets"]
            if not (isinstance(o, list) and len(o) == 2 and all(_is_uint(x) for x in o)):
                problems.append(f"{where}: data_offsets {_show(o)} is not a pair of non-negative integers")
            elif o[1] < o[0]:
                problems.append(f"{where}: data_offsets {o[0]}..{o[1]} end before they start")
            else:
                span = (o[0], o[1], key)
        if dt is not None and shape is not None and span is not None:
            start, end = span[0], span[1]
            expected = math.prod(shape) * dt.itemsize
            if end - start != expected:
                problems.append(f"{where}: data_offsets {start}..{end} hold {end - start} bytes, but shape "
                                f"{list(shape)} {info['dtype']} needs {expected}")
            elif not lacking:
                self._entries[key] = (dt, shape, start, end)
        return span

    @staticmethod
    def _check_coverage(spans: list[tuple[int, int, str]], data_size: int, all_spans: bool,
                        problems: list[str]) -> list[str]:
        """The safetensors rule: sorted by offsets, the tensors' bytes follow one another from byte
        0 of the data area to its last byte: no overlap, no gap, nothing past the end or after.
        Returns the tensors that lie (partly) past the end of the file."""
        pos, last = 0, None  # last: the span that reaches furthest so far
        for start, end, key in sorted(spans):
            if start < pos:
                problems.append(f"tensor {key!r} (data bytes {start}..{end}) overlaps tensor {last[2]!r} "
                                f"(data bytes {last[0]}..{last[1]})")
            elif start > pos and all_spans:
                after = f"after tensor {last[2]!r}" if last else "at the start of the data"
                problems.append(f"data bytes {pos}..{start} belong to no tensor (a gap {after}, before "
                                f"tensor {key!r}): file not fully covered")
            if last is None or end > pos:
                pos, last = end, (start, end, key)
        past = [key for start, end, key in sorted(spans) if end > data_size]
        if pos > data_size:
            problems.append(f"truncated file: its tensors need {pos} data bytes, the file holds {data_size}; "
                            f"{len(past)} tensor(s) lie past its end: {_names(past)}")
        elif pos < data_size and all_spans:
            after = f"after the last tensor ({last[2]!r} ends at data byte {pos})" if last else "and no tensor"
            problems.append(f"{data_size - pos} trailing data byte(s) {after}: file not fully covered")
        return past

    def _descriptor(self) -> int:
        if self._fd is None:
            raise SafetensorsError(f"{self.path}: closed")
        return self._fd

    def _map(self) -> np.ndarray:
        if self._mm is None:
            # mapped from the descriptor the header came from (the same file, even if the path
            # has been replaced since)
            if self.size:
                with os.fdopen(os.dup(self._descriptor()), "rb") as f:  # the map keeps its own reference
                    self._mm = np.memmap(f, dtype=np.uint8, mode="r")
            else:
                self._mm = np.zeros(0, np.uint8)
        return self._mm

    def __getitem__(self, key: str) -> np.ndarray:
        dt, shape, start, end = self._entries[key]
        buf = self._map()[self._data_start + start : self._data_start + end]
        return buf.view(dt).reshape(shape)

    def get_tensor(self, key: str) -> np.ndarray:
        return self[key]

    def read_tensor(self, key: str) -> np.ndarray:
        """A fresh, writable copy of one tensor read with ``pread`` (no memory map kept resident)
        from the descriptor the header was read from."""
        dt, shape, start, end = self._entries[key]
        out = aligned_empty(shape, dt)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        fd = self._descriptor()
        try:
            pos, n = self._data_start + start, end - start
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    raise SafetensorsError(f"{self.path}: tensor {key!r}: file ended early (truncated file"
                                           f"{self._changed_note()})")
                done += got
        except OSError as e:
            raise SafetensorsError(f"{self.path}: tensor {key!r}: cannot read: {e.strerror or e}") from None
        return out

    def file_sha256(self, path: str | os.PathLike) -> str:
        """``sha256()`` (the one file this object reads; the mapping interface the sharded set shares)."""
        return self.sha256()

    def file_size(self, path: str | os.PathLike) -> int:
        return self.size

    @property
    def files(self) -> list[Path]:
        """The files this object reads: this one."""
        return [self.path]

    def sha256(self) -> str:
        """The SHA-256 of the file this object reads (its descriptor, not whatever the path names now)."""
        h = hashlib.sha256()
        fd, pos, chunk = self._descriptor(), 0, 1 << 22
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            got = os.preadv(fd, [view], pos)
            if got <= 0:
                break
            h.update(view[:got])
            pos += got
        return h.hexdigest()

    def _changed_note(self) -> str:
        try:
            now = _identity(os.fstat(self._descriptor()))
        except (OSError, SafetensorsError):
            return ""
        return "; it changed while being read" if now != self._stat else ""

    def change_problems(self) -> list[str]:
        """``[problem]`` when the file was modified since it was opened (its size or mtime
        changed: written in place while being read, so what was read may mix old and new bytes);
        ``[]`` when it was not. A file replaced by a rename is not a change: the old one is read."""
        now = _identity(os.fstat(self._descriptor()))
        if now == self._stat:
            return []
        return [f"{self.path}: the file changed while it was being read (size {self._stat[0]} -> {now[0]} "
                "bytes, or its modification time changed): what was read may mix old and new contents; "
                "convert again once it is no longer being written"]

    def close(self) -> None:
        """Release the descriptor (and the memory map). Arrays from ``read_tensor`` stay valid;
        arrays from ``self[key]`` are views of the map and must not be used after."""
        self._mm = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def dtype_of(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e[3] - e[2] for e in self._entries.values())


def _bad_shard_name(name: str) -> Optional[str]:
    """Why ``name`` (a ``weight_map`` value) is not a plain file name in the index's folder, or None."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "holds a NUL character"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "is not a plain file name in the index's folder (a path out of the folder is refused)"
    return None


def read_index(index_path: str | os.PathLike, *, raw: Optional[bytes] = None) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json``: tensor key -> shard file path.

    Raises :class:`SafetensorsError` listing every problem, one per line, when the index is not
    JSON, has no ``weight_map`` object, a key is given twice, or a shard name is not a string
    naming a file in the index's own folder (``../x.safetensors``, ``/abs/x``, ``sub/x`` are refused).
    ``raw``: the index file's bytes, already read.
    """
    path = Path(index_path)
    duplicates: list[str] = []
    try:
        raw = path.read_bytes() if raw is None else raw
        index = _strict_json(raw.decode("utf-8"), duplicates)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read safetensors index: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: unreadable safetensors index (not JSON: {e})") from None
    if not isinstance(index, dict):
        raise SafetensorsError(f"{path}: unreadable safetensors index (it is {_json_type(index)}, not an object)")
    if "weight_map" not in index:
        raise SafetensorsError(f"{path}: unreadable safetensors index (no 'weight_map')")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{path}: unreadable safetensors index ('weight_map' is {_json_type(weight_map)}, "
                               "not an object of tensor name to shard file name)")
    problems = [f"key {k!r} appears more than once in the index" for k in dict.fromkeys(duplicates)]
    if not weight_map:
        problems.append("its 'weight_map' lists no tensors")
    out: dict[str, Path] = {}
    bad: dict[str, tuple[str, list[str]]] = {}  # one problem per bad shard name: its reason and tensors
    for key, name in weight_map.items():
        why = f"is {_json_type(name)}, not a string" if not isinstance(name, str) else _bad_shard_name(name)
        if why:
            bad.setdefault(_show(name), (why, []))[1].append(key)
        else:
            out[key] = path.parent / name
    problems += [f"shard file name {name} {why}; the index names it for {len(keys)} tensor(s): {_names(keys)}"
                 for name, (why, keys) in bad.items()]
    if problems:
        raise _error(path, "bad safetensors index", problems)
    return out


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Several safetensors shards behind one ``*.safetensors.index.json`` ``weight_map``.

    Every shard the index names is opened and checked, and all problems are reported together:
    a bad index (see :func:`read_index`), missing or broken shards, a tensor listed for a shard
    that lacks it, a tensor in a shard but not in the index, and a tensor stored in more than one
    shard (diffusers would silently load whichever shard comes last; cogvae refuses to guess).
    """

    def __init__(self, index_path: str | os.PathLike, *, strict: bool = True):
        """``strict=False``: as for :class:`SafetensorsFile`, the set is opened despite its
        problems (a missing or broken shard, a tensor in two shards, ...): they are in
        ``problems``, and the tensors that cannot be read in ``unreadable`` (key -> the shard the
        index names for it), so that the tensors of the sound shards are still checked. A bad
        index raises SafetensorsError either way."""
        self.path = Path(index_path)
        self.unreadable: dict[str, Path] = {}
        self._shards: dict[Path, SafetensorsFile] = {}
        try:  # read once: the index that is parsed is the one hashed (sha256)
            self._index_bytes = self.path.read_bytes()
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read safetensors index: {e.strerror or e}") from None
        weight_map = read_index(self.path, raw=self._index_bytes)
        self.shard_paths = sorted(set(weight_map.values()))
        problems: list[str] = []  # each names its file: a shard's path, or a shard's name for the index
        for p in self.shard_paths:
            try:
                missing = not p.exists()
            except OSError:  # e.g. a name too long: SafetensorsFile reports it
                missing = False
            if missing:
                problems.append(f"{p}: missing shard file (named in the index)")
                continue
            try:
                self._shards[p] = shard = SafetensorsFile(p, strict=strict)
            except SafetensorsError as e:
                problems.extend(e.problems)
            else:
                problems.extend(shard.problems)
        n_shard = len(problems)
        holders: dict[str, list[Path]] = {}
        for p, shard in self._shards.items():
            for key in shard:
                holders.setdefault(key, []).append(p)
        for key, where in holders.items():
            if len(where) > 1:
                named = f" (the index names {weight_map[key].name})" if key in weight_map else ""
                problems.append(f"tensor {key!r} is stored in {len(where)} shards: "
                                f"{', '.join(str(p) for p in where)}{named}")
        self._where: dict[str, SafetensorsFile] = {}
        for key, p in weight_map.items():
            shard = self._shards.get(p)
            if shard is None or key in shard.unreadable or len(holders.get(key, ())) > 1:
                self.unreadable[key] = p  # missing or broken shard, broken entry, or in two shards: reported
                continue
            if key not in shard:
                self.unreadable[key] = p
                elsewhere = [q.name for q in holders.get(key, [])]
                problems.append(f"tensor {key!r} listed for {p.name} is not in that shard"
                                + (f" (it is in {', '.join(elsewhere)})" if elsewhere else ""))
                continue
            self._where[key] = shard
        for p, shard in self._shards.items():
            for key in shard:
                if key not in weight_map:
                    problems.append(f"tensor {key!r} in {p.name} is not listed in the index")
        self.problems: list[str] = []
        if problems:
            if strict:
                raise _error(self.path, "bad sharded safetensors", problems)
            # each names one file: its shard, or the index for the index's own problems
            self.problems = problems[:n_shard] + [f"{self.path}: {p}" for p in problems[n_shard:]]

    def file_of(self, key: str) -> Path:
        """The shard that holds ``key`` (problems with a tensor name its file, not the index); for
        a tensor that cannot be read, the shard the index names for it."""
        if key in self.unreadable:
            return self.unreadable[key]
        return self._where[key].path

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def get_tensor(self, key: str) -> np.ndarray:
        return self[key]

    def read_tensor(self, key: str) -> np.ndarray:
        return self._where[key].read_tensor(key)

    def file_sha256(self, path: str | os.PathLike) -> str:
        """The SHA-256 of the index (its bytes as parsed) or of one opened shard (as read)."""
        p = Path(path)
        if p == self.path:
            return hashlib.sha256(self._index_bytes).hexdigest()
        if p not in self._shards:
            raise SafetensorsError(f"{p}: not an opened shard of {self.path}")
        return self._shards[p].sha256()

    def file_size(self, path: str | os.PathLike) -> int:
        p = Path(path)
        if p == self.path:
            return len(self._index_bytes)
        if p not in self._shards:
            raise SafetensorsError(f"{p}: not an opened shard of {self.path}")
        return self._shards[p].size

    @property
    def files(self) -> list[Path]:
        """The files this object reads: the index, then the shards named by the index as it was
        parsed (not as a second read of it finds them: it may have been replaced since)."""
        return [self.path, *self.shard_paths]

    def change_problems(self) -> list[str]:
        """Every opened shard modified since it was opened (see SafetensorsFile.change_problems)."""
        return [q for shard in self._shards.values() for q in shard.change_problems()]

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> "ShardedSafetensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard in self._shards.values())


def is_index_file(path: str | os.PathLike) -> bool:
    """``*.safetensors.index.json``, or a variant's: ``*.safetensors.index.fp16.json`` (diffusers'),
    ``*.safetensors.fp16.index.json`` (diffusers' older), ``*.fp16.safetensors.index.json``."""
    name = Path(path).name
    return name.endswith(".json") and (".safetensors.index." in name or
                                       (".safetensors." in name and name.endswith(".index.json")))


def open_safetensors(path: str | os.PathLike, *, strict: bool = True):
    """A single file or, for an index file, the sharded set it describes. ``strict=False``: opened
    despite problems that leave some tensors readable (see ``problems`` and ``unreadable``)."""
    p = Path(path)
    return ShardedSafetensors(p, strict=strict) if is_index_file(p) else SafetensorsFile(p, strict=strict)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a safetensors file (keys sorted, 8-byte aligned header), streaming one tensor at a time."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    keys = sorted(tensors)
    for k in keys:
        # A lazy mapping (engine.LazyExport) tells shapes and dtypes without making the tensor.
        if hasattr(tensors, "shape_of"):
            shape, dt = tuple(tensors.shape_of(k)), np.dtype(tensors.dtype_of(k))
        else:
            shape, dt = tuple(tensors[k].shape), np.dtype(tensors[k].dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {k!r} has unsupported dtype {dt}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[k] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            a = np.ascontiguousarray(tensors[k])
            if tuple(a.shape) != tuple(header[k]["shape"]) or _NAMES.get(np.dtype(a.dtype)) != header[k]["dtype"]:
                raise SafetensorsError(f"{path}: tensor {k!r} is {a.dtype}{list(a.shape)}, "
                                       f"its header says {header[k]['dtype']}{header[k]['shape']}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
            del a
