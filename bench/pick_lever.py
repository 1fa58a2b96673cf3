#!/usr/bin/env python
"""Pick the memory lever the GPU sweep found best, for an end-to-end check in the same call.

Reads the JSON files ``bench/gpu_run.sh``'s ``sweep`` step wrote (``bench/bench_memory.py``: XLA's
compile-time total of the 2b decode scan under each lever) and prints a line of environment
assignments and a line of arguments for ``bench/bench_vae.py``, e.g.

    COGVAE_CONV_IMPL=2d_concat_chunked XLA_FLAGS=--xla_gpu_autotune_level=0
    --tail-read slice

Only the levers ``decode`` can use without a code change count: a conv lowering, when it reads
new caches (``--tail-read``) and XLA options (as ``XLA_FLAGS``); the ``fused`` and ``step``
experiments are reported, not picked, and so is a variant of an XLA option the kernels set
themselves (``vae.KERNEL_COMPILER_OPTIONS``), which wins over ``XLA_FLAGS`` end to end. The default is the GPU's conv
lowering with its own tail read (``layers._AUTO_IMPL``, ``layers.TAIL_READ``) and no extra
options; prints nothing (exit 1) when no lever beats it by ``--min-gain`` GiB.

    python bench/pick_lever.py OUT_DIR [--min-gain 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cogvae.model.layers import _AUTO_IMPL, tail_read
from cogvae.model.vae import kernel_compiler_options

GIB = 1 << 30
# The XLA options the GPU kernels are compiled with (vae.KERNEL_COMPILER_OPTIONS): XLA_FLAGS cannot change them.
KERNEL_OPTIONS = {k for kernel in ("first", "scan") for k in kernel_compiler_options("gpu", kernel, check=False)}


def candidates(out: Path):
    """(label, scan total bytes, env dict, bench_vae args) for every lever the sweep compiled."""
    for f in sorted(out.glob("sweep_*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"  {f.name}: unreadable ({e}), left out", file=sys.stderr)
            continue
        impl, read = d["conv_impl"], d.get("tail_read")
        for vname, v in d.get("variants", {}).items():
            scan = v.get("scan", {})
            if "total_bytes" not in scan:
                continue
            env = {"COGVAE_CONV_IMPL": impl}
            opts = v.get("xla_options") or {}
            own = sorted(set(opts) & set(KERNEL_OPTIONS))
            if own:  # the kernels' own option wins over XLA_FLAGS: an end-to-end run would measure the default
                print(f"  {f'{impl}/{read}/{vname}':40s} scan total {scan['total_bytes'] / GIB:6.2f} GiB"
                      f"  (not picked: the kernels set {', '.join(own)} themselves)", file=sys.stderr)
                continue
            if opts:
                env["XLA_FLAGS"] = " ".join(f"--{k}={str(x).lower() if isinstance(x, bool) else x}" for k, x in opts.items())
            yield f"{impl}/{read}/{vname}", scan["total_bytes"], env, ["--tail-read", read] if read else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the folder with the sweep's JSON files")
    ap.add_argument("--min-gain", type=float, default=0.5, help="GiB below the default's scan total")
    a = ap.parse_args()
    rows = list(candidates(a.out))
    if not rows:
        print(f"no sweep results in {a.out}", file=sys.stderr)
        return 1
    for label, total, _, _ in sorted(rows, key=lambda r: r[1]):
        print(f"  {label:40s} scan total {total / GIB:6.2f} GiB", file=sys.stderr)
    impl = _AUTO_IMPL["gpu"]
    defaults = [t for label, t, _, _ in rows if label == f"{impl}/{tail_read(impl, 'gpu')}/default"]
    best = min(rows, key=lambda r: r[1])
    if not defaults or best[1] > min(defaults) - a.min_gain * GIB:
        print("no lever beats the default by the margin", file=sys.stderr)
        return 1
    label, total, env, args = best
    print(f"picked {label}: {total / GIB:.2f} GiB against {min(defaults) / GIB:.2f} GiB", file=sys.stderr)
    # XLA_FLAGS may hold several options: quote it for the shell that evaluates this line.
    print(" ".join(f"{k}={json.dumps(v) if ' ' in v else v}" for k, v in env.items()))
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
