package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/visibility"
)

// The registry scale bench (enclave bench registry): a key server, a
// process of this binary on a bbolt store, registers N devices through
// its admin API (real mTLS, real audit log); the cost of one more device
// is measured near the start and at N, then a restart, the visibility
// map and a dry run at N.

// RegistryConfig sets up a registry bench run.
type RegistryConfig struct {
	Devices int // devices to register (default 100,000)
	Workers int // admin requests in flight while filling (default 8)
	Sample  int // adds measured one by one at each end (default 200)
	// Progress gets a line while it runs (rewritten in place on a
	// terminal).
	Progress io.Writer
	Terminal bool
}

// AddCost is the cost of registering one device, measured over Sample
// adds made one after another.
type AddCost struct {
	DevicesBefore int     `json:"devices_before"`
	Adds          int     `json:"adds"`
	P50ms         float64 `json:"p50_ms"`
	P99ms         float64 `json:"p99_ms"`
	MeanMs        float64 `json:"mean_ms"`
	// ServerCPUms is the key server's CPU time per add.
	ServerCPUms float64 `json:"server_cpu_ms_per_add"`
}

// Goal is one of issue 36's goals, as measured.
type Goal struct {
	Name string  `json:"name"`
	Want string  `json:"want"`
	Got  float64 `json:"got"`
	Unit string  `json:"unit"`
	Met  bool    `json:"met"`
}

// RegistryReport is what a registry bench run measured.
type RegistryReport struct {
	Devices       int     `json:"devices"`
	Workers       int     `json:"workers"`
	FillSeconds   float64 `json:"fill_seconds"`
	FillPerSecond float64 `json:"fill_devices_per_second"`
	AddFirst      AddCost `json:"add_near_start"`
	AddLast       AddCost `json:"add_at_n"`
	// AddRatio is the median add at N over the median add near the start.
	AddRatio float64 `json:"add_ratio"`
	// RestartReadySeconds is from the key server's start (SIGTERM'd
	// before) to its /readyz answering 200, on the store of N devices.
	RestartReadySeconds float64 `json:"restart_ready_seconds"`
	StatusSeconds       float64 `json:"status_seconds"`
	MapSeconds          float64 `json:"map_seconds"`
	DryRunSeconds       float64 `json:"dry_run_seconds"`
	StoreBytes          int64   `json:"store_bytes"`
	AuditBytes          int64   `json:"audit_log_bytes"`
	ServerRSSBytes      float64 `json:"server_rss_bytes"`
	Goals               []Goal  `json:"goals"`
	Seconds             float64 `json:"seconds"`
}

