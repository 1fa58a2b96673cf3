#!/usr/bin/env python
"""The same outputs under two jax versions: run the tiny shipped VAE (fp32 and bf16) through
decode, encode, the reference loop, padded / exact / stacked tiles, slicing and a gradient, save
every output, and compare two such files.

    python bench/cross_version.py run /tmp/a.npz            # e.g. Python 3.11, jax 0.10.2
    venv312/bin/python bench/cross_version.py run /tmp/b.npz  # e.g. Python 3.12, jax 0.12
    python bench/cross_version.py compare /tmp/a.npz /tmp/b.npz

The second interpreter needs cogvae importable (an install, or PYTHONPATH to a folder with
cogvae/{converter,model,mappings} linked to this tree, as bench/gpu_run.sh makes) but no torch:
parity with diffusers is the test suite's, on the first version; this says the second computes the same.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cogvae.converter import load
from cogvae.model import vae as vae_mod

TINY = Path(__file__).resolve().parent.parent / "converter" / "assets" / "tiny-cogvideox-vae"


def compare(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        print(f"{k:28s} rel L2 {np.linalg.norm(x - y) / np.linalg.norm(x):.2e}  max abs {np.abs(x - y).max():.2e}")


def run(out_path):
    vae = load(TINY, compute_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, 6, 10, 15, 16)), jnp.float32)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 13, 40, 56, 3)), jnp.float32)
    res = {}

    def traces(fn):  # the result, and how many times each kernel was traced for it
        before = dict(vae_mod.TRACE_COUNTS)
        r = jax.block_until_ready(fn())
        return r, {k: vae_mod.TRACE_COUNTS[k] - before[k] for k in before}

    res["decode"], t1 = traces(lambda: vae.decode(z))
    _, t2 = traces(lambda: vae.decode(z))
    res["decode_eager"] = vae.decode(z, compiled=False)
    res["encode_mean"] = vae.encode(x)[0]
    res["encode_eager_mean"] = vae.encode(x, compiled=False)[0]
    z2 = jnp.asarray(rng.standard_normal((1, 14, 10, 15, 16)), jnp.float32)
    _, t3 = traces(lambda: vae.decode(z2))
    for pad, stack in ((True, True), (False, True), (False, False)):
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=48, pad_tiles=pad, batch_tiles=stack)
        res[f"tiled_decode_{pad}_{stack}"] = vae.decode(z)
        res[f"tiled_encode_{pad}_{stack}"] = vae.encode(x)[0]
    vae.disable_tiling()
    vae.enable_slicing()
    res["sliced_encode"] = vae.encode(x)[0]
    vae.disable_slicing()
    bf = load(TINY, dtype="bfloat16", compute_dtype=jnp.bfloat16)
    res["bf16_decode"] = bf.decode(z.astype(jnp.bfloat16)).astype(jnp.float32)
    res["grad_decode"] = jax.grad(lambda zz: jnp.mean(vae.decode(zz) ** 2))(z)
    np.savez(out_path, **{k: np.asarray(v) for k, v in res.items()})
    print(jax.__version__, "traces first call", t1, "second", t2, "14 latents", t3)
    for k, v in res.items():
        print(f"{k:28s} {tuple(v.shape)} finite={bool(np.isfinite(np.asarray(v)).all())}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
