#!/usr/bin/env bash
# Sums a fuzz results TSV (utc, mode, target, runs, seconds, crashes, sanitizer) per target.
set -euo pipefail
tsv=${1:-testdata/fuzz/results.tsv}
echo "From \`make fuzz\` (\`scripts/fuzz.sh long\`, libFuzzer via cargo-fuzz), summed over every run recorded in \`${tsv}\`:"
echo
echo "| target | runs (inputs) | hours | crashes, panics, hangs, OOMs |"
echo "|---|---|---|---|"
awk -F'\t' '$2=="long" { runs[$3]+=$4; secs[$3]+=$5; crash[$3]+=$6 } END { for (t in runs) printf "| %s | %d | %.2f | %d |\n", t, runs[t], secs[t]/3600, crash[t] }' "$tsv" | sort
