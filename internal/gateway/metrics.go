package gateway

import (
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/enclavekeys/enclave/internal/registry"
)

// Metrics are the gateway's Prometheus metrics, in a registry of their own.
type Metrics struct {
	names    *pairNames // the pair label, as operators write pairs
	registry *prometheus.Registry
	packets  *prometheus.CounterVec // kind (data, control), outcome
	pairs    *prometheus.CounterVec // pair, outcome (read, opaque)
	sessions *prometheus.CounterVec // outcome
	exchange *prometheus.CounterVec // outcome
	late     *prometheus.CounterVec // outcome
	// runs counts segmentation-offloaded runs taken whole, by outcome
	// (passed, dropped, size_unknown), and runDatagrams the datagrams in them.
	runs         *prometheus.CounterVec
	runDatagrams prometheus.Counter
	runOut       map[string]prometheus.Counter
	keys         prometheus.Gauge
	delivered    prometheus.Gauge
	certExpires  prometheus.Gauge
	flows        prometheus.Gauge
	// policyReloads counts policies put in force while running (SIGHUP).
	policyReloads prometheus.Counter
	// blindWindow observes how long each pair's packets were held
	// unread before the gateway could read the pair again.
	blindWindow prometheus.Histogram

	// Per-packet counters are resolved once (a label lookup per packet
	// would allocate); per-pair ones once per pair, up to maxPairLabels,
	// in a sync.Map: the packets of every queue read it without a lock.
	mu      sync.Mutex // making a pair's counter
	byPair  sync.Map   // pairOutcome -> prometheus.Counter
	nPairs  int
	dataOut map[string]prometheus.Counter
	// dataRead is dataOut["read"], the outcome of nearly every packet,
	// without the map lookup.
	dataRead prometheus.Counter
}

type pairOutcome struct {
	p       registry.Pair
	outcome string
}

// maxPairLabels bounds the pair label's values; past it, pairs count as
// "other".
const maxPairLabels = 4096

