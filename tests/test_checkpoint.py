"""The streamed msgpack writer is byte-identical to flax.serialization and reads back exactly."""

from __future__ import annotations

import flax.serialization as fs
import ml_dtypes
import numpy as np
import pytest

from cogvae.converter.checkpoint import _read_msgpack, _write_msgpack, iter_msgpack, nest


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2,), (3,), (4,), (70,), (20000,), (5, 5, 5, 5, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_msgpack_matches_flax(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    params = {"enc.0.kernel": rng.standard_normal(shape).astype(dtype),
              "enc.1.t": rng.standard_normal((4, 5)).astype(dtype).T}
    _write_msgpack(tmp_path / "p.msgpack", params)
    assert (tmp_path / "p.msgpack").read_bytes() == fs.msgpack_serialize(nest(params))
    # flax sorts map keys; so does our writer, whatever the order it is given
    _write_msgpack(tmp_path / "r.msgpack", dict(reversed(list(params.items()))))
    assert (tmp_path / "r.msgpack").read_bytes() == fs.msgpack_serialize(nest(params))
    back = _read_msgpack(tmp_path / "p.msgpack")
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == np.ascontiguousarray(v).tobytes()
    restored = fs.msgpack_restore((tmp_path / "p.msgpack").read_bytes())
    assert restored["enc"]["0"]["kernel"].dtype == np.dtype(dtype)


# ----------------------------------------------------------------------------------------
# the streamed msgpack reader
# ----------------------------------------------------------------------------------------


def _flax_file(tmp_path, params):
    """A file written by flax.serialization itself (not by our writer)."""
    path = tmp_path / "flax.msgpack"
    path.write_bytes(fs.msgpack_serialize(nest(params)))
    return path


def test_stream_reads_flax_files_into_aligned_arrays(tmp_path):
    rng = np.random.default_rng(0)
    params = {"a.b.kernel": rng.standard_normal((3, 3, 3, 40, 24)).astype(np.float32),
              "a.b.bias": rng.standard_normal((24,)).astype(ml_dtypes.bfloat16),
              "a.s": np.array(1.5, np.float16),  # 0-d
              "z": rng.standard_normal((300, 7)).astype(np.float32)}
    path = _flax_file(tmp_path, params)
    got = list(iter_msgpack(path))
    assert [k for k, _ in got] == sorted(params)  # flax writes every map's keys sorted
    for k, a in got:
        assert a.dtype == params[k].dtype and a.shape == params[k].shape and a.tobytes() == params[k].tobytes()
        assert a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"]
        if a.nbytes >= 64:
            assert a.ctypes.data % 64 == 0  # jax on CPU adopts it without a copy
    meta = dict(iter_msgpack(path, data=False))
    assert meta == {k: (v.shape, v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "file ended early"),
    (lambda b: b + b"\x00", "trailing data"),
    (lambda b: b"\x93\x01\x02\x03", "expected a map"),
    (lambda b: b"", "empty file"),
    (lambda b: fs.msgpack_serialize({"a": {"b": 3}}), "expected a map or an ndarray"),
    (lambda b: fs.msgpack_serialize({"a": np.complex64(1)}), "unexpected msgpack extension type"),
])
def test_stream_rejects_damaged_files(tmp_path, damage, message):
    path = _flax_file(tmp_path, {"w.kernel": np.ones((64, 64), np.float32), "w.bias": np.ones((64,), np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        list(iter_msgpack(path))
    if message == "file ended early":
        with pytest.raises(ValueError, match=message):
            list(iter_msgpack(path, data=False))


def test_adopt_array_shares_aligned_host_memory_on_cpu():
    import jax

    from cogvae.converter.checkpoint import adopt_array
    from cogvae.converter.st_io import aligned_empty

    a = aligned_empty((256, 64), np.float32)
    a[...] = 2.0
    j = adopt_array(a)
    if jax.default_backend() == "cpu":
        assert j.unsafe_buffer_pointer() == a.ctypes.data  # no second copy of the weights
    b = np.ones((1000, 3), np.float32)[:, :2]  # unaligned and strided: copied, same values
    jb = adopt_array(b)
    np.testing.assert_array_equal(np.asarray(jb), b)
    assert adopt_array(j) is j
