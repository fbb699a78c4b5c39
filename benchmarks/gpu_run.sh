#!/usr/bin/env bash
# GPU work for the device tool, in slices that each fit one 10-minute call:
#   bash benchmarks/gpu_run.sh tests | moe-sweep | moe | moe-parts | gla | gla-bwd | train | ce | qk | mla | profile | fp8 | fp8-sweep | fp32 | decode-graphs | multi | generate [args]
# Run from the repo root with `.whl/` carried (fla-core + einops wheels, see BENCHMARKS.md).
# Results land in $OUT (json) and on stdout (markdown tables). LIMIT=seconds caps one slice
# (default 540-560) so that two slices can share one call.
# `bash benchmarks/ab.sh OTHER_TREE SLICE` runs one slice for this tree and another checkout side by side.
set -uo pipefail
# cuda first (the default backend), cpu beside it: the train loop builds the model on the host CPU
export JAX_PLATFORMS=cuda,cpu PYTHONUNBUFFERED=1
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/fla_core-*.whl .whl/einops-*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
part=${1:-tests}; shift || true
case "$part" in
  tests)      # every GPU-only test (compiled kernels against the references), and the router's tests
              # (73 passed in 538 s on the H100 at e0614b0: near a call's limit)
    timeout ${LIMIT:-575} python3 -m pytest -q -p no:cacheprovider -k "gpu or router or top_k" \
      tests/kernels/test_grouped_matmul.py tests/kernels/test_simple_gla_pallas.py \
      tests/kernels/test_mla_flash.py tests/kernels/test_rms_norm.py tests/kernels/test_mosaic_tgmm.py \
      tests/model/test_model.py tests/kernels/test_cross_entropy.py tests/kernels/test_qk_norm_rope.py ;;
  moe-sweep)  # raw grouped-matmul kernels over tile configurations (flash shape; --shapes small)
    timeout ${LIMIT:-560} python3 -m benchmarks.moe --sweep --shapes flash --tokens 4096,16384 "$@" ;;
  moe)        # the routed-expert layer, both shapes, every token count
    timeout ${LIMIT:-560} python3 -m benchmarks.moe --no-mgpu "$@" ;;
  moe-parts)  # the routed-expert layer's device time per op; sort and HBM-read references
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout ${LIMIT:-560} python3 -m benchmarks.moe_parts "$@" ;;
  gla)        # Lightning attention prefill, default configuration, all four shapes
    timeout ${LIMIT:-560} python3 -m benchmarks.simple_gla --default-only --no-decode --no-check --no-fused ;;
  gla-bwd)    # the Mosaic kernels' GPU tests, then forward+backward with the Mosaic (default) and
              # the Triton backward side by side (shapes 0 and 2; --shapes ... overrides)
    timeout ${LIMIT:-560} bash -c 'python3 -m pytest -q -p no:cacheprovider \
        tests/kernels/test_simple_gla_pallas.py -k gpu_mosaic 2>&1 | tail -3 &&
      python3 -m benchmarks.simple_gla --no-fused --no-check --no-decode --shapes 0,2 "$@" \
        --fwd-configs "[{}]" --bwd-configs "[{}, {\"bwd_kernel\": \"triton\"}]"' _ "$@" ;;
  train)      # ling_small at sequence 4096 (experiments/small_pretrain.py defaults: 64 x 4096 a
              # step in 8 micro-batches; the model's init and the step compile in ~5.5 min)
    timeout ${LIMIT:-560} python3 -m experiments.small_pretrain train.steps=13 train.log_every=2 \
      train.checkpoint_every=1000 train.sample_tokens=0 train.unigram_batches=1 \
      train.progress=false train.out_dir=$(mktemp -d) "$@" ;;
  ce)         # the chunked LM-head cross-entropy: XLA's passes against the fused Pallas kernel,
              # then the kernel's configurations on one chunk (--no-sweep skips them)
    timeout ${LIMIT:-560} python3 -m benchmarks.ce_head "$@" ;;
  qk)         # the Lightning layer's fused QK norm + RoPE against XLA, over block configurations
    timeout ${LIMIT:-560} python3 -m benchmarks.qk_norm_rope "$@" ;;
  mla)        # MLA causal attention: materialised XLA scores vs the flash kernel's block sizes
    timeout ${LIMIT:-560} python3 -m benchmarks.mla_attention "$@" ;;
  profile)    # where a small_pretrain step's device time goes, per source file and op
    # (command buffers off: a CUDA graph shows in the trace as one op, hiding its kernels)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
      timeout ${LIMIT:-560} python3 -m benchmarks.profile_step "$@" ;;
  fp8)        # FP8 expert weights: the compiled kernels against float64 and the dequantised bf16
              # ones, then the experts' forward with bf16 / FP8 block / FP8 channel weights, then
              # ling_small's logits with FP8 experts against bf16 and fp32 (benchmarks/fp8_accuracy)
    timeout ${LIMIT:-560} bash -c 'python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -k gpu \
        tests/kernels/test_grouped_matmul_fp8.py tests/model/test_fp8_experts.py 2>&1 |
        tee "${OUT:-/tmp}/fp8_tests.log" | tail -40 &&
      python3 -m benchmarks.fp8_experts "$@" && python3 -m benchmarks.fp8_accuracy' _ "$@" ;;
  fp32)       # fp32 compute on the GPU kernels: the flash MLA kernel against float64 at ling_small's
              # head (its fp32 tiles overflowed shared memory on 2026-12-07; passed on an H200 the
              # same day after the fix), then ling_small in fp32 with each op alone on its default
              # kernel against the XLA paths (four compilations of ling_small: minutes)
    timeout ${LIMIT:-560} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -k "gpu and \
      (fp32 or float32)" tests/kernels/test_mla_flash.py tests/model/test_model.py 2>&1 |
      tee "${OUT:-/tmp}/fp32_tests.log" | tail -40 ;;
  fp8-sweep)  # the FP8 experts' kernels over tile configurations at decode sizes (1-64 tokens),
              # each over tuned_config's choice per weight format ({}). Default list: narrower
              # N-blocks (block_n for the down kernel, block_n_glu for gate/up), so that one
              # token's 8 experts fill the GPU's SMs; one-row visits (block_m 1: multiply-and-sum
              # on the CUDA cores) with 1-4 K-steps a loop step (k_unroll), 2 warps.
              # (The 2026-12-07 sweep's 16-row / 128-deep / swap_ab / 8-warp list gave
              # `_decode_tiles`: BENCHMARKS.md#decode.) CONFIGS='[...]' overrides.
    sweep='[{}, {"block_n_glu": 32, "block_n": 64}, {"block_m": 16, "block_n_glu": 32, "block_n": 64},
      {"block_m": 1, "block_n_glu": 32, "block_n": 64}, {"block_m": 1, "block_n_glu": 32, "block_n": 64, "k_unroll": 2},
      {"block_m": 1, "block_n_glu": 32, "block_n": 64, "k_unroll": 4},
      {"block_m": 1, "block_n_glu": 16, "block_n": 32, "k_unroll": 4},
      {"block_m": 1, "block_n_glu": 64, "block_n": 128, "k_unroll": 2},
      {"block_m": 1, "block_n_glu": 32, "block_n": 64, "k_unroll": 2, "num_warps": 2},
      {"block_m": 1, "block_n_glu": 32, "block_n": 64, "block_k": 64, "k_unroll": 4}]'
    timeout ${LIMIT:-560} python3 -m benchmarks.fp8_experts --tokens ${TOKENS:-1,16,64} \
      --configs "${CONFIGS:-$sweep}" "$@" ;;
  decode-graphs) # the decode loop as CUDA graphs: ling_small's decode (launch-bound at batch 1:
              # ~20 kernels a layer, each launched from the host, and the while loop's predicate
              # read back every step) with XLA's default command buffers, with none, and with the
              # while loop and its conditionals captured too (+WHILE,+CONDITIONAL), in turn;
              # --model flash-group etc. override (batches 1,16 with MTP 0,1 outlived 180 s a setting
              # on an H200: each row compiles the three steps twice)
    timeout ${LIMIT:-590} bash -c 'for cb in default "" +WHILE,+CONDITIONAL; do
        echo "== command buffers: ${cb:-none}"
        flags="${XLA_FLAGS:-}"; [[ $cb != default ]] && flags="$flags --xla_gpu_enable_command_buffer=$cb"
        XLA_FLAGS="$flags" timeout ${PER:-190} python3 -m benchmarks.generate --model small \
          --batches 1 --mtp 0 --prefill "" "$@"
      done' _ "$@" ;;
  multi)      # a sharded train step per mesh and expert-exchange strategy on the GPUs present
              # (ling_small, 8 rows x 4096 per GPU; on one GPU a dry run of one row); each row
              # compiles for minutes, so pick one or two per call (--meshes "fsdp=-1"
              # --exchanges all_gather,all_to_all); --decomposer: XLA's ragged-all-to-all decomposer
    timeout ${LIMIT:-560} python3 -m benchmarks.multi_gpu "$@" ;;
  generate)   # whole-model generation: the GPU generation tests, then decode tokens/s at batch 1, 16
              # and 64 with MTP off and on (rigged 0.8 acceptance), prefill, against the byte floor
              # (flash widths, one hybrid group; --model small, --fp8 block, --hbm 4.8e12 on an H200)
    timeout ${LIMIT:-560} bash -c 'python3 -m pytest -q -p no:cacheprovider -k gpu \
        tests/generate/test_generate.py tests/model/test_fp8_experts.py tests/model/test_linear.py \
        2>&1 | tail -3 &&
      python3 -m benchmarks.generate "$@"' _ "$@" ;;
  *) echo "unknown part $part (tests | moe-sweep | moe | moe-parts | gla | gla-bwd | train | ce | qk | mla | profile | fp8 | fp8-sweep | fp32 | decode-graphs | multi | generate)"; exit 2 ;;
esac
