#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (its python3 has jax, flax, orbax, torch, but no
# diffusers). STEPS picks and orders the steps (default: "2b 1.5 tiles autotune sweep best", what
# bench/RESULTS.md asks of the next GPU run), each bounded by what is left of DEADLINE seconds; a step
# is skipped when fewer than MIN_STEP_S (45) are left, too few for a 2b compile. Run 3 took about 18 s
# to set up, 190 s for 2b and 155 s for 1.5, so in one 555 s call the sweep is cut short and `best`
# rarely runs; `train` (about 3 minutes) is left out of the default (STEPS=train, a call of its own):
#   2b      2b scale, default lowering: diffusers eager and cogvae (decode, encode, tiled, exact tiles);
#   1.5     1.5 scale, default lowering: diffusers eager and cogvae (decode, encode);
#   tiles   2b exact tiles one at a time (batch_tiles=False), cogvae only, about 60 s: against the 2b
#           step's exact tiles, which stack equal-shaped edge tiles along the batch axis (the default);
#   2b_3d, 1.5_3d   the same with the `3d` lowering, cogvae only (decode; exact tiles at 2b);
#   memory  XLA's compile-time memory of the 2b decode kernels (bench/bench_memory.py);
#   sweep   what might close the GPU scan's excess over the first batch (bench/RESULTS.md), by
#           XLA's compile-time memory of the 2b kernels, no torch, about 5 minutes: when each new
#           conv cache is read (layers.TAIL_READ, --tail-read), the first batch and scan fused
#           into one function (--kernels fused), one scanned batch compiled on its own with its
#           cache donated (--kernels step: is the loop itself the cause?); then XLA GPU options on
#           a loop's buffers (scheduler, copy insertion, unrolling, command buffers);
#   best    after sweep: the lever with the lowest scan total (bench/pick_lever.py), if it beats
#           the default by 0.5 GiB, run end to end at 2b (decode, exact tiles; cogvae only: compare
#           with the 2b step's diffusers figures from the same call);
#   cache   2b decode, cogvae only, once cold and once in a new process with the persistent
#           compilation cache filled (enable_compilation_cache);
#   train   one decoder fine-tuning step (decode, MSE, gradient of every parameter), diffusers
#           autograd (bf16 autocast) against cogvae (nnx.value_and_grad under nnx.jit), 2b
#           architecture at 5x30x45 latents, gradient checkpointing off and on (bench/bench_train.py);
#   autotune  the 2b decode kernels' compile-time memory with this card's conv autotuning, and the
#           autotuning results and this card's target description saved with the results, so that a
#           machine without a GPU can compile with them (bench_memory.py --target FILE
#           --autotune-results FILE) and see the workspaces the deviceless compile leaves out.
# Everything lands in $OUT: log.txt, and results.tgz holding one JSON per step (packed after every step,
# as the device tool returns at most 8 files from $OUT; `tar xzf results.tgz`).
# Example: STEPS=sweep DEADLINE=360 (about 5 minutes).
#
# Before the call, on this machine (the GPU machine has no network), fetch the reference wheels:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata==10.1.0 zipp==4.1.2
# (pinned: importlib_metadata 10.2 needs lazy-importer, which that machine does not have)
# and run it with the device tool, carrying .whl:  bash bench/gpu_run.sh   (carry: [".whl"])
set -u -o pipefail  # pipefail: a failed `python3 ... | tee` below stops the script (`|| exit 1`)
T0=$SECONDS
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
RES=/tmp/res  # the steps' files, packed into $OUT/results.tgz
rm -rf "$RES" && mkdir -p "$RES"
pack() { tar -czf "$OUT/.results.tgz" -C "$RES" . && mv "$OUT/.results.tgz" "$OUT/results.tgz"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The package is used from the tree as `cogvae.*` without installing it (no network for its deps).
mkdir -p /tmp/cog/cogvae && for d in converter model mappings; do ln -sfn "$PWD/$d" "/tmp/cog/cogvae/$d"; done
export PYTHONPATH=/tmp/site:/tmp/cog XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
python3 -c "import cogvae.model, diffusers, jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$LOG" || exit 1

step() {  # step NAME CAP command...: runs with a timeout of min(CAP, time left before DEADLINE)
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - (SECONDS - T0)))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt "${MIN_STEP_S:-45}" ]; then echo "== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
  echo "== $name (timeout ${t}s, at $((SECONDS - T0))s)" | tee -a "$LOG"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  pack
}
BV="python3 bench/bench_vae.py --workdir /tmp/bw"
SWEEP=(--variant default
       --variant lhs:xla_gpu_enable_latency_hiding_scheduler=true
       --variant noat:xla_gpu_autotune_level=0
       --variant noregion:xla_gpu_copy_insertion_use_region_analysis=false
       --variant slop5:xla_gpu_memory_limit_slop_factor=5
       --variant nounroll:xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_NO_UNROLL
       --variant nocmdbuf:xla_gpu_enable_command_buffer=)
