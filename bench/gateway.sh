#!/usr/bin/env bash
# bench/gateway.sh: the gateways measured against the tunnel without them
# and against plain forwarding, in one run, on the same links.
#
# The namespaces of bench/tunnel.sh (host A, a router, host B) with
# Enclave agents on TUN devices in A and B, and on the router two
# gateways granted their pair, each reading every data packet (opens it,
# takes its inner 5-tuple, counts its flow, applies a policy, writes a
# flow log): one inline on netfilter queues 0 and 1, one a relay. Paths,
# measured in interleaved rounds:
#
#   plain      iperf3 between A's and B's underlay addresses, routed
#   tunnel     the agents' SA, routed by the router as plain UDP
#   inline-1q  the same SA with the router's iptables sending its data and
#              control packets to the inline gateway's queue 0
#   inline-2q  the same, spread over queues 0 and 1 (--queue-balance)
#   relay      the client agent restarted with --via the relay gateway
#
# (the rule is put in for the inline paths and taken out for the others).
# One table: TCP 1 and 4 streams, UDP 1400-byte datagrams, ping, CPU per
# GB of the whole machine and of the gateway process, with ratios to the
# tunnel and to plain forwarding. All processes share the machine's
# cores: a gateway's CPU per GB says what it needs on a machine of its
# own.
#
#   sudo bench/gateway.sh [SECONDS] [ROUNDS]
#       (default 10 s per iperf3 test, 3 rounds)
#
# To give the gateways cores of their own, run everything else on some
# cores and name the gateways' in GATEWAY_CPUS:
#
#   sudo GATEWAY_CPUS=1 taskset -c 0 bench/gateway.sh 10 3
#
# PATHS names the paths to measure (default all five), for a quicker run:
#
#   sudo PATHS="tunnel inline-2q" GATEWAY_CPUS=1 taskset -c 0 bench/gateway.sh 10 3
#
# Needs root. Installs iproute2, iperf3, iputils-ping, iptables, jq and curl with
# apt-get (--no-install-recommends) when missing. Removes everything it
# made when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
paths=${PATHS:-plain tunnel inline-1q inline-2q relay}
[ "$(id -u)" = 0 ] || { echo "bench/gateway.sh needs root (network namespaces, TUN devices, netfilter)" >&2; exit 1; }
export GOTOOLCHAIN=local PATH="$PATH:/usr/local/go/bin"

missing=""
for t in ip:iproute2 iperf3:iperf3 ping:iputils-ping iptables:iptables jq:jq curl:curl; do
	command -v "${t%%:*}" >/dev/null 2>&1 || missing="$missing ${t##*:}"
done
if [ -n "$missing" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
ipt=iptables
command -v iptables-legacy >/dev/null 2>&1 && ipt=iptables-legacy # xt_NFQUEUE, whatever nf_tables has

work=$(mktemp -d)
A=bgA$$ R=bgR$$ B=bgB$$
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for ns in $A $R $B; do ip netns del "$ns" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building enclave..." >&2
go build -o "$work/enclave" ./cmd/enclave
go test -c -o "$work/gateway.test" ./internal/gateway # raw AES-GCM, on the gateways' core
E="$work/enclave"

. bench/lib.sh
make_topology
echo "enclave agents on TUN, and the gateways on the router..." >&2
start_enclave
printf 'deny:\n  - {proto: tcp, dst_port: 5999}\n' >"$work/policy.yaml"
(cd "$work" && exec ip netns exec $R "$E" gateway --ca ca/ca.crt --cert certs/g.crt --key certs/g.key --keyserver 10.97.2.1:7443 \
	--nfqueue 0-1 --flow-log flows.jsonl --policy policy.yaml \
	--metrics-listen 127.0.0.1:9200 --status-socket inline.sock 2>"$work/gateway.log") & pids+=($!)
inline_pid=$!
(cd "$work" && exec ip netns exec $R "$E" gateway --ca ca/ca.crt --cert certs/gr.crt --key certs/gr.key --keyserver 10.97.2.1:7443 \
	--relay 10.97.1.1:1100 --relay-to 10.97.2.0/24 --flow-log relay-flows.jsonl --policy policy.yaml \
	--metrics-listen 127.0.0.1:9201 --status-socket relay.sock 2>"$work/relay.log") & pids+=($!)
relay_pid=$!
sleep 1
if [ -n "${GATEWAY_CPUS:-}" ]; then
	taskset -a -pc "$GATEWAY_CPUS" $inline_pid >/dev/null
	taskset -a -pc "$GATEWAY_CPUS" $relay_pid >/dev/null
	echo "gateways on CPUs $GATEWAY_CPUS, everything else on $(taskset -pc $$ | sed 's/.*: //')" >&2
fi
rule() {
	local spread=(--queue-num 0)
	[ "$2" = 2 ] && spread=(--queue-balance 0:1)
	inR $ipt -w "$1" FORWARD -p udp -m multiport --ports 1000,1001 -j NFQUEUE "${spread[@]}"
}

# raw_gcm prints raw AES-GCM's CPU seconds per GB opening the same
# 1400-byte packets (crypto/cipher, a prepared key) on the gateways' core,
# for the baseline: measured right after each gateway's test, as this
# VM's speed drifts between minutes.
cpu=${GATEWAY_CPUS:-$(taskset -pc $$ | sed 's/.*: //; s/[,-].*//')}
raw_gcm() {
	taskset -c "$cpu" "$work/gateway.test" -test.run '^$' -test.bench 'GatewayRun/raw$' -test.benchtime "$1" |
		awk '/MB\/s/{for (i = 1; i < NF; i++) if ($(i+1) == "MB/s") print 1000 / $i}'
}
results="$work/results" raws="$work/raws"
: >"$results"
: >"$raws"
for r in $(seq 1 "$rounds"); do
	for path in $paths; do
		echo "round $r of $rounds: $path..." >&2
		target=100.64.3.2 pid="" queues=${path#inline-} queues=${queues%q}
		case $path in
		plain) target=10.97.2.2 ;;
		inline-*) rule -I "$queues"; pid=$inline_pid ;;
		relay) start_client --via 10.97.1.1:1100 --mtu $((1432 - 10)); pid=$relay_pid ;; # room for the relay framing (IPv4: 10 bytes)
		esac
		echo "$r $(measure "$path" "$target" $pid)" >>"$results"
		[ -n "$pid" ] && echo "$r $path $(raw_gcm 1s)" >>"$raws"
		case $path in
		inline-*) rule -D "$queues" ;;
		relay) start_client ;;
		esac
	done