// RunRegistry runs the registry bench.
func RunRegistry(ctx context.Context, cfg RegistryConfig) (*RegistryReport, error) {
	if cfg.Devices <= 0 {
		cfg.Devices = 100_000
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 8
	}
	if cfg.Sample <= 0 {
		cfg.Sample = 200
	}
	if cfg.Devices < 2*cfg.Sample+100 {
		return nil, fmt.Errorf("lab: --devices %d: want at least %d (the adds measured at each end, and 100 before them)", cfg.Devices, 2*cfg.Sample+100)
	}
	start := time.Now()
	progress := progressFunc(cfg.Progress, cfg.Terminal)
	ks, dir, done, err := benchKeyServer("registry", progress)
	if err != nil {
		return nil, err
	}
	defer done()
	admin, closeAdmin, err := ks.admin()
	if err != nil {
		return nil, err
	}
	defer func() { closeAdmin() }()
	rep := &RegistryReport{Devices: cfg.Devices, Workers: cfg.Workers}
	// Servers in enclave 3, clients in enclave 7 with an address block
	// (each client is handed the next free address), pair 3-7 allowed, a
	// gateway granted it.
	setup := []func() error{
		func() error {
			_, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "servers"})
			return err
		},
		func() error {
			_, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 7, Name: "clients", Addresses: "100.64.0.0/10", Network: "100.64.0.0/10"})
			return err
		},
		func() error { _, err := admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 7}); return err },
		func() error {
			_, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "gw", Role: "gateway"})
			return err
		},
		func() error {
			_, err := admin.AddGrant(ctx, &api.AddGrantRequest{Device: "gw", Pairs: []*api.Pair{{A: 3, B: 7}}})
			return err
		},
	}
	for _, f := range setup {
		if err := f(); err != nil {
			return nil, fmt.Errorf("lab: setting up the registry: %w", err)
		}
	}
	var next atomic.Int64 // devices registered by the bench
	add := func(ctx context.Context) error {
		n := next.Add(1)
		req := &api.AddDeviceRequest{Name: fmt.Sprintf("client%07d", n), Role: "client", Enclave: 7}
		if n%10 == 0 { // one in ten a server
			id := uint32(n/10 + 1)
			req = &api.AddDeviceRequest{Name: fmt.Sprintf("server%07d", n), Role: "server", Enclave: 3, ServerId: &id}
		}
		_, err := admin.AddDevice(ctx, req)
		return err
	}
	measure := func() (AddCost, error) {
		c := AddCost{DevicesBefore: int(next.Load()) + 1, Adds: cfg.Sample}
		lat := make([]float64, 0, cfg.Sample)
		cpu0 := ks.cpu()
		for range cfg.Sample {
			t := time.Now()
			if err := add(ctx); err != nil {
				return c, err
			}
			lat = append(lat, float64(time.Since(t).Microseconds())/1000)
		}
		c.ServerCPUms = (ks.cpu() - cpu0) * 1000 / float64(cfg.Sample)
		slices.Sort(lat)
		var sum float64
		for _, l := range lat {
			sum += l
		}
		c.P50ms, c.P99ms, c.MeanMs = lat[len(lat)/2], lat[len(lat)*99/100], sum/float64(len(lat))
		return c, nil
	}
	// 100 devices first, then the adds near the start.
	for range 100 {
		if err := add(ctx); err != nil {
			return nil, err
		}
	}
	progress("measuring %d adds near the start", cfg.Sample)
	if rep.AddFirst, err = measure(); err != nil {
		return nil, err
	}
	// Fill up to N less the adds measured at the end.
	fill := cfg.Devices - cfg.Sample - int(next.Load())
	t0 := time.Now()
	stopTicks := make(chan struct{})
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-stopTicks:
				return
			case <-tick.C:
				n := next.Load()
				progress("registering: %d of %d devices, %.0f a second", n, cfg.Devices, float64(n)/time.Since(t0).Seconds())
			}
		}
	}()
	err = parallel(ctx, cfg.Workers, fill, func(int) error { return add(ctx) })
	close(stopTicks)
	if err != nil {
		return nil, fmt.Errorf("lab: registering devices: %w", err)
	}
	rep.FillSeconds = time.Since(t0).Seconds()
	rep.FillPerSecond = float64(fill) / rep.FillSeconds
	progress("measuring %d adds at %d devices", cfg.Sample, next.Load())
	if rep.AddLast, err = measure(); err != nil {
		return nil, err
	}
	rep.AddRatio = rep.AddLast.P50ms / rep.AddFirst.P50ms
	rep.ServerRSSBytes = ks.rss()

	progress("the visibility map and a dry run at %d devices", next.Load())
	t0 = time.Now()
	status, err := admin.Status(ctx, &api.StatusRequest{})
	if err != nil {
		return nil, err
	}
	rep.StatusSeconds = time.Since(t0).Seconds()
	visibility.Build("bench", status, nil)
	rep.MapSeconds = time.Since(t0).Seconds()
	t0 = time.Now()
	if _, err := admin.Preview(ctx, &api.PreviewRequest{Change: &api.PreviewRequest_AddDevice{AddDevice: &api.AddDeviceRequest{Name: "one-more", Role: "client", Enclave: 7}}}); err != nil {
		return nil, fmt.Errorf("lab: dry run: %w", err)
	}
	rep.DryRunSeconds = time.Since(t0).Seconds()

	progress("restarting the key server on %d devices", next.Load())
	closeAdmin()
	closeAdmin = func() {}
	ks.stop()
	if fi, err := os.Stat(filepath.Join(dir, "ks.db")); err == nil {
		rep.StoreBytes = fi.Size()
	}
	if fi, err := os.Stat(filepath.Join(dir, "audit.log")); err == nil {
		rep.AuditBytes = fi.Size()
	}
	ready, err := ks.start(60 * time.Second)
	if err != nil {
		return nil, err
	}
	rep.RestartReadySeconds = ready.Seconds()
	if admin, closeAdmin, err = ks.admin(); err != nil {
		return nil, err
	}
	if st, err := admin.Status(ctx, &api.StatusRequest{}); err != nil || len(st.GetDevices()) != cfg.Devices+1 {
		return nil, errors.Join(fmt.Errorf("lab: after the restart the registry holds %d devices, not %d", len(st.GetDevices()), cfg.Devices+1), err)
	}
	rep.Goals = []Goal{
		{Name: "one add at N over one near the start (median)", Want: "<= 2", Got: rep.AddRatio, Unit: "x", Met: rep.AddRatio <= 2},
		{Name: "one add at N (median latency, admin call)", Want: "< 10", Got: rep.AddLast.P50ms, Unit: "ms", Met: rep.AddLast.P50ms < 10},
		{Name: "key-server CPU per add at N", Want: "< 10", Got: rep.AddLast.ServerCPUms, Unit: "ms", Met: rep.AddLast.ServerCPUms < 10},
		{Name: "restart ready", Want: "< 5", Got: rep.RestartReadySeconds, Unit: "s", Met: rep.RestartReadySeconds < 5},
		{Name: "visibility map (status and build)", Want: "< 10", Got: rep.MapSeconds, Unit: "s", Met: rep.MapSeconds < 10},
		{Name: "dry run of an add", Want: "< 10", Got: rep.DryRunSeconds, Unit: "s", Met: rep.DryRunSeconds < 10},
	}
	rep.Seconds = time.Since(start).Seconds()
	if cfg.Terminal {
		fmt.Fprint(cfg.Progress, "\r\033[K")
	}
	return rep, nil
}
