# Reads `go test -bench` output of interleaved rounds (each benchmark once
# per round, as scripts/bench.sh runs them) and prints, for every benchmark
# NAME/VARIANT, the median over rounds of baseline time ÷ variant time
# (its speed as a multiple of the baseline's, measured moments apart), with
# the lowest and highest round. The baseline variant is "raw" unless
# -v base=NAME says otherwise.
#
#   awk -f scripts/ratios.awk sa.txt
#   awk -v base=wireguard -f scripts/ratios.awk agent.txt
/^Benchmark/ && / ns\/op/ {
	name = $1
	sub(/^Benchmark/, "", name)
	sub(/-[0-9]+$/, "", name)
	for (i = 2; i <= NF; i++) if ($(i+1) == "ns/op") ns = $i
	n = ++count[name]
	t[name, n] = ns
	if (!(name in seen)) { seen[name] = 1; order[++names] = name }
}
function median(a, k,    i, j, x) {
	for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j+1] = a[j]; a[j+1] = x }
	return (k % 2) ? a[(k+1)/2] : (a[k/2] + a[k/2+1]) / 2
}
END {
	if (base == "") base = "raw"
	print "| benchmark | " base " ÷ variant, median of rounds | lowest | highest | rounds |"
	print "|---|---|---|---|---|"
	for (o = 1; o <= names; o++) {
		name = order[o]
		ref = name
		sub(/\/[^\/]+$/, "/" base, ref)
		if (ref == name || !(ref in count)) continue
		k = (count[name] < count[ref]) ? count[name] : count[ref]
		delete r
		lo = 1e9; hi = 0
		for (i = 1; i <= k; i++) {
			r[i] = t[ref, i] / t[name, i]
			if (r[i] < lo) lo = r[i]
			if (r[i] > hi) hi = r[i]
		}
		printf "| %s | %.2f | %.2f | %.2f | %d |\n", name, median(r, k), lo, hi, k
	}
}
