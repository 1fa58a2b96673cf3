"""Memory-mapped safetensors reading and writing with bfloat16 support, and sharded checkpoints.

The reader parses the safetensors header itself and memory-maps the data, so tensors are read one
at a time and a converter's peak memory stays near one copy of the weights. It validates the header
(JSON, dtypes, shapes, offsets inside the file) and reports a truncated file or a garbage header
as one clear :class:`SafetensorsError` that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "SafetensorsError",
    "SafetensorsFile",
    "ShardedSafetensors",
    "aligned_empty",
    "open_safetensors",
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
_MAX_HEADER = 100 * 1024 * 1024


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
    """A safetensors file that cannot be read: names the file and what is wrong."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only, lazily loaded view of one ``.safetensors`` file: ``key -> np.ndarray`` (memmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise SafetensorsError(
                        f"{self.path}: garbage or truncated safetensors header (declares {n} header bytes, "
                        f"file has {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{self.path}: garbage safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        problems = []
        for key, info in header.items():
            try:
                dt = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"tensor {key!r}: malformed header entry ({e!r})")
                continue
            expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if end - start != expected or start < 0:
                problems.append(f"tensor {key!r}: offsets {start}..{end} do not fit shape {shape} {info['dtype']}")
            elif end > data_size:
                problems.append(
                    f"tensor {key!r}: data ends at byte {end} but the file holds {data_size} data bytes (truncated file)"
                )
            self._entries[key] = (dt, shape, start, end)
        if problems:
            raise SafetensorsError(f"{self.path}: " + "; ".join(problems))
        self._mm = None

    def _map(self) -> np.memmap:
        if self._mm is None:
            size = self.path.stat().st_size
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return self._mm

    def __getitem__(self, key: str) -> np.ndarray:
        dt, shape, start, end = self._entries[key]
        buf = self._map()[self._data_start + start : self._data_start + end]
        return buf.view(dt).reshape(shape)

    def get_tensor(self, key: str) -> np.ndarray:
        return self[key]

    def read_tensor(self, key: str) -> np.ndarray:
        """A fresh, writable copy of one tensor read with ``pread`` (no memory map kept resident)."""
        dt, shape, start, end = self._entries[key]
        out = aligned_empty(shape, dt)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos, n = self._data_start + start, end - start
            done = 0
            while done < n:
                got = os.preadv(fd, [view[done:]], pos + done)
                if got <= 0:
                    raise SafetensorsError(f"{self.path}: tensor {key!r}: file ended early (truncated file)")
                done += got
        except OSError as e:
            raise SafetensorsError(f"{self.path}: tensor {key!r}: cannot read: {e.strerror or e}") from None
        finally:
            os.close(fd)
        return out

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


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Several safetensors shards behind one ``*.safetensors.index.json`` ``weight_map``."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        try:
            index = json.loads(self.path.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{self.path}: unreadable safetensors index ({e})") from None
        self.shard_paths = sorted({self.path.parent / f for f in weight_map.values()})
        missing = [str(p) for p in self.shard_paths if not p.exists()]
        if missing:
            raise SafetensorsError(f"{self.path}: missing shard file(s): {', '.join(missing)}")
        shards = {p.name: SafetensorsFile(p) for p in self.shard_paths}
        self._where: dict[str, SafetensorsFile] = {}
        problems = []
        for key, fname in weight_map.items():
            shard = shards[Path(fname).name]
            if key not in shard:
                problems.append(f"tensor {key!r} listed for {fname} is not in that shard")
            self._where[key] = shard
        for name, shard in shards.items():
            for key in shard:
                if key not in weight_map:
                    problems.append(f"tensor {key!r} in {name} is not listed in the index")
        if problems:
            raise SafetensorsError(f"{self.path}: " + "; ".join(problems))

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def get_tensor(self, key: str) -> np.ndarray:
        return self[key]

    def read_tensor(self, key: str) -> np.ndarray:
        return self._where[key].read_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def nbytes(self) -> int:
        return sum(SafetensorsFile(p).nbytes for p in self.shard_paths)


def is_index_file(path: str | os.PathLike) -> bool:
    """``*.safetensors.index.json``, or diffusers' variant spelling ``*.safetensors.index.fp16.json``."""
    name = Path(path).name
    return name.endswith(".json") and ".safetensors.index." in name


def open_safetensors(path: str | os.PathLike):
    """A single file or, for an index file, the sharded set it describes."""
    p = Path(path)
    return ShardedSafetensors(p) if is_index_file(p) else SafetensorsFile(p)


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
