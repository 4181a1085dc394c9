package agent

import (
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the agent's Prometheus metrics, in a registry of their own.
type Metrics struct {
	registry   *prometheus.Registry
	handshakes *prometheus.CounterVec // side, result, reason
	drops      *prometheus.CounterVec // cause
	packets    *prometheus.CounterVec // direction
	bytes      *prometheus.CounterVec // direction
	sas        prometheus.Gauge
	// certExpires is when this agent's certificate chain ends (Unix s).
	certExpires prometheus.Gauge
	discovery   *prometheus.CounterVec // kind
	// intermediaries counts the server's side of §5.5 and §5.6: key
	// deliveries and rekey requests, by outcome.
	intermediaries *prometheus.CounterVec // kind, outcome
	// keyService counts this agent's requests to the key service, by RPC
	// (a rotation costs one GetServerKeys, however many SAs it moves).
	keyService *prometheus.CounterVec // rpc
	ended      *prometheus.CounterVec // reason
	// recovery counts what the agent did about peers that lost their
	// state: UnknownSA answers sent or ignored, handshakes they prompted,
	// keepalives sent and received.
	recovery *prometheus.CounterVec // event
	// serverKeys is how many hierarchy keys (SKs) a server holds, however
	// many SAs it serves.
	serverKeys prometheus.Gauge
	// The per-packet counters, resolved once: looking a label up per
	// packet would allocate.
	sentPackets, sentBytes, recvPackets, recvBytes prometheus.Counter
	// Inner packets over the MTU: fragmented, or answered with ICMP.
	fragmented, icmpSent prometheus.Counter
	// keepalives received (the data path counts them without a lookup).
	keepalives prometheus.Counter
}

func newMetrics() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_handshakes_total", Help: "Handshakes by side (initiator, responder), result (ok, refused, failed, cookie, dropped) and reason.",
		}, []string{"side", "result", "reason"}),
		drops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_drops_total", Help: "Packets dropped, by cause.",
		}, []string{"cause"}),
		packets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_packets_total", Help: "Inner packets carried, by direction (sent, received).",
		}, []string{"direction"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_bytes_total", Help: "Inner bytes carried, by direction.",
		}, []string{"direction"}),
		certExpires: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "enclave_agent_certificate_expiry_timestamp_seconds", Help: "When this agent's certificate (or its issuing CA) expires, Unix seconds: alert well before it; SAs end with it.",
		}),
		sas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "enclave_agent_sas", Help: "SAs up (each covers both directions).",
		}),
		discovery: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_discovery_disagreements_total", Help: "Enclave discovery disagreements and rejected path entries, by kind.",
		}, []string{"kind"}),
		intermediaries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_intermediary_total", Help: "Intermediaries' sessions, key deliveries (direct key exchange) and rekey requests (late join), by kind and outcome.",
		}, []string{"kind", "outcome"}),
		serverKeys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "enclave_agent_server_keys", Help: "Server keys SK(i,j,k,g) held (every peer enclave and accepted generation).",
		}),
		ended: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_sas_ended_total", Help: "SAs this agent ended on its own, by reason (lifetime, idle, superseded: a newer grant to the same client replaced one never used; key_withdrawn: the pair was forbidden; generation_retired: its generation was retired while its client still held it, and the client was told).",
		}, []string{"reason"}),
		recovery: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_recovery_total", Help: "Recovery from peers that lost their SAs, by event (unknown_sa_sent, unknown_sa_ignored, rekey, handshake, keepalive_sent, keepalive_received; rekey_retry_scheduled: a rekey failed and is tried again after a backoff).",
		}, []string{"event"}),
		keyService: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_agent_keyservice_requests_total", Help: "Requests this agent made to the key service, by RPC.",
		}, []string{"rpc"}),
	}
	m.sentPackets, m.sentBytes = m.packets.WithLabelValues("sent"), m.bytes.WithLabelValues("sent")
	m.recvPackets, m.recvBytes = m.packets.WithLabelValues("received"), m.bytes.WithLabelValues("received")
	m.keepalives = m.recovery.WithLabelValues("keepalive_received")
	m.fragmented = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "enclave_agent_fragmented_total", Help: "Inner IPv4 packets over the MTU (Don't Fragment clear) sent as fragments.",
	})
	m.icmpSent = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "enclave_agent_icmp_too_big_total", Help: "ICMP fragmentation-needed and ICMPv6 packet-too-big errors sent back for inner packets over the MTU.",
	})
	m.registry.MustRegister(m.handshakes, m.drops, m.packets, m.bytes, m.sas, m.certExpires, m.discovery, m.intermediaries, m.keyService, m.ended, m.recovery, m.serverKeys, m.fragmented, m.icmpSent,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Gatherer gives the metrics' current values (for tests and embedding).
func (m *Metrics) Gatherer() prometheus.Gatherer { return m.registry }

// Handler serves /metrics and /healthz, and, with profiling, Go's
// /debug/pprof endpoints (for finding where the data path spends its time).
func (m *Metrics) Handler(profiling bool) http.Handler {
	mux := http.NewServeMux()
	if profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	return mux
}

func (m *Metrics) handshake(side, result, reason string) {
	m.handshakes.WithLabelValues(side, result, reason).Inc()
}

func (m *Metrics) drop(cause string) { m.drops.WithLabelValues(cause).Inc() }
