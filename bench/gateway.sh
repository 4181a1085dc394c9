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
# Needs root. Installs iproute2, iperf3, iputils-ping, iptables, jq and curl with
# apt-get (--no-install-recommends) when missing. Removes everything it
# made when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
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
rule() {
	local spread=(--queue-num 0)
	[ "$2" = 2 ] && spread=(--queue-balance 0:1)
	inR $ipt -w "$1" FORWARD -p udp -m multiport --ports 1000,1001 -j NFQUEUE "${spread[@]}"
}

results="$work/results"
: >"$results"
for r in $(seq 1 "$rounds"); do
	for path in plain tunnel inline-1q inline-2q relay; do
		echo "round $r of $rounds: $path..." >&2
		target=100.64.3.2 pid="" queues=${path#inline-} queues=${queues%q}
		case $path in
		plain) target=10.97.2.2 ;;
		inline-*) rule -I "$queues"; pid=$inline_pid ;;
		relay) start_client --via 10.97.1.1:1100 --mtu $((1432 - 10)); pid=$relay_pid ;; # room for the relay framing (IPv4: 10 bytes)
		esac
		echo "$r $(measure "$path" "$target" $pid)" >>"$results"
		case $path in
		inline-*) rule -D "$queues" ;;
		relay) start_client ;;
		esac
	done
done

m() { inR curl -sf "127.0.0.1:$1/metrics" | awk -v k="$2" 'index($0, k" ") == 1 {print $2}'; }
table "plain tunnel inline-1q inline-2q relay" "inline-1q÷tunnel" "inline-2q÷tunnel" "relay÷tunnel" "inline-2q÷plain" "tunnel÷plain"
echo "The inline gateway read $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="read"}') data packets, $(m 9200 'enclave_gateway_run_datagrams_total') of them in $(m 9200 'enclave_gateway_runs_total{outcome="passed"}') runs passed whole; runs dropped: $(m 9200 'enclave_gateway_runs_total{outcome="dropped"}'), datagrams dropped with their run: $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="run_collateral"}'), opaque: $(m 9200 'enclave_gateway_packets_total{kind="data",outcome="opaque"}')."
echo "The relay read $(m 9201 'enclave_gateway_packets_total{kind="data",outcome="read"}') data packets, $(m 9201 'enclave_gateway_run_datagrams_total') of them in runs."
