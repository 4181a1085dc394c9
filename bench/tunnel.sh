#!/usr/bin/env bash
# bench/tunnel.sh: the tunnel measured against plain forwarding and
# wireguard-go, in one run, on the same links.
#
# Three network namespaces (host A, a router, host B; veth links, MTU
# 1500) carry, one after another: plain routed traffic, wireguard-go (the
# version pinned in go.mod, built here) and Enclave agents on TUN devices.
# Each gets iperf3 TCP (1 stream and 4 streams), iperf3 UDP (1400-byte
# datagrams; packets per second received), ping RTT (p50 and p99 of 200),
# and the CPU seconds the whole machine spent per GB of the 1-stream TCP
# test. One table, with ratios against wireguard-go and against plain.
# Each tunnel gets the largest MTU its overhead leaves on the 1500-byte
# IPv4 underlay: 1440 for wireguard-go (60 bytes), 1432 for Enclave (68:
# IPv4, UDP, PSP header, VC, tag), so a 1400-byte datagram is one packet.
#
#   sudo bench/tunnel.sh [SECONDS] [ROUNDS]   (default 10 s per iperf3 test, 3 rounds)
#
# All three paths stay up side by side and are measured in interleaved
# rounds (plain, wireguard-go, enclave; again...), as the machine's noise
# moves between minutes: the table gives each figure's median over the
# rounds, and each ratio's median of the per-round ratios with its lowest
# and highest.
#
# Needs root. Installs iproute2, iperf3, iputils-ping and wireguard-tools
# with apt-get (--no-install-recommends) when missing. Removes everything
# it made when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
[ "$(id -u)" = 0 ] || { echo "bench/tunnel.sh needs root (network namespaces, TUN devices)" >&2; exit 1; }
export GOTOOLCHAIN=local PATH="$PATH:/usr/local/go/bin"

missing=""
for t in ip:iproute2 iperf3:iperf3 ping:iputils-ping wg:wireguard-tools jq:jq; do
	command -v "${t%%:*}" >/dev/null 2>&1 || missing="$missing ${t##*:}"
done
if [ -n "$missing" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

work=$(mktemp -d)
A=bnA$$ R=bnR$$ B=bnB$$
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for ns in $A $R $B; do ip netns del "$ns" 2>/dev/null || true; done
	rm -f /var/run/wireguard/wga$$.sock /var/run/wireguard/wgb$$.sock
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building enclave and wireguard-go (go.mod's version)..." >&2
go build -o "$work/enclave" ./cmd/enclave
go build -o "$work/wireguard-go" golang.zx2c4.com/wireguard
E="$work/enclave"

. bench/lib.sh
make_topology

results="$work/results"
: >"$results"

echo "wireguard-go..." >&2
umask 077
wg genkey >"$work/wa.key"; wg pubkey <"$work/wa.key" >"$work/wa.pub"
wg genkey >"$work/wb.key"; wg pubkey <"$work/wb.key" >"$work/wb.pub"
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
# wireguard-go's control sockets live in /var/run/wireguard, shared by all
# namespaces: the two devices need names of their own.
wa=wga$$ wb=wgb$$
inA "$work/wireguard-go" -f $wa >"$work/wg-a.log" 2>&1 & pids+=($!)
inB "$work/wireguard-go" -f $wb >"$work/wg-b.log" 2>&1 & pids+=($!)
sleep 1
inA wg set $wa private-key "$work/wa.key" listen-port 51820 peer "$(cat "$work/wb.pub")" allowed-ips 10.77.0.2/32 endpoint 10.97.2.2:51820
inB wg set $wb private-key "$work/wb.key" listen-port 51820 peer "$(cat "$work/wa.pub")" allowed-ips 10.77.0.1/32 endpoint 10.97.1.2:51820
inA ip addr add 10.77.0.1/24 dev $wa; inA ip link set $wa mtu 1440 up
inB ip addr add 10.77.0.2/24 dev $wb; inB ip link set $wb mtu 1440 up

echo "enclave agents on TUN..." >&2
start_enclave

for r in $(seq 1 "$rounds"); do
	for path in "plain 10.97.2.2" "wireguard-go 10.77.0.2" "enclave 100.64.3.2"; do
		set -- $path
		echo "round $r of $rounds: $1..." >&2
		echo "$r $(measure "$1" "$2")" >>"$results"
	done
done

table "plain wireguard-go enclave" "enclave÷wireguard-go" "enclave÷plain" "wireguard-go÷plain"
