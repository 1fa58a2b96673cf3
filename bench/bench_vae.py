#!/usr/bin/env python
"""Encode/decode speed of cogvae against diffusers (eager PyTorch) on the same device, same run.

Both models get the same random weights: diffusers' ``AutoencoderKLCogVideoX`` is created with
``torch.manual_seed(0)``, saved with ``save_pretrained``, and cogvae loads that folder through its
own mapping (``cogvae.converter.load``). Both see the same random inputs.

Every (framework, op) runs in a fresh worker process so that peak device memory and the first
call (compile included) are measured in isolation. Reported per op: first-call time, median of
``--repeats`` timed calls after the first, peak device memory, and the max abs difference between
the two outputs. A table is printed at the end and JSON is written to ``--json``.

    python bench/bench_vae.py --small          # small config on CPU, fp32, < 1 minute
    python bench/bench_vae.py                  # full size on GPU, bf16: 2b scale and 1.5 scale
    python bench/bench_vae.py --scales 2b --ops decode,encode
    python bench/bench_vae.py --small --compilation-cache /tmp/cc   # + first call with a filled cache

Layouts: diffusers (B, C, T, H, W); cogvae (B, T, H, W, C).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALES = {
    # name: (latent frames, latent h, latent w) -> video (4t-3, 8h, 8w)
    "small": dict(latents=(3, 8, 12), video=(9, 64, 96)),
    "2b": dict(latents=(13, 60, 90), video=(49, 480, 720)),
    "1.5": dict(latents=(21, 96, 170), video=(81, 768, 1360)),
}
SMALL_CONFIG = dict(
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
)


# ------------------------------------------------------------------------------ preparation
def prepare(workdir: Path, small: bool, scales: list[str]) -> None:
    """Weights and inputs in ``workdir``; what an earlier run left there is reused (gpu_run.sh's
    steps share one workdir: a --skip-torch step then imports neither torch nor diffusers)."""
    import numpy as np

    vae_dir = workdir / "vae"
    if not (vae_dir / "config.json").exists():
        import torch
        from diffusers import AutoencoderKLCogVideoX

        torch.manual_seed(0)
        model = AutoencoderKLCogVideoX(**(SMALL_CONFIG if small else {}))
        model.save_pretrained(vae_dir, safe_serialization=True)
    rng = np.random.default_rng(0)
    for scale in scales:
        t, h, w = SCALES[scale]["latents"]
        T, H, W = SCALES[scale]["video"]
        for name, make in ((f"latents_{scale}.npy", lambda: rng.standard_normal((1, 16, t, h, w), dtype=np.float32)),
                           (f"video_{scale}.npy", lambda: rng.uniform(-1, 1, (1, 3, T, H, W)).astype(np.float32))):
            if not (workdir / name).exists():  # written whole or not at all: a killed run leaves no half file
                with open(workdir / f".{name}", "wb") as f:
                    np.save(f, make())
                os.replace(workdir / f".{name}", workdir / name)


# ------------------------------------------------------------------------------ workers
def _timed(fn, sync, repeats):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    return out, first, times


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.backends.cudnn.benchmark = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    vae = AutoencoderKLCogVideoX.from_pretrained(args.workdir / "vae", torch_dtype=dtype).to(dev).eval()
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    results = {}
    for op in args.ops:
        if op in REFERENCE_OP:
            continue  # diffusers has one tiled decode; the jax tiled ops are compared against decode_tiled
        if op == "decode_tiled":
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        src = "video" if op == "encode" else "latents"
        x = torch.from_numpy(np.load(args.workdir / f"{src}_{args.scale}.npy")).to(dev, dtype)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            if op == "encode":
                out, first, times = _timed(lambda: vae.encode(x).latent_dist.mean, sync, args.repeats)
            else:
                out, first, times = _timed(lambda: vae.decode(x).sample, sync, args.repeats)
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        np.save(args.workdir / f"out_torch_{op}_{args.scale}.npy", out.float().cpu().numpy())
        results[op] = dict(first_s=first, times_s=times, peak_bytes=peak, device=device_name)
        del out, x
    return results


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cogvae.converter import load
    from cogvae.model import enable_compilation_cache
    from cogvae.model import vae as vae_mod
    from cogvae.model.layers import conv3d_impl

    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    if args.tail_read:  # an experiment (bench/pick_lever.py): when the lowering reads new conv caches
        from cogvae.model import layers

        layers.TAIL_READ[conv3d_impl()] = args.tail_read
    vae = load(args.workdir / "vae", dtype=args.dtype, compute_dtype=args.dtype)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    dev = jax.devices()[0]

    def sync(o):
        jax.block_until_ready(o)

    results = {}
    for op in args.ops:  # the orchestrator passes one op per jax worker: isolated peaks
        if op.startswith("decode_tiled"):
            # decode_tiled: edge tiles padded to one compiled shape; _exact: each tile at its own size,
            # equal-shaped edge tiles stacked along the batch axis; _exact_unstacked: one tile at a time
            vae.enable_tiling(pad_tiles=op == "decode_tiled", batch_tiles=op != "decode_tiled_exact_unstacked")
        else:
            vae.disable_tiling()
        src = "video" if op == "encode" else "latents"
        x = jnp.asarray(np.load(args.workdir / f"{src}_{args.scale}.npy").transpose(0, 2, 3, 4, 1), dtype)
        if op == "encode":
            out, first, times = _timed(lambda: vae.encode(x)[0], sync, args.repeats)
        else:
            out, first, times = _timed(lambda: vae.decode(x), sync, args.repeats)
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        if peak is None:  # CPU: no device allocator statistics; report the process peak RSS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        np.save(
            args.workdir / f"out_jax_{op}_{args.scale}.npy",
            np.asarray(out.astype(jnp.float32)).transpose(0, 4, 1, 2, 3),
        )
        results[op] = dict(
            first_s=first,
            times_s=times,
            peak_bytes=peak,
            device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            conv_impl=conv3d_impl(),
            xla_flags=os.environ.get("XLA_FLAGS", ""),
            tail_read=args.tail_read,
            # The options the kernels set themselves (they win over XLA_FLAGS), for the record.
            kernel_compiler_options={k: vae_mod.kernel_compiler_options(jax.default_backend(), k) for k in ("first", "scan")},
        )
        del out, x
    return results


def run_worker(framework: str, scale: str, ops: list[str], args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", framework, "--scale", scale, "--ops", ",".join(ops),
        "--workdir", str(args.workdir), "--dtype", args.dtype,
        "--repeats", str(args.repeats if scale != "1.5" else max(1, args.repeats - 1)),
    ]
    if framework == "jax" and args.tail_read:
        cmd += ["--tail-read", args.tail_read]
    if framework == "jax" and args.compilation_cache:
        # One folder per (scale, op): an op's cold first call never finds another op's kernels.
        cmd += ["--compilation-cache", str(args.compilation_cache / scale / "_".join(ops))]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return {op: dict(error=f"worker failed (exit {proc.returncode})") for op in ops}
    print(f"  {framework:5s} {scale:5s} {','.join(ops):24s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
# the diffusers run a jax op is compared with
REFERENCE_OP = {"decode_tiled_exact": "decode_tiled", "decode_tiled_exact_unstacked": "decode_tiled"}

def _gib(b):
    return None if b is None else b / 2**30


def summarise(raw: dict, workdir: Path) -> list[dict]:
    import numpy as np

    rows = []
    for scale, per_fw in raw.items():
        for op in per_fw.get("jax", {}):
            j = per_fw["jax"][op]
            ref_op = REFERENCE_OP.get(op, op)
            t = per_fw.get("torch", {}).get(ref_op, {})
            row = dict(scale=scale, op=op)
            for name, r in (("diffusers", t), ("cogvae", j)):
                if "times_s" in r:
                    row[f"{name}_median_s"] = statistics.median(r["times_s"])
                    row[f"{name}_first_s"] = r["first_s"]
                    row[f"{name}_peak_gib"] = _gib(r["peak_bytes"])
                    if r.get("cached_first_s") is not None:
                        row[f"{name}_cached_first_s"] = r["cached_first_s"]
                    row["device"] = r.get("device")
                elif r:
                    row[f"{name}_error"] = r.get("error")
            if "conv_impl" in j:
                row["conv_impl"] = j["conv_impl"]
            if "diffusers_median_s" in row and "cogvae_median_s" in row:
                row["speedup"] = row["diffusers_median_s"] / row["cogvae_median_s"]
                a = np.load(workdir / f"out_torch_{ref_op}_{scale}.npy")
                b = np.load(workdir / f"out_jax_{op}_{scale}.npy")
                row["max_abs_diff"] = float(np.abs(a - b).max()) if a.shape == b.shape else f"shape {a.shape} vs {b.shape}"
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    def f(v, spec):  # a missing value as "-", in its column's width (the table stays aligned)
        if isinstance(v, (int, float)):
            return format(v, spec)
        return str(v if v is not None else "-").rjust(int(spec.split(".")[0] or 0))

    head = f"{'scale':6s} {'op':18s} {'diffusers s':>11s} {'cogvae s':>9s} {'speedup':>8s} {'first s':>8s} " \
           f"{'diff GiB':>9s} {'cogvae GiB':>10s} {'max|diff|':>10s}"
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['scale']:6s} {r['op']:18s} {f(r.get('diffusers_median_s'), '11.3f')} {f(r.get('cogvae_median_s'), '9.3f')} "
            f"{f(r.get('speedup'), '7.2f')}x {f(r.get('cogvae_first_s'), '8.1f')} {f(r.get('diffusers_peak_gib'), '9.2f')} "
            f"{f(r.get('cogvae_peak_gib'), '10.2f')} {f(r.get('max_abs_diff'), '10.3e')}"
        )
    cached = [r for r in rows if "cogvae_cached_first_s" in r]
    for r in cached:
        print(f"{r['scale']:6s} {r['op']:18s} first call in a new process with the compilation cache: "
              f"{r['cogvae_cached_first_s']:.1f} s (without: {r['cogvae_first_s']:.1f} s)")
    if rows:
        print(f"device: {rows[0].get('device')}  conv lowering: {rows[0].get('conv_impl')}")


def main() -> None:
    from cogvae.model.layers import TAIL_READS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small config on CPU in fp32 (< 1 minute)")
    p.add_argument("--scales", default=None, help="comma list of 2b,1.5 (default both; 'small' with --small)")
    p.add_argument("--ops", default="decode,encode,decode_tiled,decode_tiled_exact",
                   help="decode_tiled pads edge tiles to one compiled shape; decode_tiled_exact runs them unpadded, "
                        "equal-shaped ones stacked; decode_tiled_exact_unstacked runs them unpadded one at a time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16, fp32 with --small)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_vae.json"))
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--compilation-cache", type=Path, default=None, metavar="DIR",
                   help="cogvae workers use this persistent compilation cache (enable_compilation_cache), and "
                        "each op runs once more in a new process to time its first call with the cache filled")
    p.add_argument("--tail-read", default=None, choices=TAIL_READS,
                   help="experiment: override layers.TAIL_READ for the lowering in use (default: its entry)")
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--scale", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    args.ops = args.ops.split(",")

    if args.worker:
        out = worker_torch(args) if args.worker == "torch" else worker_jax(args)
        print(json.dumps(out))
        return

    if args.compilation_cache and args.compilation_cache.is_dir() and any(args.compilation_cache.iterdir()):
        print(f"note: {args.compilation_cache} is not empty: the 'first s' column may already use cached kernels")
    scales = (args.scales or ("small" if args.small else "2b,1.5")).split(",")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cogvae-bench-")
        args.workdir = Path(tmp.name)
    t0 = time.perf_counter()
    prepare(args.workdir, args.small, scales)
    print(f"prepared weights and inputs in {time.perf_counter() - t0:.1f} s ({args.workdir})", flush=True)
    raw: dict = {}
    for scale in scales:
        # 1.5 scale: diffusers takes 5-15 s a call there; skip tiling (no target) and time fewer calls.
        ops = args.ops if scale != "1.5" else [o for o in args.ops if not o.startswith("decode_tiled")]
        raw[scale] = {"jax": {}, "torch": {}}
        if not args.skip_torch:
            raw[scale]["torch"] = run_worker("torch", scale, ops, args)
        write_json(raw, args)
        for op in ops:
            raw[scale]["jax"].update(run_worker("jax", scale, [op], args))
            if args.compilation_cache and "first_s" in raw[scale]["jax"].get(op, {}):
                # A second fresh process finds the kernels the first one wrote to the cache: its
                # first call is what a user pays after the first run on this machine.
                again = run_worker("jax", scale, [op], args).get(op, {})
                raw[scale]["jax"][op]["cached_first_s"] = again.get("first_s")
            write_json(raw, args)
        # The table after every scale; the JSON after every worker, so a run cut short (a timeout of
        # bench/gpu_run.sh) still leaves the figures of the workers that finished.
        print_table(summarise(raw, args.workdir))
        print(f"JSON written to {args.json}", flush=True)


def write_json(raw: dict, args) -> None:
    rows = summarise(raw, args.workdir)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(dict(rows=rows, raw=raw, dtype=args.dtype, repeats=args.repeats), indent=2))
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
