#!/usr/bin/env python
"""Speed of one fine-tuning step of the decoder: cogvae (JAX) against diffusers (PyTorch autograd),
same device, same weights, same inputs, same run.

The step is what a decoder fine-tune does each iteration: decode latents, the mean squared error
against a target video, and the gradient of it with respect to every parameter (the encoder's are
zero). diffusers: ``loss.backward()`` on ``AutoencoderKLCogVideoX`` in train mode, in bf16 under
``torch.autocast`` on a GPU (fp32 parameters); cogvae: ``nnx.value_and_grad`` inside ``nnx.jit``,
fp32 parameters and bf16 compute on a GPU. On a CPU both run in fp32. Each mode runs with gradient
checkpointing off and on (``enable_gradient_checkpointing()``, diffusers' name on both sides).

Both models get the same random weights: diffusers' model is created with ``torch.manual_seed(0)``
and saved with ``save_pretrained``; cogvae loads that folder through its own mapping, and its
gradients are mapped back to diffusers' names through the same table (``export_tensors``) to be
compared tensor by tensor. Every (framework, mode) runs in a fresh process, so peak memory and the
first call (compile included) are its own.

    python bench/bench_train.py --small        # small config on CPU, fp32, about a minute
    python bench/bench_train.py                # 2b architecture on a GPU: 5x30x45 latents -> 17x240x360

Reported per mode: median step time over ``--repeats`` steps after the first, the first step
(compile included), peak device memory (peak RSS on a CPU), the loss difference, and the worst
and median relative L2 difference of a parameter's gradient (over every parameter with --small;
over the first and last ``SUBSET`` parameters otherwise; in bf16 only indicative, see ``compare``). A table is printed and JSON written to ``--json``.
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

from bench_vae import SMALL_CONFIG, _timed

SCALES = {"small": (3, 8, 12), "2b": (5, 30, 45)}  # latent frames, height, width
MODES = ("off", "on")  # gradient checkpointing
SUBSET = 8


def prepare(workdir: Path, small: bool, scale: str) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLCogVideoX

    vae_dir = workdir / "vae"
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKLCogVideoX(**(SMALL_CONFIG if small else {})).save_pretrained(vae_dir, safe_serialization=True)
    t, h, w = SCALES[scale]
    rng = np.random.default_rng(0)
    np.save(workdir / "latents.npy", rng.standard_normal((1, 16, t, h, w), dtype=np.float32))
    np.save(workdir / "target.npy", rng.uniform(-1, 1, (1, 3, 4 * t - 3, 8 * h, 8 * w)).astype(np.float32))


def _trained(name: str) -> bool:
    """A parameter the decode's loss reaches (diffusers' name): torch gives only these a gradient,
    the jax gradient has every parameter (zeros for the encoder), so both keep only these before
    taking a subset, or the two subsets would hold different parameters."""
    return name.startswith(("decoder.", "post_quant_conv."))


def _kept(names: list[str], small: bool) -> list[str]:
    names = sorted(n for n in names if _trained(n))
    return names if small or len(names) <= 2 * SUBSET else names[:SUBSET] + names[-SUBSET:]


def worker_torch(args) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLCogVideoX

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKLCogVideoX.from_pretrained(args.workdir / "vae").to(dev).train()  # fp32 parameters
    if args.mode == "on":
        vae.enable_gradient_checkpointing()
    z = torch.from_numpy(np.load(args.workdir / "latents.npy")).to(dev)
    target = torch.from_numpy(np.load(args.workdir / "target.npy")).to(dev)
    bf16 = args.dtype == "bfloat16"

    def step():
        vae.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = vae.decode(z).sample
        loss = ((out.float() - target) ** 2).mean()
        loss.backward()
        return loss

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss, first, times = _timed(step, sync, args.repeats)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = {k: p.grad for k, p in vae.named_parameters() if p.grad is not None}
    keep = _kept(list(grads), args.small)
    np.savez(args.workdir / f"grads_torch_{args.mode}.npz", **{k: grads[k].float().cpu().numpy() for k in keep})
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(first_s=first, times_s=times, peak_bytes=peak, loss=float(loss), device=name)


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cogvae.converter import load
    from cogvae.converter.engine import export_tensors, state_to_flat_dict
    from cogvae.converter.mapping import load_mapping

    vae = load(args.workdir / "vae", dtype="float32", compute_dtype=args.dtype)  # fp32 parameters
    if args.mode == "on":
        vae.enable_gradient_checkpointing()
    z = jnp.asarray(np.load(args.workdir / "latents.npy").transpose(0, 2, 3, 4, 1))
    target = jnp.asarray(np.load(args.workdir / "target.npy").transpose(0, 2, 3, 4, 1))

    @nnx.jit
    def step(vae, z, target):
        def loss_fn(m):
            return jnp.mean((m.decode(z).astype(jnp.float32) - target) ** 2)

        return nnx.value_and_grad(loss_fn)(vae)

    (loss, grads), first, times = _timed(lambda: step(vae, z, target), jax.block_until_ready, args.repeats)
    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    if peak is None:  # CPU: no device allocator statistics; the process peak RSS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    named = export_tensors(state_to_flat_dict(nnx.state(grads, nnx.Param)), load_mapping())  # diffusers' names
    keep = _kept(list(named), args.small)
    np.savez(args.workdir / f"grads_jax_{args.mode}.npz", **{k: np.asarray(named[k], np.float32) for k in keep})
    return dict(first_s=first, times_s=times, peak_bytes=peak, loss=float(loss),
                device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}")


def run_worker(framework: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--mode", mode, "--workdir", str(args.workdir),
           "--dtype", args.dtype, "--repeats", str(args.repeats)] + (["--small"] if args.small else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return dict(error=f"worker failed (exit {proc.returncode})")
    print(f"  {framework:5s} checkpointing {mode:3s} {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(workdir: Path, mode: str) -> dict:
    """Relative L2 differences of the parameters' gradients: the worst (and its parameter) and the
    median. In fp32 they are rounding; in bf16 the two frameworks round at other points, and a
    bias or norm gradient (a sum over every position) can differ by tens of percent."""
    import numpy as np

    a, b = np.load(workdir / f"grads_torch_{mode}.npz"), np.load(workdir / f"grads_jax_{mode}.npz")
    common = sorted(set(a.files) & set(b.files))
    if not common:
        return dict(grad_compare_error=f"no parameter in both gradient files ({len(a.files)} torch, {len(b.files)} jax)")
    rel = {}
    for k in common:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        rel[k] = float(np.linalg.norm(x - y) / max(float(np.linalg.norm(x)), 1e-30))
    key = max(rel, key=rel.get)
    return dict(worst_grad_rel_l2=rel[key], worst_grad_key=key, median_grad_rel_l2=statistics.median(rel.values()),
                grads_compared=len(common), grads_in_one_file_only=len(set(a.files) ^ set(b.files)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small config on CPU in fp32")
    p.add_argument("--modes", default=",".join(MODES), help="gradient checkpointing: off, on, or off,on (the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 compute (default: bf16, fp32 with --small)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_train.json"))
    p.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes {args.modes!r}: a comma list of {', '.join(MODES)}")
    if args.worker:
        print(json.dumps(worker_torch(args) if args.worker == "torch" else worker_jax(args)))
        return

    scale = "small" if args.small else "2b"
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cogvae-bench-train-")
        args.workdir = Path(tmp.name)
    prepare(args.workdir, args.small, scale)
    t, h, w = SCALES[scale]
    rows = []
    for mode in modes:
        ref, ours = run_worker("torch", mode, args), run_worker("jax", mode, args)
        row = dict(scale=scale, latents=f"{t}x{h}x{w}", checkpointing=mode, dtype=args.dtype)
        for name, r in (("diffusers", ref), ("cogvae", ours)):
            if "error" in r:
                row[f"{name}_error"] = r["error"]
                continue
            row.update({f"{name}_median_s": statistics.median(r["times_s"]), f"{name}_first_s": r["first_s"],
                        f"{name}_peak_gib": r["peak_bytes"] / 2**30, f"{name}_loss": r["loss"]})
            row["device"] = r["device"]
        if "diffusers_median_s" in row and "cogvae_median_s" in row:
            row["speedup"] = row["diffusers_median_s"] / row["cogvae_median_s"]
            row["loss_abs_diff"] = abs(row["diffusers_loss"] - row["cogvae_loss"])
            row.update(compare(args.workdir, mode))
        rows.append(row)
        # After every mode, so a run cut short (a timeout of bench/gpu_run.sh) keeps the finished ones.
        partial = args.json.with_name(f".{args.json.name}.tmp")  # not `tmp`: that holds the workdir alive
        partial.write_text(json.dumps(dict(rows=rows, repeats=args.repeats), indent=2))
        os.replace(partial, args.json)

    def f(v, spec):  # a missing value as "-", in its column's width (the table stays aligned)
        if isinstance(v, (int, float)):
            return format(v, spec)
        return str(v if v is not None else "-").rjust(int(spec.split(".")[0] or 0))

    head = (f"{'scale':6s} {'ckpt':4s} {'diffusers s':>11s} {'cogvae s':>9s} {'speedup':>8s} {'first s':>8s} "
            f"{'diff GiB':>9s} {'cogvae GiB':>10s} {'|loss diff|':>11s} {'grad rel worst / median':>23s}")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scale']:6s} {r['checkpointing']:4s} {f(r.get('diffusers_median_s'), '11.3f')} "
              f"{f(r.get('cogvae_median_s'), '9.3f')} {f(r.get('speedup'), '7.2f')}x {f(r.get('cogvae_first_s'), '8.1f')} "
              f"{f(r.get('diffusers_peak_gib'), '9.2f')} {f(r.get('cogvae_peak_gib'), '10.2f')} "
              f"{f(r.get('loss_abs_diff'), '11.2e')} {f(r.get('worst_grad_rel_l2'), '11.2e')} / "
              f"{f(r.get('median_grad_rel_l2'), '9.2e')}")
    if rows:
        print(f"device: {rows[0].get('device')}  latents {rows[0]['latents']}  compute {args.dtype}  "
              f"(peak: {'process RSS' if 'cpu' in str(rows[0].get('device', 'cpu')) else 'device memory'})")
    print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
