#!/usr/bin/env bash
# bench/gateway.sh: the inline gateway measured against plain forwarding
# and against the tunnel without it, in one run, on the same links.
#
# The namespaces of bench/tunnel.sh (host A, a router, host B) with
# Enclave agents on TUN devices in A and B, and on the router an inline
# gateway granted their pair (it reads every data packet: opens it, takes
# its inner 5-tuple, counts its flow, applies a policy, writes a flow
# log). Three paths, measured in interleaved rounds:
#
#   plain    iperf3 between A's and B's underlay addresses, routed
#   tunnel   the agents' SA, routed by the router as plain UDP
#   gateway  the same SA with the router's iptables sending its data and
#            control packets to the gateway's netfilter queues
#
# (the rule is put in for the gateway path and taken out for the others).
# One table: TCP 1 and 4 streams, UDP 1400-byte datagrams, ping, CPU per
# GB, with ratios gateway ÷ tunnel and gateway ÷ plain.
#
#   sudo bench/gateway.sh [SECONDS] [ROUNDS] [QUEUES]
#       (default 10 s per iperf3 test, 3 rounds, 2 queues)
#
# Needs root. Installs iproute2, iperf3, iputils-ping, iptables, jq and curl with
# apt-get (--no-install-recommends) when missing. Removes everything it
# made when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
queues=${3:-2}
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
echo "enclave agents on TUN, and the gateway on the router..." >&2
start_enclave
printf 'deny:\n  - {proto: tcp, dst_port: 5999}\n' >"$work/policy.yaml"
(cd "$work" && exec ip netns exec $R "$E" gateway --ca ca/ca.crt --cert certs/g.crt --key certs/g.key --keyserver 10.97.2.1:7443 \
	--nfqueue "0-$((queues - 1))" --flow-log flows.jsonl --policy policy.yaml \
	--metrics-listen 127.0.0.1:9200 2>"$work/gateway.log") & pids+=($!)
sleep 1
rule() { inR $ipt -w "$1" FORWARD -p udp -m multiport --ports 1000,1001 -j NFQUEUE --queue-balance "0:$((queues - 1))"; }

results="$work/results"
: >"$results"
for r in $(seq 1 "$rounds"); do
	for path in "plain 10.97.2.2" "tunnel 100.64.3.2" "gateway 100.64.3.2"; do
		set -- $path
		echo "round $r of $rounds: $1..." >&2
		[ "$1" = gateway ] && rule -I
		echo "$r $(measure "$1" "$2")" >>"$results"
		[ "$1" = gateway ] && rule -D
	done
done

read=$(inR curl -sf 127.0.0.1:9200/metrics | awk '/^enclave_gateway_packets_total\{kind="data",outcome="read"\}/{print $2}')
opaque=$(inR curl -sf 127.0.0.1:9200/metrics | awk '/^enclave_gateway_packets_total\{kind="data",outcome="opaque"\}/{print $2}')
table "plain tunnel gateway" "gateway÷tunnel" "gateway÷plain" "tunnel÷plain"
echo "The gateway read ${read:-0} data packets and passed ${opaque:-0} it could not read, on $queues queues."
