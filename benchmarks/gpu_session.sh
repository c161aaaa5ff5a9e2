#!/usr/bin/env bash
# The GPU checks as one prepared script, so that the time on a GPU machine goes to measuring.
#
#   bash benchmarks/gpu_session.sh kit                      # here, on a CPU machine with PyPI (make gpu-kit)
#   bash benchmarks/gpu_session.sh run STAGE [STAGE ...]    # there, in the repository root, with .gpu-kit/ carried
#
# `kit` fills .gpu-kit/ (git-ignored, ~48 MB): Python 3.12 wheels of this project's pins that the GPU image lacks
# or holds at other versions (flax, optax, orbax-checkpoint, ml_collections, grain, array_record, pycocotools,
# portpicker), a copy of the official source (../shared does not travel) and the tiny official fixtures (the r50
# one, 70 MB, is left out to keep the kit small). A CUDA JAX image typically has python3 with PyTorch, torchvision, nvcc,
# ninja and JAX 0.11 for CUDA; this project's suite passes on the CPU with JAX 0.11.2 and these pins too.
# `run` installs the wheels into /tmp/site and runs the stages in the order given; each one's output goes to
# $OUT/STAGE.log as it runs (what a stage printed is kept even when a time limit cuts it off), ending
# with its exit status and seconds. JAX's compilation cache lives in .gpu-cache/ (git-ignored), so a second call on
# the same warm machine loads what the first compiled (the official kernel is rebuilt by each peer run, ~1 min).
#
# Stages:
#   peer      benchmarks/peer_official.py: official PyTorch with its CUDA kernel vs ours, same weights and images,
#             rho 0 and rho 0.1, forward 800x1066 b1/b4, train step 800x1333 b2, float32 (default precision)
#   profile   benchmarks/profile_step.py: where the rho 0.1 train step's time goes, 800x1333 b2 (decides the
#             Pallas kernel: deformable sampling forward + backward over ~20% of the step)
#   fixtures  the tiny official fixtures (outputs, every loss term, gradients) on the GPU, with JAX's default matmul
#             precision and with jax_default_matmul_precision="highest"; bf16's distance from them (bf16_fixtures.py)
#   speed     forward FPS at 800x1066 (sparse_detr_jax.benchmark): rho 0.1 and rho 0 in float32 (default matmul
#             precision) and bfloat16, then rho 0.1 in float32 with "highest"
#   train16   train step images/s at 800x1333 b2 (benchmarks/train_step.py), rho 0 and rho 0.1, bfloat16
#   gemm      the r50 rho 0.1 train step at 800x1333 with 4 images per GPU, with XLA's default flags and with the
#             one train.py sets on GPUs (sparse_detr_jax/xla_flags.py): whether the default compiles on a real GPU
#             (compiled without one, XLA:GPU finds no tiling for a decoder GEMM) and which is faster
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit
WHEELS="flax optax orbax-checkpoint ml_collections grain array_record pycocotools portpicker"

kit() {
  set -e
  rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/fixtures"
  local pins
  pins=$(for w in $WHEELS; do grep -i -E "^${w//[-_]/[-_]}==" constraints.txt; done)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$KIT/wheels" $pins 2> >(grep -v "WARNING: Location" >&2)
  [ "$(ls "$KIT/wheels" | wc -l)" -eq "$(echo $WHEELS | wc -w)" ] || { echo "gpu_session kit: a wheel is missing" >&2; exit 1; }
  local shared=../shared
  cp -r "$shared/official-src/sparse-detr" "$KIT/official-src"
  rm -rf "$KIT/official-src/.git"
  chmod -R u+w "$KIT"  # the shared copies are read-only; a later `kit` removes this one
  cp "$shared"/fixtures/official/tiny_{sparse,deformable}.{pth,npz} "$KIT/fixtures/"
  du -sh "$KIT"
}

bench() {  # sparse_detr_jax.benchmark's last two lines: what was measured, and its numbers
  python3 -m sparse_detr_jax.benchmark --min_seconds 2 "$@" | tail -n 2
}

stage_peer() {
  python3 benchmarks/peer_official.py --official "$KIT/official-src" --peer-python python3 --iters 10
}

stage_profile() {
  python3 benchmarks/profile_step.py --height 800 --width 1333 --batch 2 --steps 3 --top 25
}

stage_fixtures() {
  local tests="tests/test_model.py tests/test_losses.py" rc=0
  echo "# JAX's default matmul precision"
  SPARSE_DETR_FIXTURES="$PWD/$KIT/fixtures" python3 -m pytest -q -rfEs -p no:cacheprovider $tests -k tiny || rc=1
  echo "# jax_default_matmul_precision=highest"
  JAX_DEFAULT_MATMUL_PRECISION=highest SPARSE_DETR_FIXTURES="$PWD/$KIT/fixtures" \
    python3 -m pytest -q -rfEs -p no:cacheprovider $tests -k tiny || rc=1
  python3 benchmarks/bf16_fixtures.py --fixtures "$KIT/fixtures" --names tiny_sparse,tiny_deformable || rc=1
  return $rc
}

stage_speed() {  # each line compiles batch 1 (for the flop count, and timed) and batch 4
  local rho01=configs/r50_sparse_detr_rho_0.1.py rho0=configs/r50_efficient_detr.py
  echo "# float32, JAX's default matmul precision" && bench --config $rho01 && bench --config $rho0
  echo "# bfloat16" && bench --config $rho01 --dtype bfloat16 && bench --config $rho0 --dtype bfloat16
  echo "# float32, jax_default_matmul_precision=highest" && JAX_DEFAULT_MATMUL_PRECISION=highest bench --config $rho01
}

stage_train16() {
  python3 benchmarks/train_step.py --cases r50_rho0,r50_rho0.1 --dtype bfloat16
}

stage_gemm() {
  local rc=0 flags
  for flags in "" "--xla_gpu_enable_triton_gemm=false"; do
    echo "# XLA_FLAGS='$flags'"
    XLA_FLAGS="$flags" python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import train_step
first, warm = train_step.step_seconds('configs/r50_sparse_detr_rho_0.1.py', (800, 1333), 4, 5)
print(f'first step (with compilation) {first:.1f} s, warm step {warm:.3f} s, {4 / warm:.1f} images/s')" || rc=1
  done
  return $rc
}

run() {
  local out="${OUT:-/tmp/gpu_session}"
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$KIT"/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  export JAX_COMPILATION_CACHE_DIR="$PWD/.gpu-cache/jax"
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
      'torch', torch.__version__, torch.cuda.get_device_name())"
  } 2>&1 | tee "$out/env.log"
  for stage in "$@"; do
    local start=$SECONDS
    {
      echo "## $stage, $(date -u +%FT%TZ)"
      "stage_$stage"
      echo "## $stage: exit $?, $((SECONDS - start)) s"
    } 2>&1 | tee "$out/$stage.log"
  done
}

case "${1:-}" in
  kit) kit ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh kit | run STAGE... (peer profile fixtures speed train16 gemm)" >&2; exit 2 ;;
esac
