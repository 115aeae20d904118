#!/bin/bash
# GPT-2-small tree: wall clock per step vs GPU kernel time per step (ncu),
# for each optimizer pair of benchmarks/optim.py. Run on an NVIDIA GPU from
# the repository root; OUT names a folder for the ncu CSV files.
#   OUT=/tmp/prof bash benchmarks/experiments/tree_profile.sh
S=benchmarks/experiments/step_profile.py
mkdir -p "$OUT"
for opt in optax.adamw adamw_8bit optax.contrib.ademamix ademamix_8bit optax.lion lion_8bit "optax.sgd(momentum)" sgd_8bit; do
  python3 $S --case gpt2 --opt "$opt"
  csv="$OUT/ncu_gpt2_$opt.csv"
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
      python3 $S --case gpt2 --opt "$opt" --profile > "$csv" 2>/dev/null
  echo "  GPU time of one step: $(python3 benchmarks/experiments/ncu_summary.py "$csv" | head -1)"
done
XLA_FLAGS=--legacy_command_buffer_custom_call_targets=triton_kernel_call python3 $S --case gpt2 --opt adamw_8bit 2>&1 | tail -2
