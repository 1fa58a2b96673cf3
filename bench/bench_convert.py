"""Conversion benchmark for the full-size CogVideoX VAE architecture (~862 MB fp32).

Creates random full-size diffusers weights in a temp dir (diffusers' default
``AutoencoderKLCogVideoX()``, seed 0), then in the same run measures:

* a plain copy of the same safetensors bytes (``shutil.copyfile``), the baseline;
* ``cogvae-convert`` as a subprocess, per format and both, with ``--no-validate`` and with
  validation: wall time and the converter's own in-process time (``--json`` timings), and the
  peak RSS of the converting process (``ru_maxrss`` of the child, via ``os.wait4``).

Targets: conversion time at most 2x the copy time; peak RSS at most 1.5x the checkpoint size.
The process wall time includes starting Python and importing jax/flax/orbax (~2 s), a fixed
cost the copy does not pay; both figures are printed and the time target is judged on the
converter's in-process time (reading, converting, writing, hashing).

    python bench/bench_convert.py [--keep DIR] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_TARGET = 2.0
RSS_TARGET = 1.5


def make_full_size(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    with torch.no_grad():
        AutoencoderKLCogVideoX().save_pretrained(folder, safe_serialization=True)
    return folder / "diffusion_pytorch_model.safetensors"


def copy_time(src: Path, dst: Path, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        if dst.exists():
            dst.unlink()
        t = time.perf_counter()
        shutil.copyfile(src, dst)
        best = min(best, time.perf_counter() - t)
    dst.unlink()
    return best


def run_convert(src: Path, out: Path, args: list[str]) -> dict:
    exe = shutil.which("cogvae-convert") or sys.exit("cogvae-convert not installed (pip install -e .)")
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    p = subprocess.Popen([exe, str(src), "--out", str(out), "--json", "-q", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = "", ""
    # wait4 gives this child's own peak RSS (ru_maxrss, KiB on Linux)
    _, status, rusage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"cogvae-convert failed ({p.returncode}):\n{stderr}")
    summary = json.loads(stdout)
    return {"wall": wall, "inproc": summary["timings"]["total"], "timings": summary["timings"],
            "rss": rusage.ru_maxrss * 1024, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp dir, removed)")
    ap.add_argument("--runs", type=int, default=2, help="copy runs (best of)")
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
        print(f"checkpoint: {weights} ({size / 1e6:.1f} MB)")
        base = copy_time(weights, work / "copy.safetensors", a.runs)
        print(f"plain copy (shutil.copyfile): {base:.2f} s\n")
        cases = [
            ("msgpack --no-validate", ["--format", "msgpack", "--no-validate"]),
            ("orbax --no-validate", ["--format", "orbax", "--no-validate"]),
            ("both --no-validate", ["--format", "both", "--no-validate"]),
            ("both, validated", ["--format", "both"]),
        ]
        fails = 0
        print(f"{'case':24s} {'wall s':>7s} {'x copy':>7s} {'conv s':>7s} {'x copy':>7s} {'peak RSS MB':>12s} "
              f"{'x size':>7s}  result")
        for name, args in cases:
            r = run_convert(src, work / "ckpt", args)
            tr, rr = r["inproc"] / base, r["rss"] / size
            validated = "validated" in name
            ok_t = validated or tr <= TIME_TARGET
            ok_r = rr <= RSS_TARGET
            fails += not (ok_t and ok_r)
            verdict = ("PASS" if ok_t and ok_r else "FAIL") + ("" if not validated else " (time target n/a)")
            print(f"{name:24s} {r['wall']:7.2f} {r['wall'] / base:7.2f} {r['inproc']:7.2f} {tr:7.2f} "
                  f"{r['rss'] / 1e6:12.0f} {rr:7.2f}  {verdict}   {r['timings']}")
        print(f"\ntargets: converter time <= {TIME_TARGET}x copy (in-process, without-validation cases), "
              f"peak RSS <= {RSS_TARGET}x checkpoint size")
        return 1 if fails else 0
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
