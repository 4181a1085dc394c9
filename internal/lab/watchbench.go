package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/keyserver"
)

// The watcher scale bench (enclave bench watchers): a key server, a
// process of this binary, serves W watch streams, one per server device,
// each over its own mutual-TLS connection made with its own certificate,
// as W agents would; then a pair rotates and the time until the last
// watcher hears of it is measured.

// WatchersConfig sets up a watcher bench run.
type WatchersConfig struct {
	Watchers int // watch streams (default 10,000)
	Opening  int // connections being opened at once (default 64)
	// Transport is what the watchers watch over: "watch" (the watch
	// transport, as agents do; the default) or "grpc" (gRPC's stream,
	// as agents did before it and do with a key server without it).
	Transport string
	// Fetch: each watcher also fetches its server keys over gRPC and
	// keeps that connection, as a server agent does for a while after
	// each call (keyserver.GRPCIdle): the per-agent cost at its peak.
	Fetch    bool
	Progress io.Writer
	Terminal bool
}

// WatchersReport is what a watcher bench run measured.
type WatchersReport struct {
	Watchers    int     `json:"watchers"`
	Transport   string  `json:"transport"`
	Fetch       bool    `json:"fetch"`
	OpenSeconds float64 `json:"open_seconds"`
	// Key-server memory with the watchers, over that before them, per
	// watcher (resident and Go heap in use), and its CPU per connection
	// opened (TLS handshake, authorisation, snapshot).
	RSSPerWatcher    float64 `json:"server_rss_bytes_per_watcher"`
	HeapPerWatcher   float64 `json:"server_heap_bytes_per_watcher"`
	StackPerWatcher  float64 `json:"server_stack_bytes_per_watcher"`
	ServerRSSBytes   float64 `json:"server_rss_bytes"`
	CPUPerWatcherMs  float64 `json:"server_cpu_ms_per_watcher_opened"`
	ServerGoroutines float64 `json:"server_goroutines"`
	// The rotation: from the admin's call until each watcher heard of it.
	RotationP50ms float64 `json:"rotation_p50_ms"`
	RotationMaxMs float64 `json:"rotation_all_ms"`
	RotationHeard int     `json:"rotation_heard"`
	// RotationCPUPerWatcherUs is the key server's CPU for the rotation,
	// per watcher told.
	RotationCPUPerWatcherUs float64 `json:"rotation_server_cpu_us_per_watcher"`
	Goals                   []Goal  `json:"goals"`
	Seconds                 float64 `json:"seconds"`
}

