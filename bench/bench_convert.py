"""Conversion benchmark for the full-size CogVideoX VAE architecture (~862 MB fp32).

Creates random full-size diffusers weights in a temp dir (diffusers' default
``AutoencoderKLCogVideoX()``, seed 0), then in the same run measures:

* a plain copy of the same safetensors bytes (``shutil.copyfile``, warm page cache): the baseline;
* for reference, a *checked, durable* copy: the copy plus sha256 of source and copy plus fsync,
  the work a converter that records input hashes and an integrity manifest must do at minimum;
* ``cogvae-convert`` as a subprocess, per format and both, with ``--no-validate`` and with
  validation (the default): wall time, the converter's own in-process time (``--json``
  timings) and the peak RSS of the converting process (``ru_maxrss`` of the child, ``os.wait4``);
* ``load`` of the written checkpoint in a fresh process, per format, as stored and with
  ``dtype=bfloat16``: its time, and the resident memory it adds to a process with jax up (peak,
  and kept once it returns).

Every figure is the best of ``--runs`` runs (the median is printed too): this 2-core VM's
first-touch page faults make single runs vary by 2x.

Targets: conversion time at most 2x the plain copy; peak RSS at most 1.5x the checkpoint size.
The process wall time includes starting Python and importing jax/flax/orbax (~2 s), a fixed
cost the copy does not pay; the time target is judged on the converter's in-process time
(reading, converting, writing, hashing) of the ``--no-validate`` cases. The RSS target is judged
on every case, the validated default included.

    python bench/bench_convert.py [--keep DIR] [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_TARGET = 2.0
RSS_TARGET = 1.5


def make_full_size(folder: Path) -> Path:
    # In a child process: a converter's ru_maxrss starts from this process's high-water mark (exec
    # keeps it), which the torch model would otherwise set, for every case alike.
    code = ("import sys, torch; from diffusers import AutoencoderKLCogVideoX; torch.manual_seed(0)\n"
            "with torch.no_grad(): AutoencoderKLCogVideoX().save_pretrained(sys.argv[1], safe_serialization=True)")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True)
    return folder / "diffusion_pytorch_model.safetensors"


def copy_time(src: Path, dst: Path, runs: int, checked: bool = False) -> list[float]:
    times = []
    for _ in range(runs):
        if dst.exists():
            dst.unlink()
        t = time.perf_counter()
        shutil.copyfile(src, dst)
        if checked:
            for p in (src, dst):
                with open(p, "rb") as f:
                    hashlib.file_digest(f, "sha256")
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        times.append(time.perf_counter() - t)
    dst.unlink()
    return times


def run_convert(src: Path, out: Path, args: list[str]) -> dict:
    # The console script of this interpreter's environment first (not another one's on PATH).
    own = Path(sys.executable).with_name("cogvae-convert")
    exe = str(own) if own.is_file() else shutil.which("cogvae-convert")
    if not exe:
        sys.exit("cogvae-convert not installed (pip install -e .)")
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    p = subprocess.Popen([exe, str(src), "--out", str(out), "--json", "-q", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux)
    _, status, rusage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"cogvae-convert failed ({p.returncode}):\n{stderr}")
    summary = json.loads(stdout)
    return {"wall": wall, "inproc": summary["timings"]["total"], "timings": summary["timings"],
            "rss": rusage.ru_maxrss * 1024}


LOAD_CODE = """
import json, sys, time
import jax
from cogvae.converter import load

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