func newMetrics() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		packets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_packets_total", Help: "Packets judged, by kind (data, control) and outcome (data: read, opaque, denied, forged, malformed, no_vc (a PSP packet without a VC in the clear: no key derives from it), keepalive, unseen by the gateway, relay_refused, run_collateral (passed the gateway's judgement but dropped with its run), gso_control (a control-port run: dropped), held (a packet of a granted pair the gateway cannot read yet: dropped unread, unless --fail-open), nudged (an SA's ends told it is not held, so that its client makes a new SA whose keys the gateway gets), nudge_limited (not told: that address had its share, 64 then one every 10 s); control: tagged, tagged_apart (its entry sent apart, a stub in the handshake: with the entry the handshake would outgrow a 1280-byte packet), untagged (full, or an initiation with no room even for a stub), untagged_response (a Response with no room for an entry within a 1280-byte packet: by design, no one reads a Response's path record), untagged_amplification (passed untagged: the entry would have sent more than 3x what came towards an address that never answered as a server), passed, malformed, rate_limited (a source past its share of tagged handshakes: its initiations dropped, its Responses passed untagged)).",
		}, []string{"kind", "outcome"}),
		pairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_pair_packets_total", Help: "Data packets by enclave pair and whether the gateway read them or passed them opaque.",
		}, []string{"pair", "outcome"}),
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_sessions_total", Help: "The gateway's own control sessions with servers, by outcome.",
		}, []string{"outcome"}),
		exchange: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_key_exchange_total", Help: "Direct key exchange: SA keys delivered, refusals, by outcome.",
		}, []string{"outcome"}),
		late: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_late_join_total", Help: "Late-join rekey requests, by outcome.",
		}, []string{"outcome"}),
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_gateway_runs_total", Help: "Segmentation-offloaded runs of data packets taken whole, by outcome: passed (every datagram passed), dropped (one was denied, forged or malformed: the run is dropped whole), size_unknown (its segment size was not given by the kernel: dropped unread), malformed (its UDP length leaves part of it out, which the kernel would still deliver: dropped unread); on a relay, which forwards datagram by datagram, dropped_datagrams (some of its datagrams were dropped, the others went on).",
		}, []string{"outcome"}),
		runDatagrams: prometheus.NewCounter(prometheus.CounterOpts{Name: "enclave_gateway_run_datagrams_total", Help: "Data packets judged inside segmentation-offloaded runs (each also counted by its outcome)."}),
		runOut:       map[string]prometheus.Counter{},
		keys:         prometheus.NewGauge(prometheus.GaugeOpts{Name: "enclave_gateway_pair_keys", Help: "Pair keys held (every generation)."}),
		delivered:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "enclave_gateway_delivered_sa_keys", Help: "SA direction keys held from direct key exchange."}),
		certExpires:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "enclave_gateway_certificate_expiry_timestamp_seconds", Help: "When this gateway's certificate (or its issuing CA) expires, Unix seconds: alert well before it; its sessions with servers end with it."}),
		flows:        prometheus.NewGauge(prometheus.GaugeOpts{Name: "enclave_gateway_flows", Help: "Inner flows being tracked."}),
		dataOut:      map[string]prometheus.Counter{},
		blindWindow: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "enclave_gateway_blind_window_seconds",
			Help:    "How long a granted pair's packets were held (dropped unread, without --fail-open) from the first held packet until the gateway read the pair again.",
			Buckets: []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60}}),
		policyReloads: prometheus.NewCounter(prometheus.CounterOpts{Name: "enclave_gateway_policy_reloads_total", Help: "Policies put in force while the gateway runs (SIGHUP)."}),
	}
	m.registry.MustRegister(m.packets, m.pairs, m.runs, m.runDatagrams, m.sessions, m.exchange, m.late, m.keys, m.delivered, m.certExpires, m.flows, m.policyReloads, m.blindWindow,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, o := range []string{"read", "opaque", "denied", "forged", "malformed", "no_vc", "inner_malformed", "keepalive", "not_udp", "fragment_dropped", "failed", "unseen", "relay_refused", "relay_evicted", "run_collateral", "gso_control", "held", "nudged", "nudge_limited"} {
		m.dataOut[o] = m.packets.WithLabelValues("data", o)
	}
	m.dataRead = m.dataOut["read"]
	for _, o := range []string{"passed", "dropped", "size_unknown", "malformed", "dropped_datagrams"} {
		m.runOut[o] = m.runs.WithLabelValues(o)
	}
	for _, o := range []string{"tagged", "tagged_apart", "untagged", "untagged_response", "untagged_amplification", "passed", "malformed", "rate_limited"} {
		m.dataOut["control/"+o] = m.packets.WithLabelValues("control", o)
	}
	return m
}

// Handler serves /metrics and /healthz.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	return mux
}

// Registry is the metrics' registry (for tests and embedding).
func (m *Metrics) Registry() *prometheus.Registry { return m.registry }

func (m *Metrics) data(outcome string) { m.dataOut[outcome].Inc() }

func (m *Metrics) dataN(outcome string, n float64) { m.dataOut[outcome].Add(n) }

// run counts a run taken whole and its datagrams.
func (m *Metrics) run(outcome string, datagrams int) {
	m.runOut[outcome].Inc()
	m.runDatagrams.Add(float64(datagrams))
}

func (m *Metrics) control(outcome string) { m.dataOut["control/"+outcome].Inc() }

func (m *Metrics) pair(p registry.Pair, outcome string) prometheus.Counter {
	k := pairOutcome{p, outcome}
	if c, ok := m.byPair.Load(k); ok {
		return c.(prometheus.Counter)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if c, ok := m.byPair.Load(k); ok {
		return c.(prometheus.Counter)
	}
	if m.nPairs >= maxPairLabels {
		return m.pairs.WithLabelValues("other", outcome)
	}
	c := m.pairs.WithLabelValues(m.names.of(p), outcome)
	m.byPair.Store(k, c)
	m.nPairs++
	return c
}

func (m *Metrics) session(outcome string)     { m.sessions.WithLabelValues(outcome).Inc() }
func (m *Metrics) keyExchange(outcome string) { m.exchange.WithLabelValues(outcome).Inc() }
func (m *Metrics) lateJoin(outcome string)    { m.late.WithLabelValues(outcome).Inc() }
