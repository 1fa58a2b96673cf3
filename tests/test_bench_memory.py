"""bench/bench_memory.py on this machine's backend: the figures it writes, and its errors.

Nothing is faked: the script compiles the real 2b kernels for a tiny latent. Its ``--target``
mode (a deviceless GPU or TPU compile) needs the jax CUDA plugin or libtpu, which the test
environment does not install, so here it is checked that an unknown target and a TPU target
without libtpu are refused (where libtpu is installed, the TPU test compiles instead).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind, shape", [("decode", "--latent=5x4x6"),
                                         pytest.param("encode", "--video=17x16x24", marks=pytest.mark.slow)])  # encode: -m slow
def test_writes_both_kernels_figures(tmp_path, kind, shape):
    out = tmp_path / "m.json"
    r = _run("--kind", kind, shape, "--dtype", "float32", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["kind"] == kind and report["target"] is None
    for kernel in ("first", "scan"):
        fig = report[kernel]
        assert fig["total_bytes"] == fig["temp_bytes"] + fig["argument_bytes"] + fig["output_bytes"] - fig["alias_bytes"]
        assert fig["temp_bytes"] > 0
    # The scan's conv caches are donated: its argument and output share them.
    assert report["scan"]["alias_bytes"] == report["cache_bytes"]


def test_unknown_target_is_one_line_error():
    r = _run("--target", "no-such-gpu")
    assert r.returncode != 0
    assert "--target no-such-gpu: no such file" in r.stderr and "h200" in r.stderr and "v5e" in r.stderr


def test_tpu_target(tmp_path):
    """Without libtpu (the test environment) a TPU target is refused in one line that says what to
    install; with it, the first kernel compiles for a v5e chip with the TPU's lowering."""
    import importlib.util

    out = tmp_path / "tpu.json"
    r = _run("--target", "v5e", "--latent", "3x2x3", "--kernels", "first", "--json", str(out))
    if importlib.util.find_spec("libtpu") is None:
        assert r.returncode != 0
        assert "--target v5e: jax cannot compile for TPU here" in r.stderr and "jax[tpu]==" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        report = json.loads(out.read_text())
        assert (report["backend"], report["conv_impl"], report["tail_read"]) == ("tpu", "3d", "barrier")
        assert report["first"]["total_bytes"] >= report["params_bytes"] / 2  # the decoder's weights, at least
