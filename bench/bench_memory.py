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
    python bench/bench_memory.py --kernels scan --variant default \
        --variant lhs:xla_gpu_enable_latency_hiding_scheduler=true       # XLA options side by side

Split over devices (``cogvae.model.video_sharding``: height over N devices, weights replicated;
on a CPU, make N devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/bench_memory.py \
        --dtype float32 --kernels first,scan,step --split-height 4     # per-device figures

For a GPU you do not have (deviceless compile: XLA's GPU compiler from the jax CUDA plugin, run on
this machine's CPU against a target description in ``bench/gpu_targets/``; no driver or device is
touched). Install the plugin matching jax into a separate environment, e.g.
``pip install "jax[cuda12]==<your jax version>"``, then:

    python bench/bench_memory.py --target h200                      # what an H200 compiles
    python bench/bench_memory.py --target h200 --kind encode --video 49x480x720
    python bench/bench_memory.py --target OUT/gpu_target_config.pbtxt \
        --autotune-results OUT/autotune_2b.textproto     # with a GPU run's conv autotuning (gpu_run.sh autotune)

Convolution algorithms are not autotuned without a device, so their workspaces are left out
(unless a GPU run's autotuning results are passed in); for
the 2b decode's first batch the figures equal those measured on an H200 with the same jax
(bench/RESULTS.md). Use the jax version the GPU runs: the GPU compiler changes between releases.

``XLA_FLAGS=--xla_dump_to=DIR`` additionally writes the buffer assignment and a memory-usage
report per kernel (look for ``*memory-usage-report.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _argv_value(name: str) -> str | None:
    """An option's value from sys.argv before argparse runs (``--name V`` or ``--name=V``)."""
    for i, arg in enumerate(sys.argv):
        if arg == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


if _argv_value("--target"):  # before jax loads its plugins: compile for a GPU or TPU, run nothing on one
    os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin or libtpu is used for its compiler only
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # its driver check needs a device
    if _argv_value("--autotune-results"):  # XLA reads the flag when its GPU compiler starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_load_autotune_results_from="
                                   + os.path.abspath(_argv_value("--autotune-results"))).strip()

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cogvae.model import PRESETS, VAEConfig, abstract_model, default_compute_dtype, video_sharding
from cogvae.model import vae as V
from cogvae.model.layers import TAIL_READ, TAIL_READS, conv3d_impl, conv_impl_scope, lowering

TARGETS = Path(__file__).resolve().parent / "gpu_targets"


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _option_value(v: str):
    """An XLA option's value from the command line: true/false, an int, a float, else the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_variant(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:opt=value,opt=value`` -> (NAME, {opt: value}), XLA options added to the
    kernels' own (``vae.compiler_options``) for one compile."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {spec!r}: expected opt=value, got {item!r}")
        opts[key.strip()] = _option_value(value.strip())
    return name, opts


# TPU generations a deviceless compile can target (libtpu's compile-only client): one chip each.
TPU_TARGETS = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}


def target_backend(name: str) -> str:
    """The backend a ``--target`` compiles for: "tpu" for a TPU_TARGETS name, else "gpu"."""
    return "tpu" if name in TPU_TARGETS else "gpu"


def target_devices(name: str) -> list:
    """Compile-only devices of one accelerator: a TPU generation (``TPU_TARGETS``, needs libtpu), or
    a GPU described by ``bench/gpu_targets/NAME.txtpb`` (or a file; needs the jax CUDA plugin)."""
    from jax.experimental import topologies

    if name in TPU_TARGETS:
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=TPU_TARGETS[name], chip_config_name="default",
                                                chips_per_host_bounds=(1, 1, 1), num_slices=1)
        except Exception as e:  # no libtpu, or one that does not know this generation
            raise SystemExit(f"--target {name}: jax cannot compile for TPU here ({str(e).splitlines()[0]}); install libtpu "
                             f"matching jax {jax.__version__}: pip install 'jax[tpu]=={jax.__version__}'")
        return list(topo.devices)[:1]
    path = Path(name) if Path(name).is_file() else TARGETS / f"{name}.txtpb"
    if not path.is_file():
        known = sorted([p.stem for p in TARGETS.glob("*.txtpb")] + list(TPU_TARGETS))
        raise SystemExit(f"--target {name}: no such file, and not one of {known}")
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=path.read_text(), topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        raise SystemExit(f"--target {name}: jax cannot compile for CUDA here ({str(e).splitlines()[0]}); install the "
                         f"CUDA plugin matching jax {jax.__version__}: pip install 'jax[cuda12]=={jax.__version__}'")
    return list(topo.devices)


def _fused_fn(kind, impl, graphdef, state, first, xs):
    """An experiment, not what ``decode`` runs: the first batch and the scan in one compiled function,
    so the scan's initial cache is a value of the same computation instead of a donated argument."""
    video, cache = V._first_fn(kind, impl, graphdef, state, first, None)
    outs, _ = V._scan_fn(kind, impl, graphdef, state, xs, cache, None)
    return video, outs


def _step_fn(kind, impl, graphdef, state, x, cache):
    """An experiment, not what ``decode`` runs: one scanned batch as its own compiled function (the
    cache donated), i.e. what a Python loop over batches would compile instead of the scan."""
    with conv_impl_scope(impl):
        return V._STEPS[kind](nnx.merge(graphdef, state), x, cache, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
    ap.add_argument("--latent", default="13x60x90", help="T x H x W of the latents (default: 49x480x720 video)")
    ap.add_argument("--dtype", default=None, help="compute and parameter dtype (default: bf16 on GPU/TPU, fp32 on CPU)")
    ap.add_argument("--impl", default=None, help="conv lowering (default: the backend's)")
    ap.add_argument("--kernels", default="first,scan",
                    help="comma list of the kernels to compile: first, scan (what decode runs); experiments: "
                         "fused (both in one compiled function), step (one scanned batch on its own)")
    ap.add_argument(
        "--variant", action="append", default=None, metavar="NAME[:opt=value,...]",
        help="compile the kernels once more with these XLA options added (repeatable), e.g. "
             "'lhs:xla_gpu_enable_latency_hiding_scheduler=true'; default: one variant, 'default'",
    )
    ap.add_argument("--tail-read", default=None, choices=TAIL_READS,
                    help="when the lowering reads each conv's next cache (layers.TAIL_READ; default: its entry)")
    ap.add_argument("--split-height", type=int, default=1, metavar="N",
                    help="split height over the first N devices (per-device figures; the kernels decode compiles "
                         "for such an input, which read new caches as slices)")
    ap.add_argument("--kind", default="decode", choices=["decode", "encode"],
                    help="the decoder's kernels (input --latent) or the encoder's (input --video)")
    ap.add_argument("--video", default="49x480x720", help="T x H x W of the video, for --kind encode")
    ap.add_argument("--target", default=None, metavar="NAME|FILE",
                    help="compile for this GPU instead of the local backend (deviceless; bench/gpu_targets/NAME.txtpb"
                         " or a target-config file; needs the jax CUDA plugin)")
    ap.add_argument("--autotune-results", default=None, metavar="FILE",
                    help="with --target: conv autotuning results a GPU wrote (bench/gpu_run.sh, step autotune), so the"
                         " deviceless compile uses that card's algorithms and workspaces; pair it with the"
                         " gpu_target_config.pbtxt the same step wrote, as --target")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args()
    if a.autotune_results and not a.target:
        ap.error("--autotune-results needs --target")
    if a.autotune_results and not Path(a.autotune_results).is_file():
        ap.error(f"--autotune-results {a.autotune_results}: no such file")
    if a.autotune_results and target_backend(a.target) != "gpu":
        ap.error("--autotune-results: GPU targets only")
    config: VAEConfig = PRESETS[a.preset]
    target = target_devices(a.target) if a.target else None
    if target and a.split_height > 1:
        ap.error("--target compiles for one device: leave out --split-height")
    backend = target_backend(a.target) if target else jax.default_backend()
    dtype = jnp.dtype(a.dtype) if a.dtype else jnp.dtype(default_compute_dtype(backend))
    impl = a.impl or conv3d_impl(backend)
    if a.tail_read:
        if a.tail_read == "chunks" and not impl.startswith("2d_concat"):
            ap.error(f"--tail-read chunks needs a 2d_concat lowering, not {impl}")
        TAIL_READ[impl] = a.tail_read  # before anything is traced
    n_dev = a.split_height
    if n_dev > len(jax.devices()):
        ap.error(f"--split-height {n_dev}: only {len(jax.devices())} devices")
    # The kernels' static lowering argument, (impl, tail read): what decode uses for this input.
    key = (impl, a.tail_read) if a.tail_read else lowering(impl, partitioned=n_dev > 1, backend=backend)
    kernels = [k for k in a.kernels.split(",") if k]
    if set(kernels) - {"first", "scan", "fused", "step"}:
        ap.error(f"--kernels: unknown {sorted(set(kernels) - {'first', 'scan', 'fused', 'step'})}")
    variants = [parse_variant(v) for v in (a.variant or ["default"])]
    kind = a.kind
    t, h, w = (int(v) for v in (a.latent if kind == "decode" else a.video).lower().split("x"))
    # what decode/encode pass their kernels: the decoder's (or encoder's) side of the model
    graphdef, state = V.kernel_split(abstract_model(config, dtype=dtype, param_dtype=dtype), kind)
    frames = V.LATENT_FRAMES_BATCH if kind == "decode" else V.SAMPLE_FRAMES_BATCH
    batches = V.frame_batches(t, frames)
    s0, e0 = batches[0]
    c = config.latent_channels if kind == "decode" else config.in_channels
    split = rep = None
    if target:  # every value on the one compile-only device
        rep = split = jax.sharding.SingleDeviceSharding(target[0])
    elif n_dev > 1:  # weights on every device, every (B, T, H, W, C) value split in height
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("h",))
        split = video_sharding(mesh, height="h")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if rep is not None:
        state = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep), state)
    first_in = jax.ShapeDtypeStruct((1, e0 - s0, h, w, c), dtype, sharding=split)
    device = f"{target[0].device_kind} (deviceless compile, jax {jax.__version__})" if target else str(jax.devices()[0])
    scan_opts = V.kernel_compiler_options(backend, "scan", check=not target)
    report: dict = {"device": device, "backend": backend, "target": a.target, "jax": jax.__version__,
                    "autotune_results": a.autotune_results,
                    "preset": a.preset, "kind": kind,
                    ("latent" if kind == "decode" else "video"): [t, h, w], "dtype": dtype.name, "conv_impl": impl,
                    "tail_read": key[1], "params_bytes": _nbytes(state),
                    "first_compiler_options": V.kernel_compiler_options(backend, "first", check=not target),
                    "scan_compiler_options": scan_opts, "variants": {}}
    _, cache = jax.eval_shape(lambda s, z: V._first_fn(kind, key, graphdef, s, z, None), state, first_in)
    report["cache_bytes"] = _nbytes(cache)
    report["split_height"] = n_dev
    if split is not None:
        cache = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split), cache)
    k = V.make_kernels(backend, check=False) if target else V.kernels()
    lowered = {}
    with conv_impl_scope(key):
        if "first" in kernels:
            lowered["first"] = k["first"].lower(kind, key, graphdef, state, first_in, None)
        if len(batches) > 1:  # the other kernels need a scanned batch
            n = len(batches) - 1
            xs_sharding = split if target or split is None else \
                jax.sharding.NamedSharding(split.mesh, jax.sharding.PartitionSpec(None, *split.spec))
            xs = jax.ShapeDtypeStruct((n, 1, frames, h, w, c), dtype, sharding=xs_sharding)
            report["scan_iterations"] = n
            if "scan" in kernels:
                lowered["scan"] = k["scan"].lower(kind, key, graphdef, state, xs, cache, None)
            if "fused" in kernels:
                fused = jax.jit(_fused_fn, static_argnums=(0, 1, 2), compiler_options=scan_opts or None)
                lowered["fused"] = fused.lower(kind, key, graphdef, state, first_in, xs)
            if "step" in kernels:
                step = jax.jit(_step_fn, static_argnums=(0, 1, 2), donate_argnums=(5,), compiler_options=scan_opts or None)
                x1 = jax.ShapeDtypeStruct(xs.shape[1:], dtype, sharding=split)
                lowered["step"] = step.lower(kind, key, graphdef, state, x1, cache)
    gib = 1 << 30
    print(f"{report['device']}  {a.preset}  {kind} of {'latents' if kind == 'decode' else 'video'} {t}x{h}x{w}"
          f"  {dtype.name}  conv lowering {impl}"
          f" (new caches read: {key[1]})" + (f"  height split over {n_dev} devices: per-device figures" if n_dev > 1 else ""))
    print(f"  parameters {report['params_bytes'] / gib:.2f} GiB, conv caches {report['cache_bytes'] / gib:.2f} GiB;"
          f" XLA options: first {report['first_compiler_options']}, scan {report['scan_compiler_options']}")

    def write():  # after every kernel: a run cut short (a step timeout of bench/gpu_run.sh) keeps what it compiled
        if "default" in report["variants"]:  # the layout earlier runs wrote (bench/results/*memory*.json)
            kernels_default = report["variants"]["default"].items()
            report.update({n: v for n, v in kernels_default if n in ("first", "scan", "fused", "step")})
        if a.json:
            tmp = Path(a.json).with_name(f".{Path(a.json).name}.tmp")
            tmp.write_text(json.dumps(report, indent=2))
            os.replace(tmp, a.json)

    for vname, opts in variants:
        out = report["variants"][vname] = {"xla_options": opts}
        for name, low in lowered.items():
            tic = time.perf_counter()
            try:
                m = low.compile(compiler_options=opts or None).memory_analysis()
            except Exception as e:  # an option this jaxlib does not know: report it, go on with the next
                out[name] = {"error": str(e).splitlines()[0][:200]}
                print(f"  {vname:12s} {name:5s} failed: {out[name]['error']}")
                write()
                continue
            r = {"temp_bytes": m.temp_size_in_bytes, "output_bytes": m.output_size_in_bytes,
                 "argument_bytes": m.argument_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
                 "compile_s": time.perf_counter() - tic}
            # Everything the kernel holds while it runs: donated arguments share their outputs' buffers.
            r["total_bytes"] = r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
            out[name] = r
            print(f"  {vname:12s} {name:5s} temporaries {r['temp_bytes'] / gib:6.2f} GiB  outputs {r['output_bytes'] / gib:6.2f} GiB"
                  f"  arguments {r['argument_bytes'] / gib:6.2f} GiB  aliased {r['alias_bytes'] / gib:5.2f} GiB"
                  f"  total {r['total_bytes'] / gib:6.2f} GiB  (compiled in {r['compile_s']:.1f} s)", flush=True)
            write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
