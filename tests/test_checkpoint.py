"""The streamed msgpack writer is byte-identical to flax.serialization and reads back exactly."""

from __future__ import annotations

import flax.serialization as fs
import ml_dtypes
import numpy as np
import pytest

from cogvae.converter.checkpoint import _read_msgpack, _write_msgpack, nest


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2,), (3,), (4,), (70,), (20000,), (5, 5, 5, 5, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_msgpack_matches_flax(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    params = {"enc.0.kernel": rng.standard_normal(shape).astype(dtype),
              "enc.1.t": rng.standard_normal((4, 5)).astype(dtype).T}
    _write_msgpack(tmp_path / "p.msgpack", params)
    assert (tmp_path / "p.msgpack").read_bytes() == fs.msgpack_serialize(nest(params))
    back = _read_msgpack(tmp_path / "p.msgpack")
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == np.ascontiguousarray(v).tobytes()
    restored = fs.msgpack_restore((tmp_path / "p.msgpack").read_bytes())
    assert restored["enc"]["0"]["kernel"].dtype == np.dtype(dtype)
