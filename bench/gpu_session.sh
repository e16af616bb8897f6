#!/usr/bin/env bash
# One device call's work (see ../shared/gpu/README.md): install the carried egglog wheels, then
# run the named stages, each under its own time limit, logs and result pages under $OUT.
#
#   bench/gpu_session.sh check attention-quick      # kernel tests compiled on the GPU + quick bench
#   bench/gpu_session.sh probe probe-fp8              # first call of a short lease: D128 rows only
#   bash bench/gpu_session.sh mosaic attention-fp8-quick e2e-fp8 tune-mosaic-fp8   # next lease (see bench/results/README.md)
#   stages: probe | probe-fp8 | attention-fp8 | attention-fp8-quick | check | final-check | mosaic | attention | attention-quick | e2e | e2e-fp8 | models | cost-model | tune |
#           tune-mosaic | tune-mosaic-fp8 | tune-fp8 | tune-backward | mosaic-bwd | mosaic-bwd-masks | qkv | masks |
#           mosaic-masks | decode | alibi | mosaic-decode
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader
python3 -c "import jax, egglog; print('jax', jax.__version__, jax.devices())"
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    check) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/check.log" | tail -25 ;;
    # a short lease's first look: every Mosaic GPU row (both schedules) at D128, beside Triton, cuDNN
    # and attention_mgpu; each row is checked against the reference, failures logged in full
    probe) timeout 210 python3 bench/attention.py --quick --head-dims 128 \
        --match 'Mosaic|Triton (standard|transposed)|cudnn' --out "$OUT/probe.md" 2>&1 \
        | tee "$OUT/probe.log" | grep -v '^  ' | tail -60 ;;
    probe-fp8) timeout 110 python3 bench/attention.py --fp8 --quick --match 'Mosaic|fp8 Triton|cuDNN|cudnn' \
        --out "$OUT/probe-fp8.md" 2>&1 | tee "$OUT/probe-fp8.log" | grep -v '^  ' | tail -40 ;;
    d64) timeout 150 python3 bench/attention.py --quick --head-dims 64 \
        --match 'Mosaic|Triton (standard|transposed)|cudnn' --out "$OUT/d64.md" 2>&1 \
        | tee "$OUT/d64.log" | grep -v '^  ' | tail -30 ;;
    # the compiled Mosaic GPU kernel only (its interpreted tests run in CI), both schedules
    mosaic) timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_mosaic_kernels.py 2>&1 | tee "$OUT/mosaic.log" | tail -25 ;;
    tune-mosaic) timeout 420 python3 bench/tune_attention.py --mosaic --quick --out "$OUT/tune-mosaic.md" 2>&1 | tail -40 ;;
    tune-mosaic-fp8) timeout 200 python3 bench/tune_attention.py --mosaic --fp8 --out "$OUT/tune-mosaic-fp8.md" 2>&1 | tail -30 ;;
    attention) timeout 290 python3 bench/attention.py --out "$OUT/attention.md" 2>&1 | tail -60 ;;
    attention-quick) timeout 400 python3 bench/attention.py --quick --out "$OUT/attention.md" 2>&1 | tail -40 ;;
    attention-fp8) timeout 200 python3 bench/attention.py --fp8 --out "$OUT/attention-fp8.md" 2>&1 \
        | grep -v '^  ' | tail -40 ;;
    attention-fp8-quick) timeout 150 python3 bench/attention.py --fp8 --quick --out "$OUT/attention-fp8.md" 2>&1 \
        | grep -v '^  ' | tail -30 ;;
    e2e) timeout 230 python3 bench/end_to_end.py --out "$OUT/end-to-end.md" 2>&1 | tail -30 ;;
    models) timeout 500 python3 bench/models.py --reps 20 --out "$OUT/models.md" 2>&1 | tail -40 ;;
    e2e-fp8) timeout 300 python3 bench/end_to_end.py --fp8 --out "$OUT/end-to-end-fp8.md" 2>&1 | tail -30 ;;
    cost-model) timeout 250 python3 bench/cost_model_experiment.py --calibrate --variants 20 --out "$OUT/cost-model.md" \
        --calibration-out "$OUT/calibration.json" 2>&1 | tail -40 ;;
    # every compiled-on-the-GPU test (-m gpu): the CPU tests of these files run in CI (on the
    # 2026-11-26 lease the unselected run spent its 240 s on them and lost its report)
    final-check) timeout 240 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_kernels.py \
        tests/test_fp8_kernels.py tests/test_packed_attention.py tests/test_mosaic_kernels.py 2>&1 | tee "$OUT/final-check.log" | tail -25 ;;
    # issue 21: compiled masked / soft-capped / guarded kernels (tests/test_kernel_masks.py -m gpu),
    # then the boolean-mask and soft-cap rows beside the plain Triton row at D128
    masks) timeout 240 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_kernel_masks.py 2>&1 \
        | tee "$OUT/masks.log" | tail -25
      timeout 200 python3 bench/attention.py --quick --head-dims 128 --dtypes bfloat16 \
        --match 'Triton (standard|boolean mask|key lengths|soft-cap)' --out "$OUT/attention-masks.md" 2>&1 | grep -v '^  ' | tail -20 ;;
    # issue 21: the Mosaic GPU forward with masks, bias and soft-cap: its compiled tests
    # (tests/test_mosaic_masks.py -m gpu, both schedules), then the masked rows at D128 (key padding
    # in half the batch, sliding window 1024, bias, soft-cap; ours Mosaic GPU and Triton beside
    # cuDNN and XLA, each row checked against its own reference, TFLOP/s on kept pairs and on tiles)
    mosaic-masks) timeout 200 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_mosaic_masks.py 2>&1 \
        | tee "$OUT/mosaic-masks.log" | tail -15
      timeout 300 python3 bench/attention.py --masks --quick --head-dims 128 --out "$OUT/attention-masks-mosaic.md" 2>&1 \
        | grep -v '^  ' | tail -40 ;;
    # issue 21: the compiled decode kernel's tests (tests/test_decode_kernel.py -m gpu), then the
    # decode rows (B32, caches 4096/32768: ours vs cuDNN and XLA through jax.nn.dot_product_attention)
    decode) timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_decode_kernel.py 2>&1 \
        | tee "$OUT/decode.log" | tail -15
      timeout 240 python3 bench/attention.py --decode --out "$OUT/attention-decode.md" 2>&1 | grep -v '^  ' | tail -40 ;;
    qkv) timeout 240 python3 bench/qkv_layouts.py --reps 10 --out "$OUT/qkv-layouts.md" 2>&1 | tail -30 ;;
    # issue 21: the compiled Mosaic GPU backward's tests (tests/test_mosaic_backward.py -m gpu), then
    # its rows beside the Triton backward (bench/tune_backward.py --mosaic; D128 then D64, causal and
    # not, both V layouts; the page is rewritten after each row): the measurement that decides
    # whether flash_attention's default backward flips
    mosaic-bwd) timeout 240 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_mosaic_backward.py 2>&1 \
        | tee "$OUT/mosaic-bwd.log" | tail -15
      timeout 300 python3 bench/tune_backward.py --mosaic --out "$OUT/tune-backward-mosaic.md" 2>&1 | tail -20 ;;
    # issue 21: the Mosaic GPU backward with masks, key lengths, windows, bias (dbias) and soft-cap:
    # its compiled tests (tests/test_mosaic_backward_masks.py -m gpu), then its rows beside the
    # default backward (bench/tune_backward.py --mosaic-masks: key padding, causal key padding,
    # sliding window 1024, bias, soft-cap at D128, S4096; each row checked on S1024 before timing)
    # issue 21: ALiBi computed from its slopes in the Mosaic GPU forward and backward: the compiled
    # tests (tests/test_alibi.py -m gpu), then the ALiBi rows forward (in-kernel vs the same bias read
    # as [1, H, S, S], Triton, cuDNN, XLA) and backward (Mosaic GPU vs the default), D128
    alibi) timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu tests/test_alibi.py 2>&1 \
        | tee "$OUT/alibi.log" | tail -15
      timeout 200 python3 bench/attention.py --masks --quick --head-dims 128 --match alibi \
        --out "$OUT/attention-alibi.md" 2>&1 | grep -v '^  ' | tail -20
      timeout 200 python3 bench/tune_backward.py --mosaic-masks --quick --head-dims 128 --match alibi \
        --out "$OUT/tune-backward-alibi.md" 2>&1 | tail -12 ;;
    # issue 21: the Mosaic GPU decode path (kernels/mosaic_decode.py): its compiled tests
    # (tests/test_mosaic_decode.py -m gpu), then the decode rows with it beside the Triton decode
    # kernel, cuDNN and XLA (B32, caches 4096/32768)
    mosaic-decode) timeout 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_mosaic_decode.py 2>&1 | tee "$OUT/mosaic-decode.log" | tail -15
      timeout 240 python3 bench/attention.py --decode --out "$OUT/attention-decode-mosaic.md" 2>&1 \
        | grep -v '^  ' | tail -40 ;;
    mosaic-bwd-masks) timeout 200 python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_mosaic_backward_masks.py 2>&1 | tee "$OUT/mosaic-bwd-masks.log" | tail -15
      timeout 360 python3 bench/tune_backward.py --mosaic-masks --quick --head-dims 128 \
        --out "$OUT/tune-backward-mosaic-masks.md" 2>&1 | tail -25 ;;
    tune-backward) timeout 300 python3 bench/tune_backward.py --head-dims 128 --out "$OUT/tune-backward.md" 2>&1 | tail -40 ;;
    tune-fp8) timeout 330 python3 bench/tune_attention.py --fp8 --quick --out "$OUT/tune-fp8.md" 2>&1 | tail -40 ;;
    tune) timeout 330 python3 bench/tune_attention.py --quick --out "$OUT/tune.md" 2>&1 | tail -40 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