jax.numpy.zeros(1).block_until_ready()  # the backend up: its memory is not the load's
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
t = time.perf_counter()
vae = load(sys.argv[1], format=sys.argv[2], dtype=sys.argv[3] or None)
jax.block_until_ready(vae)
wall = time.perf_counter() - t
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
end = rss()
del vae
print(json.dumps({"load_s": wall, "peak_bytes": hwm - base, "after_bytes": end - base}))
"""


def run_load(ckpt: Path, fmt: str, dtype: str) -> dict:
    """``load(ckpt)`` in a fresh process: its time, and the resident memory it adds (the peak, and
    what stays after it returns) over the process with jax already up (Linux /proc)."""
    p = subprocess.run([sys.executable, "-c", LOAD_CODE, str(ckpt), fmt, dtype], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if p.returncode != 0:
        sys.exit(f"load failed ({p.returncode}):\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir, removed)")
    ap.add_argument("--runs", type=int, default=3, help="runs per case (best of; median printed too)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    a = ap.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="cogvae-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "full"
        weights = src / "diffusion_pytorch_model.safetensors"
        if not weights.exists():
            print("creating random full-size diffusers weights ...", flush=True)
            make_full_size(src)
        size = weights.stat().st_size
        print(f"checkpoint: {weights} ({size / 1e6:.1f} MB), {os.cpu_count()} CPUs, best of {a.runs} runs")
        plain = copy_time(weights, work / "copy.safetensors", a.runs)
        checked = copy_time(weights, work / "copy.safetensors", a.runs, checked=True)
        base, base_checked = min(plain), min(checked)
        print(f"plain copy (shutil.copyfile): {base:.3f} s (median {statistics.median(plain):.3f})")
        print(f"checked durable copy (copy + sha256 of both + fsync): {base_checked:.3f} s "
              f"(median {statistics.median(checked):.3f})\n")
        cases = [
            ("msgpack --no-validate", ["--format", "msgpack", "--no-validate"]),
            ("orbax --no-validate", ["--format", "orbax", "--no-validate"]),
            ("both --no-validate", ["--format", "both", "--no-validate"]),
            ("both, validated (default)", ["--format", "both"]),
        ]
        fails = 0
        rows = []
        print(f"{'case':26s} {'wall s':>7s} {'conv s':>7s} {'x copy':>7s} {'x checked':>9s} {'peak RSS MB':>12s} "
              f"{'x size':>7s}  result")
        for name, args in cases:
            rs = [run_convert(src, work / "ckpt", args) for _ in range(a.runs)]
            best = min(rs, key=lambda r: r["inproc"])
            inproc, wall, rss = best["inproc"], min(r["wall"] for r in rs), max(r["rss"] for r in rs)
            tr, rr = inproc / base, rss / size
            validated = "validated" in name
            ok_t = validated or tr <= TIME_TARGET
            ok_r = rr <= RSS_TARGET
            fails += not (ok_t and ok_r)
            verdict = (("time ok" if ok_t else "time FAIL") if not validated else "time n/a") + \
                      (", rss ok" if ok_r else ", rss FAIL")
            print(f"{name:26s} {wall:7.2f} {inproc:7.2f} {tr:7.2f} {inproc / base_checked:9.2f} "
                  f"{rss / 1e6:12.0f} {rr:7.3f}  {verdict}")
            print(f"{'':26s} phases (best run): {best['timings']}; in-process median "
                  f"{statistics.median(r['inproc'] for r in rs):.2f} s")
            rows.append({"case": name, "wall_s": wall, "inproc_s": inproc, "x_copy": tr,
                         "x_checked_copy": inproc / base_checked, "peak_rss_bytes": rss, "x_size": rr,
                         "timings": best["timings"], "all_inproc_s": [r["inproc"] for r in rs],
                         "time_ok": ok_t, "rss_ok": ok_r})
        # load() of what the last case wrote (both formats): the memory a user's process pays
        print(f"\n{'load (CPU)':26s} {'load s':>7s} {'peak MB':>8s} {'x size':>7s} {'kept MB':>8s}  result")
        loads = []
        for fmt, dtype in (("orbax", ""), ("msgpack", ""), ("orbax", "bfloat16"), ("msgpack", "bfloat16")):
            rs = [run_load(work / "ckpt", fmt, dtype) for _ in range(a.runs)]
            peak = max(r["peak_bytes"] for r in rs)
            ok = peak / size <= RSS_TARGET
            fails += not ok
            name = f"{fmt}" + (f", dtype={dtype}" if dtype else "")
            print(f"{name:26s} {min(r['load_s'] for r in rs):7.2f} {peak / 1e6:8.0f} {peak / size:7.3f} "
                  f"{max(r['after_bytes'] for r in rs) / 1e6:8.0f}  {'rss ok' if ok else 'rss FAIL'}")
            loads.append({"case": name, "load_s": [r["load_s"] for r in rs], "peak_bytes": peak,
                          "x_size": peak / size, "kept_bytes": [r["after_bytes"] for r in rs], "rss_ok": ok})
        print(f"\ntargets: converter time <= {TIME_TARGET}x plain copy (in-process, --no-validate cases); "
              f"peak RSS <= {RSS_TARGET}x checkpoint size (every case, loads included: what load adds to a "
              "process with jax up; worst of the runs)")
        if a.json:
            a.json.write_text(json.dumps({"checkpoint_bytes": size, "cpus": os.cpu_count(), "runs": a.runs,
                                          "copy_s": plain, "checked_copy_s": checked, "cases": rows,
                                          "loads": loads}, indent=2))
        return 1 if fails else 0
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
