#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (its python3 has jax, flax, orbax, torch, but no
# diffusers): XLA's compile-time memory of the decode kernels first (seconds, no weights), then the
# full-size benchmark against diffusers eager in the same run. Results land in $OUT.
#
# Before the call, on this machine (the GPU machine has no network), fetch the reference wheels:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata zipp
# and run it with the device tool, carrying .whl:  bash bench/gpu_run.sh   (carry: [".whl"])
#
# BENCH_TIMEOUT bounds bench_vae.py (default 450 s); SCALES picks its scales (default 2b,1.5).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The package is used from the tree as `cogvae.*` without installing it (no network for its deps).
mkdir -p /tmp/cog/cogvae && for d in converter model mappings; do ln -sfn "$PWD/$d" "/tmp/cog/cogvae/$d"; done
export PYTHONPATH=/tmp/site:/tmp/cog XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -c "import cogvae.model, diffusers, jax; print('jax', jax.__version__, jax.devices(), 'diffusers', diffusers.__version__)" || exit 1
for impl in 2d_concat_chunked 3d; do
  timeout 60 python3 bench/bench_memory.py --latent 13x60x90 --impl "$impl" --json "$OUT/memory_2b_$impl.json" 2>&1 | tee -a "$OUT/memory.txt"
done
timeout 60 python3 bench/bench_memory.py --latent 21x96x170 --json "$OUT/memory_1.5.json" 2>&1 | tee -a "$OUT/memory.txt"
timeout "${BENCH_TIMEOUT:-450}" python3 bench/bench_vae.py --scales "${SCALES:-2b,1.5}" --workdir /tmp/bw \
  --json "$OUT/bench_vae.json" 2>&1 | tee "$OUT/bench_vae.log"
