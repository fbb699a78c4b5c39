#!/usr/bin/env bash
# One GPU benchmark slice for this tree and another, side by side in one device call:
#   bash benchmarks/ab.sh OTHER_TREE SLICE [args ...]
# OTHER_TREE is another checkout of ling-jax (`git worktree add /tmp/base <commit>`, or an
# archive of one carried to the device); SLICE is one of `benchmarks/gpu_run.sh`'s, run from each
# tree's root, this tree first, LIMIT seconds each (default 270).
#
# `train` is different: small_pretrain's step compiles for 3-6 minutes of CPU work, so the two
# runs compile at the same time, then take the GPU one at a time: each process is stopped
# (SIGSTOP) as soon as it logs its first interval (the one that holds compilation), and resumed
# alone once both are there, this tree first. The interval a process was stopped in is slow;
# the median over the steady intervals (what "steady-state" reports) leaves it out. Both hold
# their GPU memory while stopped (~52 GiB each), so this needs a card with more than 100 GiB (an
# H200). On a smaller one (an H100) one call runs one tree, all of LIMIT: SIDE=this (default) or
# SIDE=other, two calls back to back on one warm machine, each LIMIT >= 450 (the two at LIMIT/2
# each did not fit: an H100 host took 369-371 s to the first step on 2026-12-07, ~3 minutes of
# that tracing and lowering before XLA's own compilation, for either tree). `train` takes
# key=value overrides; STEPS (default 15) and EXPERIMENT (default small_pretrain) pick the run.
set -uo pipefail
other=${1:?usage: bash benchmarks/ab.sh OTHER_TREE SLICE [args ...]}
part=${2:?usage: bash benchmarks/ab.sh OTHER_TREE SLICE [args ...]}; shift 2
out=${OUT:-$(mktemp -d)}
if [[ $part != train ]]; then
  LIMIT=${LIMIT:-270} bash benchmarks/gpu_run.sh "$part" "$@" 2>&1 | tee "$out/ab_${part}_this.log"
  [[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site  # the peers' wheels this tree's run installed
  (cd "$other" && LIMIT=${LIMIT:-270} bash benchmarks/gpu_run.sh "$part" "$@") 2>&1 |
    tee "$out/ab_${part}_other.log"
  exit
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu} PYTHONUNBUFFERED=1
experiment=${EXPERIMENT:-small_pretrain}
steps=${STEPS:-15}
args=(train.steps=$steps train.log_every=2 train.checkpoint_every=1000 train.sample_tokens=0
      train.unigram_batches=1 train.progress=false "$@")
report() {
  for log in "$out/ab_train_this.log" "$out/ab_train_other.log"; do
    echo "== $log"; grep -E "tok/s|steady-state|peak device|eval loss|Error|compiled" "$log"
  done
}
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
if (( mib < 100000 )); then
  # Both cannot hold their memory at once, nor compile and run in one call one after the other:
  # one tree a call.
  side=${SIDE:-this}
  echo "one card of $mib MiB: $side tree only (SIDE=this|other; the other in the next call)"
  case $side in
    this) dir=. ;;
    other) dir=$other ;;
    *) echo "SIDE=$side: want this or other"; exit 2 ;;
  esac
  (cd "$dir" && timeout ${LIMIT:-560} python3 -m experiments.$experiment "${args[@]}" \
    train.out_dir=$(mktemp -d)) > "$out/ab_train_$side.log" 2>&1
  echo "== $out/ab_train_$side.log"
  grep -E "tok/s|steady-state|peak device|eval loss|Error|compiled" "$out/ab_train_$side.log"
  exit
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.47
python3 -m experiments.$experiment "${args[@]}" train.out_dir=$(mktemp -d) \
  > "$out/ab_train_this.log" 2>&1 &
this=$!
(cd "$other" && exec python3 -m experiments.$experiment "${args[@]}" \
  train.out_dir=$(mktemp -d)) > "$out/ab_train_other.log" 2>&1 &
that=$!
deadline=$(( SECONDS + ${LIMIT:-560} ))
stopped=()
# Stop each at its first logged interval; give up (and kill both) at the deadline.
while (( ${#stopped[@]} < 2 )); do
  for p in $this $that; do
    [[ " ${stopped[*]} " == *" $p "* ]] && continue
    log=$([[ $p == "$this" ]] && echo "$out/ab_train_this.log" || echo "$out/ab_train_other.log")
    if grep -q "tok/s" "$log"; then kill -STOP $p; stopped+=($p); echo "stopped after its first interval at ${SECONDS} s: $log"; fi
    if ! kill -0 $p 2>/dev/null; then echo "exited early: $log"; tail -20 "$log"; kill $this $that 2>/dev/null; exit 1; fi
  done
  (( SECONDS > deadline )) && { echo "timed out compiling"; kill -9 $this $that; report; exit 124; }
  sleep 0.5
done
for p in $this $that; do
  kill -CONT $p
  while kill -0 $p 2>/dev/null; do
    (( SECONDS > deadline )) && { echo "timed out"; kill -9 $this $that; report; exit 124; }
    sleep 0.5
  done
done
report