done

m() { inR curl -sf "127.0.0.1:$1/metrics" | awk -v k="$2" 'index($0, k" ") == 1 {print $2}'; }

# Mixed traffic through the inline gateway on two queues: allowed TCP (4
# streams) and UDP beside a flow its policy denies (connections to port
# 5999, tried over and over), to count the allowed datagrams dropped
# because a run they were in held a denied one.
has() { case " $paths " in *" $1 "*) return 0 ;; esac; return 1; }
if has inline-2q; then
echo "mixed traffic through inline-2q..." >&2
rule -I 2
inB iperf3 -s -D -B 100.64.3.2 --logfile "$work/iperf3-mixed.log"
inB iperf3 -s -D -B 100.64.3.2 -p 5202 --logfile "$work/iperf3-mixed-udp.log"
sleep 0.5
read0=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="read"}')
denied0=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="denied"}')
coll0=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="run_collateral"}')
timeout "$secs" bash -c "while :; do ip netns exec $A curl -s -m 0.2 http://100.64.3.2:5999/ >/dev/null; done" &
tries=$!
inA iperf3 -c 100.64.3.2 -t "$secs" -P 4 >/dev/null &
streams=$!
inA iperf3 -c 100.64.3.2 -p 5202 -u -l 1300 -b 300M -t "$secs" >/dev/null || true
wait "$streams" "$tries" 2>/dev/null || true
pkill -f "iperf3 -s -D -B 100.64.3.2" || true
rule -D 2
read1=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="read"}')
denied1=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="denied"}')
coll1=$(m 9200 'enclave_gateway_packets_total{kind="data",outcome="run_collateral"}')
fi
ratios=()
for q in inline-1q÷tunnel inline-2q÷tunnel relay÷tunnel inline-2q÷plain tunnel÷plain; do
	has "${q%÷*}" && has "${q#*÷}" && ratios+=("$q")
done
table "$paths" "${ratios[@]}"
echo "The inline gateway read $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="read"}') data packets, $(m 9200 'enclave_gateway_run_datagrams_total') of them in $(m 9200 'enclave_gateway_runs_total{outcome="passed"}') runs passed whole; runs dropped: $(m 9200 'enclave_gateway_runs_total{outcome="dropped"}'), datagrams dropped with their run: $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="run_collateral"}'), opaque: $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="opaque"}')."
has inline-2q && awk -v r0="$read0" -v r1="$read1" -v d0="$denied0" -v d1="$denied1" -v c0="$coll0" -v c1="$coll1" \
	'BEGIN{printf "Mixed traffic, %d s: %d datagrams read, %d denied, %d allowed ones dropped with their run (%.4f%% of those read).\n", '"$secs"', r1-r0, d1-d0, c1-c0, (r1>r0)?100*(c1-c0)/(r1-r0):0}'
echo "The relay read $(m 9201 'enclave_gateway_packets_total{kind="data",outcome="read"}') data packets, $(m 9201 'enclave_gateway_run_datagrams_total') of them in runs."

# The baseline in the same run: each gateway's CPU per GB of the
# transfer (1-stream TCP, the gateway process alone) divided by raw
# AES-GCM's, measured on the same core right after it, round by round.
echo
echo "Raw AES-GCM open of 1400-byte packets on CPU $cpu, s/GB, after each gateway's test: $(awk '{printf "%s%.3f", sep, $3; sep=", "}' "$raws")."
[ -s "$raws" ] && awk '
	function median(a, n,   i, j, t) {
		for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
		return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
	}
	FNR == NR { raw[$1, $2] = $3; next }
	$9 > 0 && raw[$1, $2] > 0 { n[$2]++; v[$2, n[$2]] = $9; q[$2, n[$2]] = $9 / raw[$1, $2] }
	END {
		printf "| gateway | its CPU s/GB (median) | ÷ raw AES-GCM open, median of rounds (lowest–highest) |\n|---|---|---|\n"
		for (p in n) {
			lo = 1e9; hi = 0
			for (i = 1; i <= n[p]; i++) { a[i] = v[p, i]; b[i] = q[p, i]; if (b[i] < lo) lo = b[i]; if (b[i] > hi) hi = b[i] }
			printf "| %s | %.3g | **%.2f** (%.2f–%.2f) |\n", p, median(a, n[p]), median(b, n[p]), lo, hi
		}
	}' "$raws" "$results"
