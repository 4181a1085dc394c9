# bench/lib.sh: what the network benchmarks share, sourced by
# bench/tunnel.sh and bench/gateway.sh after they set $work, $A, $R, $B,
# $secs and $rounds: the three namespaces (host A, a router, host B; veth
# links, MTU 1500; A at 10.97.1.2, B at 10.97.2.2), one measurement of a
# path (iperf3 TCP with 1 and 4 streams, UDP 1400-byte datagrams, ping RTT,
# CPU per GB) and the table of medians and per-round ratios.

# make_topology builds the namespaces and links.
make_topology() {
for ns in $A $R $B; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add vA netns $A type veth peer name vRA netns $R
ip link add vB netns $B type veth peer name vRB netns $R
ip -n $A addr add 10.97.1.2/24 dev vA; ip -n $R addr add 10.97.1.1/24 dev vRA
ip -n $R addr add 10.97.2.1/24 dev vRB; ip -n $B addr add 10.97.2.2/24 dev vB
for l in "$A vA" "$R vRA" "$R vRB" "$B vB"; do set -- $l; ip -n "$1" link set "$2" up; done
ip -n $A route add default via 10.97.1.1
ip -n $B route add default via 10.97.2.1
ip netns exec $R sysctl -qw net.ipv4.ip_forward=1
}
inA() { ip netns exec $A "$@"; }
inB() { ip netns exec $B "$@"; }
inR() { ip netns exec $R "$@"; }

# cpu_busy prints the machine's busy CPU seconds so far.
cpu_busy() { awk '/^cpu /{printf "%.2f\n", ($2+$3+$4+$7+$8)/100}' /proc/stat; }

# proc_cpu PID prints a process's CPU seconds so far (user and system).
proc_cpu() { awk '{printf "%.2f\n", ($14+$15)/100}' "/proc/$1/stat"; }

# measure LABEL TARGET [PID]: one line of figures for traffic to TARGET
# (B's address on whatever path is up); with PID, also that process's CPU
# per GB (a gateway's).
measure() {
	local label=$1 target=$2 pid=${3:-}
	inB iperf3 -s -D -B "$target" --logfile "$work/iperf3-$label.log"
	sleep 0.5
	inA ping -c 3 -W 2 "$target" >/dev/null # paths that set up on demand
	local c0 c1 p0=0 p1=0 tcp1 tcp4 udp
	c0=$(cpu_busy)
	[ -n "$pid" ] && p0=$(proc_cpu "$pid")
	tcp1=$(inA iperf3 -c "$target" -t "$secs" --json)
	[ -n "$pid" ] && p1=$(proc_cpu "$pid")
	c1=$(cpu_busy)
	tcp4=$(inA iperf3 -c "$target" -t "$secs" -P 4 --json)
	udp=$(inA iperf3 -c "$target" -t "$secs" -u -l 1400 -b 0 --json)
	local rtts
	rtts=$(inA ping -c 200 -i 0.01 -q -n "$target" >/dev/null 2>&1; inA ping -c 200 -i 0.01 -n "$target" | awk -F'time=' '/time=/{split($2,a," "); print a[1]}' | sort -n)
	pkill -f "iperf3 -s -D -B $target" || true
	stats "$label" "$tcp1" "$tcp4" "$udp" "$rtts" "$c0" "$c1" "$p0" "$p1"
}

# stats prints one line: label tcp1_gbps tcp4_gbps udp_kpps p50 p99
# cpu_s_per_gb process_cpu_s_per_gb, from iperf3's JSON and the sorted
# RTTs.
stats() {
	local label=$1 tcp1=$2 tcp4=$3 udp=$4 rtts=$5 c0=$6 c1=$7 p0=${8:-0} p1=${9:-0}
	local bps1 bps4 pkts bytes1 n p50 p99
	bps1=$(echo "$tcp1" | jq '.end.sum_received.bits_per_second // 0')
	bytes1=$(echo "$tcp1" | jq '.end.sum_received.bytes // 0')
	bps4=$(echo "$tcp4" | jq '.end.sum_received.bits_per_second // 0')
	pkts=$(echo "$udp" | jq '(.end.sum_received.packets // (.end.sum.packets - .end.sum.lost_packets)) // 0')
	n=$(echo "$rtts" | grep -c . || true)
	p50=$(echo "$rtts" | awk -v n="$n" 'NR==int(n*0.50+0.5){print; exit}')
	p99=$(echo "$rtts" | awk -v n="$n" 'NR==int(n*0.99+0.5){print; exit}')
	awk -v l="$label" -v b1="$bps1" -v b4="$bps4" -v pk="$pkts" -v s="$secs" -v p50="${p50:-0}" -v p99="${p99:-0}" \
		-v c0="$c0" -v c1="$c1" -v q0="$p0" -v q1="$p1" -v by="$bytes1" \
		'BEGIN{gb=by/1e9; printf "%s %.2f %.2f %.1f %s %s %.2f %.2f\n", l, b1/1e9, b4/1e9, pk/s/1000, p50, p99, (gb>0)?(c1-c0)/gb:0, (gb>0)?(q1-q0)/gb:0}'
}


