"""Strict safetensors reading: cogvae refuses at least every file the ``safetensors`` library (hence
diffusers) refuses -- overlapping, gapped, truncated or over-long data, a bad ``__metadata__``, bad
header values -- and every broken sharded index: a tensor in two shards, a malformed
``weight_map``, a shard outside the VAE folder. Every problem is reported at once, one per line,
naming the file and tensor; the CLI answers with exit 3 and no traceback.

Files are written by hand (tiny headers, a few bytes of data), so each test is fast.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cogvae.converter.cli import cli, convert_command
from cogvae.converter.convert import default_source
from cogvae.converter.loading import DiffusersSource, find_diffusers_vae
from cogvae.converter.st_io import (
    SafetensorsError,
    SafetensorsFile,
    ShardedSafetensors,
    open_safetensors,
    save_safetensors,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
A = "diffusion_pytorch_model-00001-of-00002.safetensors"
B = "diffusion_pytorch_model-00002-of-00002.safetensors"


def _raw(path: Path, header: dict | bytes, data: bytes, pad: bool = True) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _t(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _safetensors_rejects(path: Path) -> bool:
    from safetensors.numpy import load_file

    try:
        load_file(str(path))
    except Exception:  # noqa: BLE001 -- any refusal
        return True
    return False


# ----------------------------------------------------------------------------------------
# one file: what the safetensors library refuses, cogvae refuses too, naming file and tensors
# ----------------------------------------------------------------------------------------

D12 = bytes(range(12))
BAD_FILES = {
    # name: (header, data, needles in the message)
    "overlap": ({"a": _t("F32", [2], 0, 8), "b": _t("F32", [1], 4, 8), "c": _t("F32", [1], 8, 12)}, D12,
                ["'b'", "overlaps", "'a'"]),
    "alias": ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 0, 4), "c": _t("F32", [2], 4, 12)}, D12,
              ["'b'", "overlaps", "'a'"]),
    "zero_size_inside": ({"a": _t("F32", [3], 0, 12), "z": _t("F32", [0], 4, 4)}, D12, ["'z'", "overlaps", "'a'"]),
    "gap_at_start": ({"a": _t("F32", [2], 4, 12)}, D12, ["bytes 0..4", "'a'", "not fully covered"]),
    "gap_between": ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, D12,
                    ["bytes 4..8", "'a'", "'b'", "not fully covered"]),
    "trailing_bytes": ({"a": _t("F32", [2], 0, 8)}, D12, ["4 trailing", "'a'", "not fully covered"]),
    "truncated": ({"a": _t("F32", [2], 0, 8), "b": _t("F32", [4], 8, 24)}, D12, ["truncated", "'b'"]),
    "end_before_start": ({"a": _t("F32", [0], 12, 0), "b": _t("F32", [3], 0, 12)}, D12, ["'a'", "12..0"]),
    "size_mismatch": ({"a": _t("F32", [2], 0, 12)}, D12, ["'a'", "0..12", "needs 8"]),
    "metadata_list": ({"__metadata__": [1], "a": _t("F32", [3], 0, 12)}, D12, ["__metadata__", "an array"]),
    "metadata_int_value": ({"__metadata__": {"format": "pt", "n": 1}, "a": _t("F32", [3], 0, 12)}, D12,
                           ["__metadata__", "'n'", "not a string"]),
    "metadata_string": ({"__metadata__": "pt", "a": _t("F32", [3], 0, 12)}, D12, ["__metadata__"]),
    "shape_string": ({"a": _t("F32", "3", 0, 12)}, D12, ["'a'", "shape"]),
    "shape_float": ({"a": _t("F32", [3.0], 0, 12)}, D12, ["'a'", "shape"]),
    "shape_bool": ({"a": _t("U8", [True], 0, 1), "b": _t("U8", [11], 1, 12)}, D12, ["'a'", "shape"]),
    "shape_negative": ({"a": _t("F32", [-3], 0, 12)}, D12, ["'a'", "shape"]),
    "offsets_string": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": ["0", 12]}}, D12, ["'a'", "data_offsets"]),
    "offsets_three": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12, 12]}}, D12,
                      ["'a'", "data_offsets"]),
    "dtype_lowercase": ({"a": _t("f32", [3], 0, 12)}, D12, ["'a'", "unsupported dtype"]),
    "entry_not_object": ({"a": [1, 2]}, D12, ["'a'", "not an object"]),
    "entry_lacks_offsets": ({"a": {"dtype": "F32", "shape": [3]}}, D12, ["'a'", "lacks data_offsets"]),
    "header_array": ([1, 2], D12, ["garbage", "array"]),
    "nan_in_header": (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12], "x": NaN}}', D12,
                      ["garbage", "NaN"]),
    # numpy cannot make these zero-size arrays (reading them was a traceback from reshape)
    "too_many_dimensions": ({"a": _t("F32", [3], 0, 12), "z": _t("F32", [0] * 70, 12, 12)}, D12,
                            ["'z'", "cannot be read as an array", "maximum supported dimension"]),
    "too_many_elements": ({"a": _t("F32", [3], 0, 12), "z": _t("F32", [0, 2**63], 12, 12)}, D12,
                          ["'z'", "[0, 9223372036854775808] cannot be read as an array"]),
    "lone_surrogate_key": (b'{"\\ud800": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}', D12,
                           ["garbage", "lone surrogate"]),
    "lone_surrogate_metadata": (b'{"__metadata__": {"format": "\\udfff"}, '
                                b'"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}', D12,
                                ["garbage", "lone surrogate"]),
    "duplicate_key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', D12,
                      ["'a'", "more than once"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_rejected_like_safetensors(tmp_path, name):
    header, data, needles = BAD_FILES[name]
    path = _raw(tmp_path / f"{name}.safetensors", header, data)
    assert _safetensors_rejects(path), "the case must be one the safetensors library refuses"
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    for n in needles:
        assert n in msg, msg
    assert all(p.startswith(str(path)) for p in e.value.problems)


GOOD_FILES = {
    "zero_size_at_end": ({"a": _t("F32", [3], 0, 12), "z": _t("F32", [0, 5], 12, 12)}, D12),
    "zero_size_at_start": ({"z": _t("F32", [0], 0, 0), "a": _t("F32", [3], 0, 12)}, D12),
    "unsorted_entries": ({"b": _t("F32", [1], 8, 12), "a": _t("F32", [2], 0, 8)}, D12),
    "metadata_null": ({"__metadata__": None, "a": _t("F32", [3], 0, 12)}, D12),
    "metadata_empty": ({"__metadata__": {}, "a": _t("F32", [3], 0, 12)}, D12),
    "extra_entry_field": ({"a": {**_t("F32", [3], 0, 12), "note": "x"}}, D12),
    "no_tensors": ({"__metadata__": {"format": "pt"}}, b""),
    "scalar": ({"s": _t("F32", [], 0, 4), "a": _t("U8", [8], 4, 12)}, D12),
}


@pytest.mark.parametrize("name", list(GOOD_FILES))
@pytest.mark.parametrize("pad", [True, False])
def test_valid_edge_cases_still_load(tmp_path, name, pad):
    header, data = GOOD_FILES[name]
    path = _raw(tmp_path / f"{name}.safetensors", header, data, pad=pad)
    assert not _safetensors_rejects(path)
    f = SafetensorsFile(path)
    from safetensors.numpy import load_file

    ref = load_file(str(path))
    assert sorted(f) == sorted(ref)
    for k, v in ref.items():
        assert f[k].dtype == v.dtype and f[k].shape == v.shape
        np.testing.assert_array_equal(f[k], v)
        np.testing.assert_array_equal(f.read_tensor(k), v)


def test_files_written_by_safetensors_load(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 4, 5)).astype(np.float32), "h": np.arange(7, dtype=np.float16),
               "i": np.arange(5, dtype=np.int64), "b": np.array([True, False]), "e": np.zeros((0, 3), np.float32),
               "u": np.arange(3, dtype=np.uint8), "s": np.array(2.5, np.float64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"} and sorted(f) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(f[k], v)
        assert f[k].dtype == v.dtype


def test_header_problems_listed_one_per_line(tmp_path):
    path = _raw(tmp_path / "x.safetensors",
                {"a": _t("XX", [1], 0, 4), "b": _t("YY", [1], 4, 8), "c": _t("ZZ", [1], 8, 12)}, D12)
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: bad safetensors file: 3 problems:"
    assert [ln.split(":")[0] for ln in lines[1:]] == ["  - tensor 'a'", "  - tensor 'b'", "  - tensor 'c'"]
    assert "unsupported dtype 'YY'" in lines[2] and ";" not in lines[2]
    assert e.value.problems == [f"{path}: {ln[4:]}" for ln in lines[1:]]


def test_independent_problems_all_reported(tmp_path):
    """A bad dtype, a bad __metadata__, an overlap and trailing bytes: four lines, one error."""
    header = {"__metadata__": {"n": 3}, "a": _t("XX", [2], 0, 8), "b": _t("F32", [1], 4, 8)}
    path = _raw(tmp_path / "x.safetensors", header, D12 + b"junk")
    with pytest.raises(SafetensorsError) as e:
        SafetensorsFile(path)
    assert len(e.value.problems) == 4, str(e.value)
    text = str(e.value)
    for n in ["__metadata__ entry 'n'", "unsupported dtype 'XX'", "'b' (data bytes 4..8) overlaps tensor 'a'",
              "8 trailing data byte(s)"]:
        assert n in text, text


# ----------------------------------------------------------------------------------------
# sharded
# ----------------------------------------------------------------------------------------


def _sharded(folder: Path, shards: dict[str, dict[str, np.ndarray]], weight_map=None, index=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wm = {}
    for fname, tensors in shards.items():
        save_safetensors(tensors, folder / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in tensors})
    if weight_map is not None:
        wm = weight_map(wm) if callable(weight_map) else weight_map
    body = index if index is not None else {"metadata": {"total_size": 0}, "weight_map": wm}
    (folder / INDEX).write_text(body if isinstance(body, str) else json.dumps(body))
    return folder / INDEX


X, Y, Z = (np.arange(n, dtype=np.float32) for n in (2, 3, 4))


@pytest.mark.parametrize("named", [A, B])
def test_tensor_in_two_shards_rejected(tmp_path, named):
    x2 = X + 1000
    index = _sharded(tmp_path, {A: {"x": X, "y": Y}, B: {"x": x2, "z": Z}},
                     weight_map=lambda wm: {**wm, "x": named})
    with pytest.raises(SafetensorsError) as e:
        ShardedSafetensors(index)
    msg = str(e.value)
    assert msg.startswith(str(index)) and "tensor 'x' is stored in 2 shards" in msg, msg
    assert str(tmp_path / A) in msg and str(tmp_path / B) in msg and f"the index names {named}" in msg


@pytest.mark.parametrize("weight_map, needle", [
    (lambda wm: list(wm.items()), "'weight_map' is an array"),
    (lambda wm: "model.safetensors", "'weight_map' is a string"),
    (lambda wm: {**wm, "x": 5}, "shard file name 5 is a number"),
    (lambda wm: {**wm, "x": None}, "shard file name null is null"),
    (lambda wm: {**wm, "x": [A]}, "is an array, not a string"),
    (lambda wm: {**wm, "x": {"f": A}}, "is an object, not a string"),
    (lambda wm: {**wm, "x": ""}, 'shard file name "" is empty'),
    (lambda wm: {}, "lists no tensors"),
])
def test_malformed_weight_map_is_a_clear_error(tmp_path, weight_map, needle):
    index = _sharded(tmp_path, {A: {"x": X, "y": Y}, B: {"z": Z}}, weight_map=weight_map)
    src = DiffusersSource(tmp_path, tmp_path / "config.json", index)
    for call in (lambda: ShardedSafetensors(index), lambda: src.weight_files):
        with pytest.raises(SafetensorsError) as e:
            call()
        assert str(e.value).startswith(str(index)) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("body, needle", [
    ("[1, 2]", "an array, not an object"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ("{not json", "not JSON"),
    ('{"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}}', "'x' appears more than once"),
])
def test_malformed_index_is_a_clear_error(tmp_path, body, needle):
    index = _sharded(tmp_path, {A: {"x": X}}, index=body)
    src = DiffusersSource(tmp_path, tmp_path / "config.json", index)
    for call in (lambda: ShardedSafetensors(index), lambda: src.weight_files):
        with pytest.raises(SafetensorsError, match=needle):
            call()


@pytest.mark.parametrize("name", ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors", ".."])
def test_shard_outside_the_folder_refused(tmp_path, name):
    vae = tmp_path / "vae"
    save_safetensors({"x": X}, tmp_path / "outside.safetensors")  # a valid file that must not be read
    name = name.replace("{abs}", str(tmp_path / "outside.safetensors"))
    index = _sharded(vae, {B: {"y": Y}}, weight_map=lambda wm: {**wm, "x": name})
    src = DiffusersSource(vae, vae / "config.json", index)
    for call in (lambda: ShardedSafetensors(index), lambda: src.weight_files):
        with pytest.raises(SafetensorsError) as e:
            call()
        assert "not a plain file name in the index's folder" in str(e.value) and "'x'" in str(e.value)


def test_every_broken_shard_reported_one_per_line(tmp_path):
    """Two truncated shards, a missing one, a tensor listed for the wrong shard and an unlisted
    tensor: one error lists them all, one per line, each naming its file."""
    C = "diffusion_pytorch_model-00003-of-00003.safetensors"
    D, E = "diffusion_pytorch_model-00004-of-00005.safetensors", "diffusion_pytorch_model-00005-of-00005.safetensors"
    index = _sharded(tmp_path, {A: {"x": X, "y": Y}, B: {"z": Z, "w": Z}, D: {"t": Z, "u": X, "v": Y}, E: {"s": X}},
                     weight_map=lambda wm: {**{k: v for k, v in wm.items() if k != "v"}, "c": C, "u": E})
    for f in (A, B):
        data = (tmp_path / f).read_bytes()
        (tmp_path / f).write_bytes(data[:-6])
    with pytest.raises(SafetensorsError) as e:
        ShardedSafetensors(index)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{index}: bad sharded safetensors: 5 problems:", str(e.value)
    body = "\n".join(lines[1:])
    assert f"{tmp_path / A}: truncated file" in body and f"{tmp_path / B}: truncated file" in body
    assert f"{tmp_path / C}: missing shard file" in body
    assert f"tensor 'u' listed for {E} is not in that shard (it is in {D})" in body
    assert f"tensor 'v' in {D} is not listed in the index" in body
    assert len(e.value.problems) == 5


def test_valid_sharded_set_still_loads(tmp_path):
    index = _sharded(tmp_path, {A: {"x": X, "y": Y}, B: {"z": Z}})
    s = open_safetensors(index)
    assert sorted(s) == ["x", "y", "z"] and s.nbytes == X.nbytes + Y.nbytes + Z.nbytes
    np.testing.assert_array_equal(s.read_tensor("z"), Z)
    src = DiffusersSource(tmp_path, tmp_path / "config.json", index)
    assert src.weight_files == [index, tmp_path / A, tmp_path / B]


# ----------------------------------------------------------------------------------------
# the CLI: exit 3, "Error: " first, one problem per line, no traceback, nothing written
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tensors() -> dict[str, np.ndarray]:
    f = open_safetensors(default_source() / WEIGHTS)
    return {k: np.array(f[k]) for k in f}


def _tiny_copy(tmp_path: Path) -> Path:
    d = tmp_path / "vae"
    d.mkdir()
    shutil.copy(default_source() / "config.json", d / "config.json")
    return d


def _overlapping(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    data = (default_source() / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    a, b = "decoder.conv_in.conv.bias", "decoder.mid_block.resnets.0.conv1.conv.bias"
    header[b] = dict(header[b], data_offsets=header[a]["data_offsets"])  # b aliases a's bytes
    _raw(d / WEIGHTS, header, data[8 + n:])
    return d, [str(d / WEIGHTS), repr(a), repr(b), "overlaps", "not fully covered"]


def _trailing(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    (d / WEIGHTS).write_bytes((default_source() / WEIGHTS).read_bytes() + b"garbage!")
    return d, [str(d / WEIGHTS), "8 trailing data byte(s)", "not fully covered"]


def _bad_metadata(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    data = (default_source() / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = [1]
    _raw(d / WEIGHTS, header, data[8 + n:])
    return d, [str(d / WEIGHTS), "__metadata__ is an array"]


def _split(tiny_tensors):
    keys = sorted(tiny_tensors)
    half = len(keys) // 2
    return keys, {A: {k: tiny_tensors[k] for k in keys[:half]}, B: {k: tiny_tensors[k] for k in keys[half:]}}


def _dup_across_shards(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    keys, shards = _split(tiny_tensors)
    k = keys[0]
    shards[B][k] = tiny_tensors[k] + 1000
    _sharded(d, shards, weight_map=lambda wm: {**wm, k: A})
    return d, [repr(k), "stored in 2 shards", str(d / A), str(d / B)]


def _weight_map_list(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    _sharded(d, _split(tiny_tensors)[1], weight_map=lambda wm: list(wm.items()))
    return d, [str(d / INDEX), "'weight_map' is an array"]


def _weight_map_int(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    keys, shards = _split(tiny_tensors)
    _sharded(d, shards, weight_map=lambda wm: {**wm, keys[0]: 5})
    return d, [str(d / INDEX), repr(keys[0]), "shard file name 5 is a number"]


def _unblock_later(fifo: Path, after: float = 30.0, until: float = 90.0) -> None:
    """So that a regression fails instead of hanging the suite: from ``after`` seconds on, a
    thread opens ``fifo`` for writing without blocking (which succeeds only while a reader waits
    in open) and closes it at once, ending that reader's wait; it gives up at ``until``."""
    import errno
    import os
    import threading
    import time

    def run():
        time.sleep(after)
        end = time.monotonic() + until - after
        while time.monotonic() < end:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    return
            time.sleep(0.5)

    threading.Thread(target=run, daemon=True).start()


