"""Decode and encode split over several devices (cogvae.model.sharding) still match diffusers.

What is real and what stands in: the devices are 4 CPU devices that XLA makes of this machine
(``--xla_force_host_platform_device_count``; no multi-accelerator machine is available here), so
GSPMD partitions the kernels and exchanges halos and GroupNorm sums exactly as it would across
chips, but nothing is timed. The reference is diffusers itself, built in-process with the parity
tests' random weights. JAX fixes its device count when it starts, so the sharded side runs in a
subprocess (``tests/_sharded_worker.py``); every assertion is made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from _ref import TINY, assert_parity, diffusers_vae
from cogvae.model import video_sharding

WORKER = Path(__file__).with_name("_sharded_worker.py")
CONFIG = "l1-g4-z4"  # the worker's
# Data parallel over 2 devices, and height and width each split over 2 (a 2 x 2 mesh: every
# conv exchanges halos in both directions); a 4-way height split is in the memory test.
CASES = {"batch": ["b", None, None, None, None], "height_width": [None, None, "h", "w", None]}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, worker_id):
    # The pytest-xdist workers of one session share one run of the worker (about 40 s on 2 cores):
    # the first to get here runs it under a lock in the session's folder, the others read its files.
    if worker_id == "master":
        out = tmp_path_factory.mktemp("sharded")
    else:
        out = tmp_path_factory.getbasetemp().parent / "sharded"
    with FileLock(f"{out}.lock"):
        if not (out / "report.json").is_file():
            out.mkdir(exist_ok=True)
            env = dict(os.environ)
            env.pop("COGVAE_CONV_IMPL", None)
            proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, proc.stderr[-4000:]
            (out / "report.json").write_text(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    with np.load(out / "outputs.npz") as f:
        arrays = dict(f)
    return report, arrays


@pytest.fixture(scope="module")
def reference(sharded):
    _, arrays = sharded
    ref = diffusers_vae(seed=1, **TINY[CONFIG])
    z = torch.from_numpy(arrays["z"]).permute(0, 4, 1, 2, 3)
    x = torch.from_numpy(arrays["x"]).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        return ref.decode(z).sample, ref.encode(x).latent_dist.mean


# The tests that read the worker's report run under -m slow: the worker (4 CPU devices, two
# meshes, and the real 2b decoder's kernels analysed for the memory test) takes about 2 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_decode_and_encode_match_diffusers(sharded, reference, case):
    report, arrays = sharded
    assert report["devices"] == 4
    r = report["cases"][case]
    video, mean = reference
    assert_parity(arrays[f"{case}_video"], video, f"sharded ({case}) decode t=5")
    assert_parity(arrays[f"{case}_mean"], mean, f"sharded ({case}) encode T=17 mean")
    # The weights sit on every device of the mesh; the outputs stay split as the inputs were; a
    # second call of the same shapes and sharding reuses the compiled kernels.
    assert r["params_replicated"]
    assert r["input_spec"] == r["video_spec"] == r["mean_spec"] == CASES[case]
    assert r["traces_on_second_call"] == 0


@pytest.mark.slow
def test_a_mesh_with_explicit_axes_is_refused_saying_how_to_build_one(sharded):
    """jax.make_mesh makes explicit axes by default; a batch split over them fails in jax's
    sharding types (GroupNorm's reshape), and decode says to build the mesh with automatic axes."""
    report, _ = sharded
    message = report["explicit_axes_error"] or ""
    assert message.startswith("decode: the input is split over mesh axes of the explicit kind"), message
    assert "axis_types=(jax.sharding.AxisType.Auto,) * len(names)" in message and "jax said: " in message


@pytest.mark.slow
def test_height_split_divides_per_device_memory(sharded):
    """The real 2b decoder's kernels (XLA's compile-time analysis, fp32), height split over 4
    devices: each device holds about a quarter of the unsplit temporaries and outputs. (Before
    partitioned kernels read their new caches as plain slices, the scan kept 0.61x.)"""
    report, _ = sharded
    one, four = report["memory"]["1"], report["memory"]["4"]
    for kernel in ("first", "scan"):
        assert four[f"{kernel}_temp"] <= 0.35 * one[f"{kernel}_temp"], (kernel, one, four)
        assert four[f"{kernel}_out"] <= 0.26 * one[f"{kernel}_out"], (kernel, one, four)


def test_video_sharding_names_mesh_axes():
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    assert tuple(video_sharding(mesh, height="x").spec) == (None, None, "x", None, None)
    with pytest.raises(ValueError, match="not in the mesh"):
        video_sharding(mesh, height="y")
    with pytest.raises(ValueError, match="one dimension only"):
        video_sharding(mesh, height="x", width="x")
    # jax's form for one dimension over two axes: said so (it was "('x', 'y') not in the mesh's axes")
    with pytest.raises(ValueError, match=r"height=\('x', 'y'\): give one mesh axis name per dimension"):
        video_sharding(mesh, height=("x", "y"))
