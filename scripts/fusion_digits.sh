#!/usr/bin/env bash
# Weight fusion on the built-in digits: a shared ConvMixer (pointwise conv shared by 4 layers)
# started from a trained unshared one, against the same shared model from random initialisation,
# before and after the same training budget. Prints a markdown table.
#
#   cargo build --release -p zoo && scripts/fusion_digits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SPIN=${SPIN:-target/release/spin}
OUT=${OUT:-runs/fusion}
BASE=digits_convmixer_64_8
SHARED=digits_convmixer_64_8_ws4_sequential
BASE_EPOCHS=${BASE_EPOCHS:-10}
EPOCHS=${EPOCHS:-5}

mkdir -p "$OUT"

acc() { grep -o "$1 [0-9.]*" | tail -1 | awk '{print $NF}'; }

"$SPIN" train --model "$BASE" --epochs "$BASE_EPOCHS" --out "$OUT/base" --quiet > "$OUT.base.log" 2>&1 || { cat "$OUT.base.log"; exit 1; }
base=$(grep '^epoch' "$OUT.base.log" | tail -1 | acc "acc")

run() { # name, extra args
    "$SPIN" train --model "$SHARED" --epochs "$EPOCHS" --out "$OUT/$1" --quiet "${@:2}" > "$OUT.$1.log" 2>&1 || { cat "$OUT.$1.log"; exit 1; }
    before=$(grep '^before training' "$OUT.$1.log" | acc "acc")
    after=$(grep '^epoch' "$OUT.$1.log" | tail -1 | acc "acc")
    printf '| %s | %s | %s |\n' "$1" "$before" "$after"
}

echo "unshared $BASE after $BASE_EPOCHS epochs: test accuracy $base"
echo
echo "| $SHARED start | test acc before | after $EPOCHS epochs |"
echo "|---|---|---|"
run random
run fused_mean --init-from "$OUT/base/checkpoint.safetensors"
run fused_channel_wfws --init-from "$OUT/base/checkpoint.safetensors" --fusion channel_weighted_mean
