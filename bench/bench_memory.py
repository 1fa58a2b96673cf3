"""Compile-time memory of the decoder's compiled kernels (no weights, nothing executed).

For the real CogVideoX-2b architecture, builds the model abstractly (``nnx.eval_shape``), compiles
the two kernels ``decode`` runs (the first latent batch, and the ``lax.scan`` over the remaining
equal batches) for one latent shape, and prints XLA's ``memory_analysis()`` of each: the
temporaries XLA's buffer assignment reserves, the conv-cache carry, the outputs and arguments.
It runs on any backend in seconds, so it is the first thing to run on a GPU when the measured peak
of a decode is too high, and it needs neither torch nor weights.

    python bench/bench_memory.py                          # 13x60x90 latents (49x480x720), bf16 on GPU
    python bench/bench_memory.py --latent 3x12x18 --dtype float32
    python bench/bench_memory.py --impl 3d --json out.json

``XLA_FLAGS=--xla_dump_to=DIR`` additionally writes the buffer assignment and a memory-usage
report per kernel (look for ``*memory-usage-report.txt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvae.model import PRESETS, VAEConfig, abstract_model, default_compute_dtype
from cogvae.model import vae as V
from cogvae.model.layers import conv3d_impl, conv_impl_scope


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
    ap.add_argument("--latent", default="13x60x90", help="T x H x W of the latents (default: 49x480x720 video)")
    ap.add_argument("--dtype", default=None, help="compute and parameter dtype (default: bf16 on GPU/TPU, fp32 on CPU)")
    ap.add_argument("--impl", default=None, help="conv lowering (default: the backend's)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args()
    config: VAEConfig = PRESETS[a.preset]
    dtype = jnp.dtype(a.dtype) if a.dtype else jnp.dtype(default_compute_dtype())
    impl = a.impl or conv3d_impl()
    t, h, w = (int(v) for v in a.latent.lower().split("x"))
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, param_dtype=dtype))
    batches = V.frame_batches(t, V.LATENT_FRAMES_BATCH)
    s0, e0 = batches[0]
    c = config.latent_channels
    first_in = jax.ShapeDtypeStruct((1, e0 - s0, h, w, c), dtype)
    report: dict = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "preset": a.preset,
                    "latent": [t, h, w], "dtype": dtype.name, "conv_impl": impl, "params_bytes": _nbytes(state)}
    k = V.kernels()
    with conv_impl_scope(impl):
        tic = time.perf_counter()
        first = k["first"].lower("decode", impl, graphdef, state, first_in, None).compile()
        report["first_compile_s"] = time.perf_counter() - tic
        _, cache = jax.eval_shape(lambda s, z: V._first_fn("decode", impl, graphdef, s, z, None), state, first_in)
        report["cache_bytes"] = _nbytes(cache)
        m = first.memory_analysis()
        report["first"] = {"temp_bytes": m.temp_size_in_bytes, "output_bytes": m.output_size_in_bytes,
                           "argument_bytes": m.argument_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
        if len(batches) > 1:
            n = len(batches) - 1
            xs = jax.ShapeDtypeStruct((n, 1, V.LATENT_FRAMES_BATCH, h, w, c), dtype)
            tic = time.perf_counter()
            scan = k["scan"].lower("decode", impl, graphdef, state, xs, cache, None).compile()
            report["scan_compile_s"] = time.perf_counter() - tic
            m = scan.memory_analysis()
            report["scan"] = {"iterations": n, "temp_bytes": m.temp_size_in_bytes,
                              "output_bytes": m.output_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
                              "alias_bytes": m.alias_size_in_bytes}
    gib = 1 << 30
    print(f"{report['device']}  {a.preset}  latents {t}x{h}x{w}  {dtype.name}  conv lowering {impl}")
    print(f"  parameters {report['params_bytes'] / gib:.2f} GiB, conv caches {report['cache_bytes'] / gib:.2f} GiB")
    for name in ("first", "scan"):
        if name in report:
            r = report[name]
            # Everything the kernel holds while it runs: donated arguments share their outputs' buffers.
            r["total_bytes"] = r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
            print(f"  {name:5s} temporaries {r['temp_bytes'] / gib:6.2f} GiB  outputs {r['output_bytes'] / gib:6.2f} GiB"
                  f"  arguments {r['argument_bytes'] / gib:6.2f} GiB  aliased {r['alias_bytes'] / gib:5.2f} GiB"
                  f"  total {r['total_bytes'] / gib:6.2f} GiB  (compiled in {report[name + '_compile_s']:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
