#!/usr/bin/env bash
# Runs the key-schedule and data-plane benchmarks in interleaved rounds
# (every benchmark once per round, ROUNDS rounds), so that a shared
# machine's drift lands on a variant and its baseline alike, then
# summarises them with benchstat. The figures in docs/PERFORMANCE.md come
# from this script.
#
#   scripts/bench.sh [ROUNDS] [OUTDIR]      (defaults: 10, a new temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
export GOTOOLCHAIN=local
benchstat="golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da"

for r in $(seq "$rounds"); do
	echo "round $r of $rounds" >&2
	go test ./internal/keys -run '^$' -bench . -benchmem -count 1 >>"$out/keys.txt"
	go test ./internal/cmac ./internal/packet -run '^$' -bench . -benchmem -count 1 >>"$out/cmac.txt"
	go test ./internal/sa -run '^$' -bench . -benchmem -count 1 >>"$out/sa.txt"
	go test ./internal/gateway -run '^$' -bench Gateway -benchmem -count 1 >>"$out/gateway.txt"
	go test ./internal/agent -run '^$' -bench 'Handshake|TCP' -benchtime 2s -benchmem -count 1 >>"$out/agent.txt"
done
go test ./internal/nic -run TestMemoryReport -v >"$out/nic.txt"
for f in keys cmac sa gateway agent; do
	go run "$benchstat" "$out/$f.txt" >"$out/$f.stat"
done
awk -f scripts/ratios.awk "$out/sa.txt" >"$out/ratios.md"
awk -f scripts/ratios.awk "$out/gateway.txt" >>"$out/ratios.md"
awk -v base=wireguard -f scripts/ratios.awk "$out/agent.txt" >>"$out/ratios.md"
echo "raw results, benchstat summaries and ratios.md in $out" >&2