def _fifo_shard(tmp_path, tiny_tensors):
    """A shard that is a FIFO: opening it waited for a writer forever (every command hung)."""
    import os

    d = _tiny_copy(tmp_path)
    _sharded(d, _split(tiny_tensors)[1])
    (d / B).unlink()
    os.mkfifo(d / B)
    _unblock_later(d / B)
    return d, [str(d / INDEX), f"{d / B}: not a regular file (a FIFO, socket or device)"]


def _two_bad_shards(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    _sharded(d, _split(tiny_tensors)[1])
    for f in (A, B):
        data = (d / f).read_bytes()
        (d / f).write_bytes(data[: len(data) // 2])
    return d, [str(d / INDEX), "2 problem", f"{d / A}: truncated file", f"{d / B}: truncated file"]


def _path_traversal(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    _, shards = _split(tiny_tensors)
    _sharded(d, shards, weight_map=lambda wm: {k: ("../outside.safetensors" if v == A else v) for k, v in wm.items()})
    (d / A).rename(tmp_path / "outside.safetensors")  # a valid shard, but outside the VAE folder
    return d, [str(d / INDEX), '"../outside.safetensors"', "not a plain file name"]


def _unreadable_shape(tmp_path, tiny_tensors):
    """A mapped tensor given a zero-size shape of 70 dimensions: every command read it with numpy's
    reshape and printed its traceback (exit 1)."""
    d = _tiny_copy(tmp_path)
    data = (default_source() / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    a = "decoder.conv_in.conv.bias"
    header["extra.zero"] = _t("F32", [0] * 70, 0, 0)
    _raw(d / WEIGHTS, header, data[8 + n:])
    return d, [str(d / WEIGHTS), "'extra.zero'", "cannot be read as an array"]


CLI_CASES = [_unreadable_shape, _fifo_shard, _overlapping, _trailing, _bad_metadata, _dup_across_shards, _weight_map_list, _weight_map_int,
             _two_bad_shards, _path_traversal]


@pytest.mark.parametrize("make", CLI_CASES)
def test_convert_cli_exit_3(tmp_path, tiny_tensors, make):
    src, needles = make(tmp_path, tiny_tensors)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(convert_command, [str(src), "--out", str(out), "-q"], catch_exceptions=False)
    assert r.exit_code == 3, r.stderr
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(ln.startswith("  - ") for ln in lines[1:]), r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]


@pytest.mark.parametrize("make", [_unreadable_shape, _fifo_shard, _overlapping, _dup_across_shards,
                                  _weight_map_list, _path_traversal])
def test_inspect_cli_exit_3(tmp_path, tiny_tensors, make):
    src, needles = make(tmp_path, tiny_tensors)
    r = CliRunner().invoke(cli, ["inspect", str(src)], catch_exceptions=False)
    assert r.exit_code == 3, r.stderr
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize("make", [_overlapping, _dup_across_shards, _weight_map_int])
def test_verify_reports_the_bad_source(tmp_path, tiny_tensors, make):
    src, needles = make(tmp_path, tiny_tensors)
    r = CliRunner().invoke(cli, ["verify", str(src)], catch_exceptions=False)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "load: FAILED" in r.stdout, r.output
    for n in needles:
        assert n in r.stdout, r.output


def test_valid_sharded_tiny_vae_converts(tmp_path, tiny_tensors):
    d = _tiny_copy(tmp_path)
    _sharded(d, _split(tiny_tensors)[1])
    assert find_diffusers_vae(d).weight_files == [d / INDEX, d / A, d / B]
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(convert_command, [str(d), "--out", str(out), "--no-validate", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr


# ----------------------------------------------------------------------------------------
# a broken file does not hide the problems of the tensors that can still be read
# ----------------------------------------------------------------------------------------


def _missing_shard_and_tensor_problems(tmp_path, tiny_tensors):
    """Shard A is gone; shard B still holds a NaN, a tensor of the wrong shape and a key no rule
    matches: the missing shard used to be the only thing reported."""
    d = _tiny_copy(tmp_path)
    keys, shards = _split(tiny_tensors)
    nan_key = next(k for k in shards[B] if k.endswith(".bias"))
    shape_key = next(k for k in shards[B] if k.endswith(".weight") and k != nan_key)
    shards[B][nan_key] = np.full_like(shards[B][nan_key], np.nan)
    shards[B][shape_key] = np.zeros((3,), np.float32)
    shards[B]["bogus.key"] = np.zeros((2,), np.float32)
    _sharded(d, shards)
    (d / A).unlink()
    file_line = f"{d / A}: missing shard file (named in the index)"
    return d, {"file": file_line, "nan": (str(d / B), repr(nan_key)), "shape": (str(d / B), repr(shape_key)),
               "unmatched": (str(d / B), "'bogus.key'"), "missing_keys": keys[: len(keys) // 2]}


def _bad_entry_and_tensor_problems(tmp_path, tiny_tensors):
    """One header entry of an unsupported dtype, in a file whose other tensors include a NaN."""
    d = _tiny_copy(tmp_path)
    t = dict(tiny_tensors)
    nan_key = "decoder.conv_in.conv.bias"
    t[nan_key] = np.full_like(t[nan_key], np.nan)
    save_safetensors(t, d / WEIGHTS)
    data = (d / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    bad = "encoder.conv_in.conv.bias"
    header[bad] = dict(header[bad], dtype="Q8")  # no such safetensors dtype
    _raw(d / WEIGHTS, header, data[8 + n:])
    return d, {"file": f"{d / WEIGHTS}: tensor {bad!r}: unsupported dtype 'Q8'",
               "nan": (str(d / WEIGHTS), repr(nan_key)), "missing_keys": [bad]}


@pytest.mark.parametrize("make", [_missing_shard_and_tensor_problems, _bad_entry_and_tensor_problems])
def test_file_problems_reported_with_every_tensor_problem(tmp_path, tiny_tensors, make):
    src, want = make(tmp_path, tiny_tensors)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(convert_command, [str(src), "--out", str(out), "-q"], catch_exceptions=False)
    assert r.exit_code == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: cannot convert") and all(ln.startswith("  - ") for ln in lines[1:])
    assert want["file"] in lines[1], r.stderr  # the file's own problem leads
    for what in ("nan", "shape", "unmatched"):
        if what in want:  # one line names the file holding the tensor, and the tensor
            assert any(all(n in ln for n in want[what]) for ln in lines[2:]), (what, r.stderr)
    # the tensors that cannot be read are not also reported as missing from the source
    assert "missing tensor" not in r.stderr, r.stderr
    assert not out.exists()

    r = CliRunner().invoke(cli, ["inspect", str(src)], catch_exceptions=False)
    assert r.exit_code == 3 and "Traceback" not in r.output
    assert want["file"] in r.stderr, r.stderr
    for what in ("shape", "unmatched"):  # inspect reads headers only: no values (NaN) are checked
        if what in want:
            assert any(all(n in ln for n in want[what]) for ln in r.stderr.splitlines()), (what, r.stderr)
    assert "missing tensor" not in r.stderr, r.stderr

    r = CliRunner().invoke(cli, ["verify", str(src), "--no-parity"], catch_exceptions=False)
    assert r.exit_code == 1 and "load: FAILED" in r.stdout, r.output
    assert want["nan"][1].strip("'") in r.stdout.split("finite: FAILED")[1], r.stdout
    # the unreadable tensors are the file problem's, not also "missing"
    assert "missing:" not in r.stdout and not re.search(r"[1-9][0-9]* missing", r.stdout), r.stdout


def test_lenient_reader_keeps_the_readable_tensors(tmp_path):
    """``strict=False`` opens what can be read and says what cannot; strict still refuses."""
    index = _sharded(tmp_path, {A: {"x": X, "y": Y}, B: {"z": Z}})
    (tmp_path / A).unlink()
    with pytest.raises(SafetensorsError):
        open_safetensors(index)
    s = open_safetensors(index, strict=False)
    assert sorted(s) == ["z"] and s.unreadable == {"x": tmp_path / A, "y": tmp_path / A}
    assert s.problems == [f"{tmp_path / A}: missing shard file (named in the index)"]
    assert s.file_of("x") == tmp_path / A and s.file_of("z") == tmp_path / B
    np.testing.assert_array_equal(s.read_tensor("z"), Z)


def test_a_mapped_file_leaves_no_unclosed_file_object(tmp_path):
    """Tensors read through the memory map (``f[key]``: inspect, verify, load) map the descriptor
    the header came from; the file object wrapping its duplicate was never closed, a
    ResourceWarning on every such read. The map stays readable after the object is closed."""
    import gc
    import warnings

    from cogvae.converter.st_io import open_safetensors, save_safetensors

    path = tmp_path / "a.safetensors"
    save_safetensors({"a": np.arange(6, dtype=np.float32)}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = open_safetensors(path)
        np.testing.assert_array_equal(f["a"], np.arange(6, dtype=np.float32))
        gc.collect()
        f.close()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
