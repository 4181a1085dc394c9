package keyserver

import (
	"context"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Metrics are the service's Prometheus metrics.
type Metrics struct {
	registry  *prometheus.Registry
	requests  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	issued    *prometheus.CounterVec
	rotations *prometheus.CounterVec
	refusals  *prometheus.CounterVec
	profiling bool
}

// NewMetrics registers the metrics in a registry of their own.
func NewMetrics() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_keyserver_requests_total", Help: "Requests by RPC and gRPC status code.",
		}, []string{"rpc", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "enclave_keyserver_request_seconds", Help: "Request latency by RPC.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"rpc"}),
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_keyserver_keys_issued_total", Help: "Keys issued by level.",
		}, []string{"level"}),
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_keyserver_rotations_total", Help: "Rotation decisions by outcome.",
		}, []string{"outcome"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "enclave_keyserver_refusals_total", Help: "Refused requests by RPC.",
		}, []string{"rpc"}),
	}
	m.registry.MustRegister(m.requests, m.latency, m.issued, m.rotations, m.refusals,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// auditWritable exports whether the audit log takes entries (1) or not
// (0: a full or read-only disk; no key is issued until it does).
func (m *Metrics) auditWritable(ok func() bool) {
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "enclave_keyserver_audit_writable", Help: "1 while the audit log takes entries; 0 while it cannot be written (no key is issued then).",
	}, func() float64 {
		if ok() {
			return 1
		}
		return 0
	}))
}

// watchers exports how many watch streams are open, in all and over
// each transport.
func (m *Metrics) watchers(n func() int, over func(transport string) int) {
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "enclave_keyserver_watchers", Help: "Watch streams open on this replica (bounded by --max-watchers; refusals count in enclave_keyserver_refusals_total{rpc=\"WatchGenerations\"}).",
	}, func() float64 { return float64(n()) }))
	for _, t := range []string{transportWatch, transportGRPC} {
		m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "enclave_keyserver_watch_streams", Help: "Watch streams open on this replica by what they go over: watch (the watch transport) or grpc (agents built before it, or behind a proxy).",
			ConstLabels: prometheus.Labels{"transport": t},
		}, func() float64 { return float64(over(t)) }))
	}
}

// Interceptors count and time every RPC.
func (m *Metrics) Interceptors() []grpc.ServerOption {
	observe := m.observe
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(ctx, req)
			observe(shortMethod(info.FullMethod), start, err)
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			start := time.Now()
			err := h(srv, ss)
			observe(shortMethod(info.FullMethod), start, err)
			return err
		}),
	}
}

// observe counts a request's end (nil m: nothing); the watch transport's
// streams count as gRPC's do.
func (m *Metrics) observe(method string, start time.Time, err error) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(method, status.Code(err).String()).Inc()
	m.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
}

func shortMethod(full string) string {
	for i := len(full) - 1; i >= 0; i-- {
		if full[i] == '/' {
			return full[i+1:]
		}
	}
	return full
}

// Profiling has Handler serve Go's /debug/pprof profiles too (where a key
// server's memory and time go; keep the address local).
func (m *Metrics) Profiling() { m.profiling = true }

// Handler serves /metrics, /healthz (the process is up) and /readyz (ready
// reports whether the service can answer: its store is reachable).
func (m *Metrics) Handler(ready func(context.Context) error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	if m.profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := ready(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}

func (m *Metrics) keyIssued(level string) {
	if m != nil {
		m.issued.WithLabelValues(level).Inc()
	}
}

func (m *Metrics) rotation(outcome string) {
	if m != nil {
		m.rotations.WithLabelValues(outcome).Inc()
	}
}

func (m *Metrics) refused(rpc string) {
	if m != nil {
		m.refusals.WithLabelValues(rpc).Inc()
	}
}