// RunWatchers runs the watcher bench.
func RunWatchers(ctx context.Context, cfg WatchersConfig) (*WatchersReport, error) {
	if cfg.Watchers <= 0 {
		cfg.Watchers = 10_000
	}
	if cfg.Opening <= 0 {
		cfg.Opening = 64
	}
	switch cfg.Transport {
	case "":
		cfg.Transport = "watch"
	case "watch", "grpc":
	default:
		return nil, fmt.Errorf("lab: transport %q: want watch or grpc", cfg.Transport)
	}
	// Each process holds a file per connection: the generator and the
	// key server (which inherits this limit) one or two per watcher.
	per := 1
	if cfg.Transport == "watch" && cfg.Fetch {
		per = 2
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur != ^uint64(0) && uint64(per*cfg.Watchers+500) > lim.Cur {
		return nil, fmt.Errorf("lab: %d watchers need %d open files in each process, over this one's limit of %d (ulimit -n): fewer watchers, or a higher limit", cfg.Watchers, per*cfg.Watchers+500, lim.Cur)
	}
	progress := progressFunc(cfg.Progress, cfg.Terminal)
	start := time.Now()
	ks, _, done, err := benchKeyServer("watchers", progress, "--max-watchers", fmt.Sprint(cfg.Watchers+100))
	if err != nil {
		return nil, err
	}
	defer done()
	admin, closeAdmin, err := ks.admin()
	if err != nil {
		return nil, err
	}
	defer closeAdmin()
	for _, f := range []func() error{
		func() error {
			_, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "servers"})
			return err
		},
		func() error {
			_, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "clients"})
			return err
		},
		func() error { _, err := admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 7}); return err },
	} {
		if err := f(); err != nil {
			return nil, fmt.Errorf("lab: setting up the registry: %w", err)
		}
	}
	ids := make([]ca.Identity, cfg.Watchers)
	for i := range ids {
		ids[i] = ca.Identity{Name: fmt.Sprintf("server%06d", i+1), Role: ca.RoleServer, Enclave: 3, ServerID: keys.ServerID(i + 1), HasServerID: true}
	}
	progress("registering %d servers", cfg.Watchers)
	if err := parallel(ctx, 8, len(ids), func(i int) error {
		k := uint32(ids[i].ServerID)
		_, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: ids[i].Name, Role: "server", Enclave: 3, ServerId: &k})
		return err
	}); err != nil {
		return nil, fmt.Errorf("lab: registering servers: %w", err)
	}
	rep := &WatchersReport{Watchers: cfg.Watchers, Transport: cfg.Transport, Fetch: cfg.Fetch}
	ks.metrics.collect()
	time.Sleep(time.Second)
	rss0, heap0, stack0, cpu0 := ks.rss(), heapInUse(ks), stackInUse(ks), ks.cpu()

	// Each watcher: its own certificate, connection and stream; it waits
	// for the snapshot, then for a rotation.
	type watcher struct {
		conn  *grpc.ClientConn
		heard atomic.Int64 // unix nanoseconds the rotation arrived
	}
	ws := make([]*watcher, cfg.Watchers)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var streams sync.WaitGroup
	defer func() {
		cancel()
		for _, w := range ws {
			if w != nil && w.conn != nil {
				w.conn.Close()
			}
		}
		streams.Wait()
	}()
	progress("opening %d watch streams", cfg.Watchers)
	t0 := time.Now()
	err = parallel(ctx, cfg.Opening, cfg.Watchers, func(i int) error {
		w := &watcher{}
		ws[i] = w
		var stream api.KeyService_WatchGenerationsClient
		if cfg.Transport == "watch" {
			creds, err := ks.o.tlsCreds(ids[i])
			if err != nil {
				return err
			}
			if stream, err = keyserver.OpenWatch(wctx, ks.addr, "127.0.0.1", creds, &api.WatchGenerationsRequest{}); err != nil {
				return err
			}
		}
		if cfg.Transport == "grpc" || cfg.Fetch {
			conn, err := ks.dial(ids[i])
			if err != nil {
				return err
			}
			w.conn = conn
			if cfg.Fetch {
				if _, err := api.NewKeyServiceClient(conn).GetServerKeys(wctx, &api.GetServerKeysRequest{}); err != nil {
					return fmt.Errorf("%s: fetching its keys: %w", ids[i].Name, err)
				}
			}
		}
		if cfg.Transport == "grpc" {
			var err error
			if stream, err = api.NewKeyServiceClient(w.conn).WatchGenerations(wctx, &api.WatchGenerationsRequest{}); err != nil {
				return err
			}
		}
		for {
			ev, err := stream.Recv()
			if err != nil {
				return fmt.Errorf("%s: before its snapshot ended: %w", ids[i].Name, err)
			}
			if ev.GetKind() == api.GenerationEvent_SNAPSHOT_DONE {
				break
			}
		}
		streams.Add(1)
		go func() {
			defer streams.Done()
			for {
				ev, err := stream.Recv()
				if err != nil {
					return
				}
				if ev.GetKind() == api.GenerationEvent_ROTATED {
					w.heard.CompareAndSwap(0, time.Now().UnixNano())
				}
			}
		}()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: opening watch streams: %w", err)
	}
	rep.OpenSeconds = time.Since(t0).Seconds()
	cpu1 := ks.cpu()
	ks.metrics.collect()
	time.Sleep(time.Second)
	rss1, heap1, stack1 := ks.rss(), heapInUse(ks), stackInUse(ks)
	if path := os.Getenv("ENCLAVE_BENCH_HEAP_PROFILE"); path != "" { // where the key server's memory goes
		ks.metrics.saveProfile("/debug/pprof/heap", path)
	}
	rep.ServerRSSBytes = rss1
	rep.RSSPerWatcher = (rss1 - rss0) / float64(cfg.Watchers)
	rep.HeapPerWatcher = (heap1 - heap0) / float64(cfg.Watchers)
	rep.StackPerWatcher = (stack1 - stack0) / float64(cfg.Watchers)
	rep.CPUPerWatcherMs = (cpu1 - cpu0) * 1000 / float64(cfg.Watchers)
	rep.ServerGoroutines = ks.metrics.value("go_goroutines")

	progress("rotating pair 3-7 under %d watchers", cfg.Watchers)
	cpu2 := ks.cpu()
	t0 = time.Now()
	if _, err := admin.Rotate(ctx, &api.RotateRequest{Pair: &api.Pair{A: 3, B: 7}, Now: true}); err != nil {
		return nil, fmt.Errorf("lab: rotate --now: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	var lat []float64
	for time.Now().Before(deadline) {
		lat = lat[:0]
		for _, w := range ws {
			if at := w.heard.Load(); at != 0 {
				lat = append(lat, float64(at-t0.UnixNano())/1e6)
			}
		}
		if len(lat) == cfg.Watchers {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	rep.RotationCPUPerWatcherUs = (ks.cpu() - cpu2) * 1e6 / float64(cfg.Watchers)
	rep.RotationHeard = len(lat)
	if len(lat) == 0 {
		return nil, errors.New("lab: no watcher heard of the rotation within 30 s")
	}
	slices.Sort(lat)
	rep.RotationP50ms, rep.RotationMaxMs = lat[len(lat)/2], lat[len(lat)-1]
	if len(lat) < cfg.Watchers {
		rep.RotationMaxMs = 30_000
	}
	rep.Goals = []Goal{
		{Name: "key-server memory per watcher (resident)", Want: "<= 51200", Got: rep.RSSPerWatcher, Unit: "B", Met: rep.RSSPerWatcher <= 50<<10},
		{Name: "a rotation reaching every watcher", Want: "< 1000", Got: rep.RotationMaxMs, Unit: "ms", Met: rep.RotationMaxMs < 1000},
	}
	rep.Seconds = time.Since(start).Seconds()
	if cfg.Terminal {
		fmt.Fprint(cfg.Progress, "\r\033[K")
	}
	return rep, nil
}

// heapInUse is the key server's Go heap in use.
func heapInUse(ks *ksProc) float64 {
	return ks.metrics.value("go_memstats_heap_inuse_bytes")
}

// stackInUse is the key server's goroutine stacks in use.
func stackInUse(ks *ksProc) float64 {
	return ks.metrics.value("go_memstats_stack_inuse_bytes")
}

// parallel runs f(0..n-1) with at most k at once, and returns the first
// error (the rest not started after it).
func parallel(ctx context.Context, k, n int, f func(i int) error) error {
	var next atomic.Int64
	var first atomic.Pointer[error]
	var wg sync.WaitGroup
	for range min(k, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || first.Load() != nil || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					first.CompareAndSwap(nil, &err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if e := first.Load(); e != nil {
		return *e
	}
	return ctx.Err()
}
