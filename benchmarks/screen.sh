#!/usr/bin/env bash
# Train the rows of a screen side by side, each one `train_profile.py` call with its own log
# in OUT_DIR/logs (its result and grids go where train_profile.py writes them), then print the
# rows' table lines in row order. Made for a GPU box, where a 0.4 GFLOP UNet leaves the card
# mostly idle and a dozen runs share it; on a CPU run the rows one at a time instead (README:
# how the laptop profile was tuned).
#
# Run: benchmarks/screen.sh ROWS_FILE OUT_DIR [SECONDS] [extra train_profile.py args...]
#   ROWS_FILE: one row a line, "label|--set a=b --set c=d" (lines starting with # are skipped)
#   SECONDS: stop whatever is still running after this long (default 3600)
set -u
rows=$1 out=$2 limit=${3:-3600}
shift 3 2>/dev/null || shift $#
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
mkdir -p "$out/logs"
pids=()
n=0
while IFS='|' read -r label settings; do
    [[ -z "$label" || "$label" == \#* ]] && continue
    n=$((n + 1))
    # shellcheck disable=SC2086  # the settings are words on purpose
    PYTHONUNBUFFERED=1 timeout "$limit" "$python" "$here/train_profile.py" --label "$label" $settings "$@" \
        >"$out/logs/row$n.log" 2>&1 &
    pids+=($!)
    echo "row $n started: $label"
done <"$rows"
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "row $((i + 1)) failed or timed out (see logs/row$((i + 1)).log)"; status=1; }
done
for ((i = 1; i <= n; i++)); do grep -h '^| ' "$out/logs/row$i.log"; done
exit $status
