"""XLA's compile-time memory of a gradient through decode (or encode): what fine-tuning needs.

Compiles ``jax.jit(jax.grad(loss))`` with ``loss = sum(decode(z) ** 2)`` for the real architecture
(weights from shapes only: nothing is allocated or run) and prints the compiler's memory plan, with
and without gradient checkpointing (``vae.enable_gradient_checkpointing()``):

    off      no checkpointing: every activation of every frame batch is kept for the backward pass
    resnets  only each resnet checkpointed (what diffusers' blocks do)
    batches  only each frame batch checkpointed
    both     both (what enable_gradient_checkpointing() does)

On a machine without the GPU, ``--target h200`` (or h100) compiles for it deviceless, through the
jax CUDA plugin (``pip install "jax[cuda12]==<jax version>"``), as ``bench/bench_memory.py --target``
does; conv autotuning workspaces are not in such figures. Examples:

    python bench/bench_grad_memory.py --target h200 --latent 5x30x45
    python bench/bench_grad_memory.py --target h200 --latent 13x60x90 --policy both
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if any(arg == "--target" or arg.startswith("--target=") for arg in sys.argv):  # before jax loads its plugins:
    # the CUDA plugin is used for its compiler only
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"

import jax
import jax.numpy as jnp
from flax import nnx

from cogvae.model import PRESETS, abstract_model
from cogvae.model import vae as V
from cogvae.model.layers import conv_impl_scope, lowering

TARGETS = Path(__file__).with_name("gpu_targets")
POLICIES = ("off", "resnets", "batches", "both")


def set_policy(vae, policy: str) -> None:
    vae.disable_gradient_checkpointing()
    if policy in ("resnets", "both"):
        vae.enable_gradient_checkpointing()
    if policy == "resnets":
        vae.gradient_checkpointing = False  # the frame batches are not checkpointed
    if policy == "batches":
        vae.gradient_checkpointing = True  # only the frame batches are


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
    ap.add_argument("--kind", default="decode", choices=["decode", "encode"])
    ap.add_argument("--latent", default="5x30x45", help="decode: latent frames x height x width")
    ap.add_argument("--video", default="17x240x360", help="encode: frames x height x width")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    ap.add_argument("--policy", action="append", choices=POLICIES, help="repeatable; default: all four")
    ap.add_argument("--target", help="compile for this GPU (bench/gpu_targets/NAME.txtpb) instead of the local backend")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()

    dtype = jnp.dtype(a.dtype)
    shape = tuple(int(v) for v in (a.latent if a.kind == "decode" else a.video).split("x"))
    vae = abstract_model(PRESETS[a.preset], dtype=dtype)
    backend, sharding, device = jax.default_backend(), None, str(jax.devices()[0])
    if a.target:
        from jax.experimental import topologies

        path = Path(a.target) if Path(a.target).is_file() else TARGETS / f"{a.target}.txtpb"
        try:
            topo = topologies.get_topology_desc(platform="cuda", target_config=path.read_text(), topology="1x1x1")
        except Exception as e:  # noqa: BLE001 - no CUDA plugin: say what to install, as bench_memory.py does
            raise SystemExit(f"--target {a.target}: jax cannot compile for CUDA here ({str(e).splitlines()[0]}); "
                             f"install the CUDA plugin matching jax {jax.__version__}: "
                             f"pip install 'jax[cuda12]=={jax.__version__}'") from None
        dev = list(topo.devices)[0]
        backend, sharding = "gpu", jax.sharding.SingleDeviceSharding(dev)
        device = f"{dev.device_kind} (deviceless compile, jax {jax.__version__})"
    channels = PRESETS[a.preset].latent_channels if a.kind == "decode" else PRESETS[a.preset].in_channels
    x = jax.ShapeDtypeStruct((1, *shape, channels), dtype, sharding=sharding)
    key = lowering(backend=backend)  # the target's conv lowering, not this machine's
    options = V.kernel_compiler_options(backend, "scan", check=not a.target)
    report = {"device": device, "preset": a.preset, "kind": a.kind, "shape": shape, "dtype": a.dtype,
              "lowering": list(key), "xla_options": options, "policies": {}}
    print(f"{device}  {a.preset}  gradient of {a.kind} {'x'.join(map(str, shape))}  {a.dtype}  lowering {key}")
    for policy in a.policy or POLICIES:
        set_policy(vae, policy)
        graphdef, state = nnx.split(vae)
        if sharding is not None:
            state = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), state)

        def loss(state, x):
            m = nnx.merge(graphdef, state)
            with conv_impl_scope(key):
                y = m.decode(x) if a.kind == "decode" else m.encode(x)[0]
            return jnp.sum(y.astype(jnp.float32) ** 2)

        tic = time.perf_counter()
        compiled = jax.jit(jax.grad(loss), compiler_options=options or None).lower(state, x).compile()
        m = compiled.memory_analysis()
        r = {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
             "output_bytes": m.output_size_in_bytes, "compile_s": round(time.perf_counter() - tic, 1)}
        report["policies"][policy] = r
        gib = 1 << 30
        print(f"  {policy:8s} temporaries {r['temp_bytes'] / gib:7.2f} GiB  arguments {r['argument_bytes'] / gib:5.2f} GiB"
              f"  outputs {r['output_bytes'] / gib:5.2f} GiB  (compiled in {r['compile_s']} s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