# table PATHS BASE...: prints the figures of each path (in the order of
# PATHS, a space-separated list) and, for each "X÷Y" in the rest, the
# ratios of X to Y, from $results (lines: round path figures...).
table() {
	local paths=$1; shift
	echo
	awk -v secs="$secs" -v rounds="$rounds" -v paths="$paths" -v ratios="$*" '
	function median(a, n,   i, j, t) { # sorts a[1..n] in place
		for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
		return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
	}
	# ratio prints x ÷ y per figure: the median of the rounds, lowest–highest.
	function ratio(x, y,   q, k, r, lo, hi, t, a) {
		printf "| %s ÷ %s |", x, y
		for (q = 1; q <= 5; q++) {
			k = (q == 5) ? 6 : q; lo = 1e9; hi = -1e9
			for (r = 1; r <= rounds; r++) {
				t = (v[y, r, k] > 0) ? v[x, r, k] / v[y, r, k] : 0
				a[r] = t; if (t < lo) lo = t; if (t > hi) hi = t
			}
			printf " **%.2f** (%.2f–%.2f) |", median(a, rounds), lo, hi
		}
		printf "\n"
	}
	{ r = $1; l = $2; for (k = 1; k <= 7; k++) v[l, r, k] = $(k+2) + 0; if ($9 > 0) gwcol = 1; seen[l] = 1 }
	END {
		n = split(paths, order, " ")
		names[1] = "TCP 1 stream Gbit/s"; names[2] = "TCP 4 streams Gbit/s"; names[3] = "UDP 1400 B kpps"
		names[4] = "ping p50 ms"; names[5] = "ping p99 ms"; names[6] = "CPU s/GB"; names[7] = "gateway CPU s/GB"
		cols = gwcol ? 7 : 6
		printf "| path |"; for (k = 1; k <= cols; k++) printf " %s |", names[k]; printf "\n|"; for (k = 0; k <= cols; k++) printf "---|"; printf "\n"
		for (i = 1; i <= n; i++) {
			l = order[i]; printf "| %s |", l
			for (k = 1; k <= cols; k++) { for (r = 1; r <= rounds; r++) a[r] = v[l, r, k]; printf " %.3g |", median(a, rounds) }
			printf "\n"
		}
		printf "\n| ratio (median of rounds, lowest–highest) | TCP 1 stream | TCP 4 streams | UDP kpps | ping p50 | CPU per GB |\n|---|---|---|---|---|---|\n"
		m = split(ratios, rs, " ")
		for (i = 1; i <= m; i++) { split(rs[i], xy, "÷"); ratio(xy[1], xy[2]) }
		printf "\n%d rounds; %d s per iperf3 test; ping: 200 at 10 ms intervals; CPU: the whole machine during the 1-stream test", rounds, secs
		if (gwcol) printf "; gateway CPU: the gateway process alone, same test"
		printf ".\n"
	}' "$results"
}

# start_enclave starts Enclave in the namespaces, with $E the enclave
# binary: a key server on the router (10.97.2.1:7443), a server agent in B
# (100.64.3.2, MTU 1432) and a client agent in A routed to it, on TUN
# devices; gateway certificates (certs/g.* and certs/gr.*, standing in
# enclave 7, granted pair 3-7) for bench/gateway.sh.
start_enclave() {
	(
		cd "$work"
		"$E" ca init --dir ca --org bench.example >/dev/null
		"$E" cert issue --ca ca --name ks --role keyserver --host 10.97.2.1 --out certs >/dev/null
		"$E" cert issue --ca ca --name admin --role admin --out certs >/dev/null
		"$E" cert issue --ca ca --name b --role server --enclave 3 --server-id 1 --ip 100.64.3.2/16 --out certs >/dev/null
		"$E" cert issue --ca ca --name a --role client --enclave 7 --ip 100.64.7.2/16 --out certs >/dev/null
		"$E" cert issue --ca ca --name g --role gateway --enclave 7 --out certs >/dev/null
		"$E" cert issue --ca ca --name gr --role gateway --enclave 7 --out certs >/dev/null
		"$E" keys generate --out kek >/dev/null
	)
	(cd "$work" && exec ip netns exec $R "$E" keyserver --ca ca/ca.crt --cert certs/ks.crt --key certs/ks.key --store ks.db --audit audit.log \
		--kek-file kek --listen 10.97.2.1:7443 --metrics-listen "" 2>"$work/ks.log") & pids+=($!)
	adm() { (cd "$work" && ip netns exec $R "$E" admin --keyserver 10.97.2.1:7443 --ca ca/ca.crt --cert certs/admin.crt --key certs/admin.key "$@" >/dev/null); }
	adm enclave add --id 3 --name b; adm enclave add --id 7 --name a
	adm device add --name b --role server --enclave 3 --server-id 1
	adm device add --name a --role client --enclave 7
	adm pair allow 3-7
	adm device add --name g --role gateway --enclave 7
	adm grant add --device g --pairs 3-7
	adm device add --name gr --role gateway --enclave 7
	adm grant add --device gr --pairs 3-7
	(cd "$work" && exec ip netns exec $B "$E" agent --ca ca/ca.crt --cert certs/b.crt --key certs/b.key --keyserver 10.97.2.1:7443 \
		--listen 10.97.2.2 --tun enc0 --mtu 1432 ${ENCLAVE_AGENT_FLAGS:-} 2>"$work/agent-b.log") & pids+=($!)
	start_client
}

# start_client [FLAGS...] starts the client agent in A (again), with more
# flags (--via for a relay); its process id is $client_pid.
start_client() {
	if [ -n "${client_pid:-}" ]; then
		kill "$client_pid" 2>/dev/null || true
		wait "$client_pid" 2>/dev/null || true
	fi
	(cd "$work" && exec ip netns exec $A "$E" agent --ca ca/ca.crt --cert certs/a.crt --key certs/a.key \
		--listen 10.97.1.2 --tun enc0 --mtu 1432 --peer 100.64.3.0/24=10.97.2.2 ${ENCLAVE_AGENT_FLAGS:-} "$@" 2>>"$work/agent-a.log") &
	client_pid=$!
	pids+=($client_pid)
	sleep 1
}
