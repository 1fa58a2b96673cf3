"""Runs in a subprocess of tests/test_sharding.py: JAX must see 4 CPU devices from its start
(``--xla_force_host_platform_device_count``), which the test process, already initialised with
one, cannot. Writes the sharded outputs to ``OUT_DIR/outputs.npz`` and prints one JSON line of
measurements; the test process compares with diffusers and makes every assertion."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ref import TINY, diffusers_vae, to_nnx  # noqa: E402
from cogvae.model import PRESETS, abstract_model, replicate, video_sharding  # noqa: E402
from cogvae.model import vae as V  # noqa: E402
from cogvae.model.layers import lowering  # noqa: E402


CONFIG = "l1-g4-z4"


def spec(x):
    return [None if p is None else str(p) for p in x.sharding.spec] + [None] * (x.ndim - len(x.sharding.spec))


def traces(fn):
    before = dict(V.TRACE_COUNTS)
    fn()
    return sum(V.TRACE_COUNTS[k] - before[k] for k in before)


def main(out_dir: str):
    devices = jax.devices()
    report = {"devices": len(devices), "cases": {}}
    # The parity tests' scaled random weights (torch.manual_seed), through the project's mapping.
    ref = diffusers_vae(seed=1, **TINY[CONFIG])
    rng = np.random.default_rng(0)
    c = TINY[CONFIG]["latent_channels"]
    # 5 latents: the first batch (3) and one scanned batch; 17 frames: the first batch (9) and one
    # scanned batch. Sizes divide by every split below, at every resolution of this VAE.
    z = rng.standard_normal((2, 5, 8, 6, c)).astype(np.float32)
    x = rng.uniform(-1, 1, (2, 17, 64, 48, 3)).astype(np.float32)
    arrays = {"z": z, "x": x}
    meshes = {
        # jax.make_mesh with automatic axes, as the README writes it; Mesh(): automatic by default
        "batch": (jax.make_mesh((2,), ("b",), axis_types=(AxisType.Auto,), devices=devices[:2]), dict(batch="b")),
        "height_width": (Mesh(np.array(devices).reshape(2, 2), ("h", "w")), dict(height="h", width="w")),
    }
    seconds = report["seconds"] = {}
    for name, (mesh, axes) in meshes.items():
        tic = time.perf_counter()
        vae = to_nnx(ref)
        replicate(vae, mesh)
        leaves = jax.tree_util.tree_leaves(nnx.state(vae))
        sharding = video_sharding(mesh, **axes)
        zs, xs = jax.device_put(z, sharding), jax.device_put(x, sharding)
        video = vae.decode(zs)
        mean = vae.encode(xs)[0]
        again = traces(lambda: (vae.decode(zs).block_until_ready(), vae.encode(xs)[0].block_until_ready()))
        arrays[f"{name}_video"], arrays[f"{name}_mean"] = np.asarray(video), np.asarray(mean)
        report["cases"][name] = {
            "params_replicated": all(a.sharding.is_fully_replicated and a.sharding.device_set == set(mesh.devices.flat)
                                     for a in leaves),
            "input_spec": spec(zs),
            "video_spec": spec(video),
            "mean_spec": spec(mean),
            "traces_on_second_call": again,
        }
        seconds[name] = time.perf_counter() - tic
    np.savez(os.path.join(out_dir, "outputs.npz"), **arrays)

    # jax.make_mesh's default, explicit axes: a batch split cannot go through GroupNorm's reshape
    # there (jax's ShardingTypeError), which encode and decode turn into a ValueError saying how
    # to build the mesh. Only traced, nothing computed.
    explicit = jax.make_mesh((2,), ("b",), devices=devices[:2])
    vae = to_nnx(ref)
    replicate(vae, explicit)
    try:
        vae.decode(jax.device_put(z, video_sharding(explicit, batch="b")))
        report["explicit_axes_error"] = None
    except ValueError as e:
        report["explicit_axes_error"] = str(e)

    # Per-device memory of the real 2b decoder's two kernels, height split over 1 and 4 devices:
    # XLA's compile-time analysis, from shapes alone.
    graphdef, state = V.kernel_split(abstract_model(PRESETS["cogvideox-2b"], dtype=jnp.float32), "decode")
    memory = {}
    tic = time.perf_counter()
    for n in (1, 4):
        mesh = Mesh(np.array(devices[:n]), ("h",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        st = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state)
        sh = video_sharding(mesh, height="h")
        first = jax.ShapeDtypeStruct((1, 3, 32, 24, 16), jnp.float32, sharding=sh)
        key = lowering(partitioned=V._partitioned(first))  # what decode compiles for such an input
        _, cache = jax.eval_shape(lambda s, v: V._first_fn("decode", key, graphdef, s, v, None), st, first)
        cache = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), cache)
        xs = jax.ShapeDtypeStruct((1, 1, 2, 32, 24, 16), jnp.float32,
                                  sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, None, "h")))
        k = V.kernels()
        m_first = k["first"].lower("decode", key, graphdef, st, first, None).compile().memory_analysis()
        m_scan = k["scan"].lower("decode", key, graphdef, st, xs, cache, None).compile().memory_analysis()
        memory[n] = {"first_temp": m_first.temp_size_in_bytes, "first_out": m_first.output_size_in_bytes,
                     "scan_temp": m_scan.temp_size_in_bytes, "scan_out": m_scan.output_size_in_bytes}
    report["memory"] = memory
    seconds["memory"] = time.perf_counter() - tic
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
