#!/usr/bin/env python
"""Time the three lowerings of the decoder's dominant conv (128 -> 128, 3x3x3, full resolution).

Prints TFLOP/s per lowering ("3d", "2d_sum", "2d_concat"; see cogvae.model.layers.conv3d) and,
on the last line, ``best <impl>``: bench_vae.py's GPU run uses it through COGVAE_CONV_IMPL.

    python bench/bench_conv.py                 # default shape (1, 10, 480, 720, 128), bf16
    python bench/bench_conv.py --small         # a CPU-sized shape
"""

import argparse
import time

import jax
import jax.numpy as jnp

from cogvae.model.layers import CONV3D_IMPLS, conv3d


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    b, t, h, w, c = (1, 6, 32, 48, 32) if a.small else (1, 10, 480, 720, 128)
    dtype = jnp.float32 if a.small else jnp.bfloat16
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (b, t, h, w, c), dtype)
    k = (jax.random.normal(kk, (3, 3, 3, c, c), jnp.float32) / (27 * c) ** 0.5).astype(dtype)
    flops = 2 * 27 * c * c * b * (t - 2) * h * w
    prec = jax.lax.Precision.DEFAULT
    best = None
    ref = None
    for impl in CONV3D_IMPLS:
        f = jax.jit(lambda x, k, impl=impl: conv3d(x, k, ((0, 0), (1, 1), (1, 1)), prec, impl))
        t0 = time.perf_counter()
        y = f(x, k).block_until_ready()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            y = f(x, k)
        y.block_until_ready()
        dt = (time.perf_counter() - t0) / a.repeats
        ref = y if ref is None else ref
        diff = float(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32)).max())
        tflops = flops / dt / 1e12
        print(f"{impl:18s} {dt * 1e3:8.2f} ms  {tflops:7.2f} TFLOP/s  first {compile_s:5.1f} s  max|diff vs 3d| {diff:.2e}")
        if best is None or dt < best[1]:
            best = (impl, dt)
    print(f"device {jax.devices()[0].device_kind}")
    print(f"best {best[0]}")


if __name__ == "__main__":
    main()