BM="python3 bench/bench_memory.py --latent 13x60x90"
for s in ${STEPS:-2b 1.5 tiles autotune sweep best}; do
  case $s in
    2b) step 2b 240 $BV --scales 2b --json "$RES/bench_2b.json" ;;
    1.5) step 1.5 170 $BV --scales 1.5 --ops decode,encode --json "$RES/bench_1.5.json" ;;
    tiles) step tiles 100 $BV --scales 2b --ops decode_tiled_exact_unstacked --skip-torch --json "$RES/bench_2b_tiles.json" ;;
    2b_3d) step 2b_3d 100 env COGVAE_CONV_IMPL=3d $BV --scales 2b --ops decode,decode_tiled_exact --skip-torch --json "$RES/bench_2b_3d.json" ;;
    1.5_3d) step 1.5_3d 60 env COGVAE_CONV_IMPL=3d $BV --scales 1.5 --ops decode --skip-torch --json "$RES/bench_1.5_3d.json" ;;
    memory) step memory 40 $BM --json "$RES/memory_2b.json" ;;
    sweep)  # XLA options first: the latency-hiding scheduler and the autotuned workspaces are what remain
      step sweep_flags 90 $BM --impl 2d_concat_chunked --kernels scan "${SWEEP[@]}" --json "$RES/sweep_flags.json"
      for r in slice chunks conv; do
        step "sweep_chunked_$r" 60 $BM --impl 2d_concat_chunked --kernels scan,fused,step --tail-read $r --json "$RES/sweep_chunked_$r.json"
      done
      step sweep_3d 120 $BM --impl 3d --kernels scan,fused,step --json "$RES/sweep_3d.json" ;;
    best)
      if { read -r envs && read -r args; } < <(python3 bench/pick_lever.py "$RES" 2>>"$LOG"); then
        eval "step best 150 env $envs $BV --scales 2b --ops decode,decode_tiled_exact --skip-torch $args --json $RES/bench_2b_best.json"
      else
        echo "== best: no lever to try (see above)" | tee -a "$LOG"
      fi ;;
    autotune)
      rm -rf /tmp/xd
      step autotune 90 env XLA_FLAGS="--xla_dump_to=/tmp/xd --xla_dump_hlo_pass_re=NONE --xla_gpu_dump_autotune_results_to=$RES/autotune_2b.textproto" \
        $BM --json "$RES/memory_2b_autotuned.json"
      cp "$(ls /tmp/xd/*gpu_target_config.pbtxt 2>/dev/null | head -1)" "$RES/gpu_target_config.pbtxt" 2>/dev/null \
        || echo "no gpu_target_config.pbtxt in the XLA dump" | tee -a "$LOG" ;;
    train) step train 180 python3 bench/bench_train.py --workdir /tmp/bt --json "$RES/bench_train_2b.json" ;;
    cache) step cache 120 $BV --scales 2b --ops decode --skip-torch --repeats 1 --compilation-cache /tmp/cc --json "$RES/bench_2b_cache.json" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
done
pack
echo "== done at $((SECONDS - T0))s" | tee -a "$LOG"
