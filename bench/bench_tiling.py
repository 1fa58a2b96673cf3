#!/usr/bin/env python
"""Tiled decode time against untiled decode, same model, same latents, same run.

Issue 4's target for tiling is relative to the untiled decode (at most 1.5x its time), so this
script times three ways of decoding one latent tensor with the real CogVideoX-2b architecture
(random weights, no torch needed):

- untiled;
- tiled with edge tiles padded to the full tile (``enable_tiling()``, one compiled function);
- tiled with every tile at its own size (``enable_tiling(pad_tiles=False)``), equal-shaped edge
  tiles stacked along the batch axis (the default ``batch_tiles``);
- the same, one tile at a time (``batch_tiles=False``).

It prints the first call (compile included), the best of ``--repeats`` later calls, the ratio to
untiled, and the max abs difference of each tiled result from the padded one.

    python bench/bench_tiling.py                      # 1 latent frame of 60x90 (one 480x720 frame)
    python bench/bench_tiling.py --latent 13x60x90    # the full 49-frame video (GPU)
    python bench/bench_tiling.py --latent 1x30x45 --tile 120x180   # the 2b tile grid at half size

On a 2-core CPU in fp32 the default case takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvae.model import PRESETS, default_compute_dtype
from cogvae.model.vae import AutoencoderKLCogVideoX

from bench_vae import _timed  # the first-call and repeated timing bench_vae.py uses (bench/ is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
    ap.add_argument("--latent", default="1x60x90", help="T x H x W of the latents")
    ap.add_argument("--dtype", default=None, help="compute and parameter dtype (default: bf16 on GPU/TPU, fp32 on CPU)")
    ap.add_argument("--tile", default=None, help="H x W of a sample tile (default: the preset's, half its sample size)")
    ap.add_argument("--modes", default="untiled,padded,exact,unstacked",
                    help="comma list of untiled, padded, exact (stacked edge tiles), unstacked")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype) if a.dtype else jnp.dtype(default_compute_dtype())
    config = PRESETS[a.preset]
    t, h, w = (int(v) for v in a.latent.lower().split("x"))
    vae = AutoencoderKLCogVideoX(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, t, h, w, config.latent_channels)), dtype)
    print(f"{jax.devices()[0]}  {a.preset}  latents {t}x{h}x{w}  {dtype.name}", flush=True)
    rows, outs = {}, {}
    tile = {}
    if a.tile:
        th, tw = (int(v) for v in a.tile.lower().split("x"))
        tile = dict(tile_sample_min_height=th, tile_sample_min_width=tw)
    modes = {"untiled": ("untiled", None, None), "padded": ("tiled, padded tiles", True, None),
             "exact": ("tiled, exact tiles", False, True), "unstacked": ("tiled, exact, unstacked", False, False)}
    chosen = a.modes.split(",")
    if not chosen or chosen[0] != "untiled" or not set(chosen) <= set(modes):
        ap.error(f"--modes: a comma list that starts with untiled (the ratios' base), of {', '.join(modes)}")
    for name, pad, stack in (modes[m] for m in chosen):
        if pad is None:
            vae.disable_tiling()
        else:
            vae.enable_tiling(**tile, pad_tiles=pad, batch_tiles=stack)
        out, first, times = _timed(lambda: vae.decode(z), jax.block_until_ready, a.repeats)
        outs[name] = np.asarray(out.astype(jnp.float32))
        rows[name] = dict(first_s=first, best_s=min(times), ratio=min(times) / rows.get("untiled", {"best_s": min(times)})["best_s"])
        r = rows[name]
        print(f"  {name:20s} first {r['first_s']:7.1f} s  best {r['best_s']:7.2f} s  x untiled {r['ratio']:.2f}", flush=True)
    diffs = {}
    for label, x, y in (("exact - padded", "tiled, exact tiles", "tiled, padded tiles"),
                        ("stacked - unstacked", "tiled, exact tiles", "tiled, exact, unstacked")):
        if x in outs and y in outs:
            diffs[label] = float(np.abs(outs[x] - outs[y]).max())
            print(f"  max |{label}| = {diffs[label]:.3e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), latent=[t, h, w], dtype=dtype.name, rows=rows,
                           tile=a.tile, max_abs=diffs), f, indent=2)


if __name__ == "__main__":
    main()
