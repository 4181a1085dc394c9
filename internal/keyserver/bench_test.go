package keyserver

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
)

// BenchmarkGetServerKeys is the load test of the key service: GetServerKeys
// over mutual TLS on loopback, each client on its own persistent connection,
// with the audit log written (and synced) for every issuance. It reports
// requests per second and the 50th and 99th latency percentiles.
//
//	go test ./internal/keyserver -run '^$' -bench GetServerKeys -benchtime 20000x
func BenchmarkGetServerKeys(b *testing.B) {
	for _, clients := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			l := newLab(b)
			setup(b, l)
			conns := make([]client, clients)
			for i := range conns {
				conns[i] = l.client(idServer)
				if _, err := conns[i].GetServerKeys(context.Background(), &api.GetServerKeysRequest{}); err != nil {
					b.Fatal(err)
				}
			}
			lat := make([][]time.Duration, clients)
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for c := 0; c < clients; c++ {
				n := b.N / clients
				if c < b.N%clients {
					n++
				}
				wg.Add(1)
				go func(c, n int) {
					defer wg.Done()
					ctx := context.Background()
					for i := 0; i < n; i++ {
						t0 := time.Now()
						if _, err := conns[c].GetServerKeys(ctx, &api.GetServerKeysRequest{}); err != nil {
							b.Error(err)
							return
						}
						lat[c] = append(lat[c], time.Since(t0))
					}
				}(c, n)
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			all := slices.Concat(lat...)
			slices.Sort(all)
			if len(all) == 0 {
				return
			}
			b.ReportMetric(float64(len(all))/elapsed.Seconds(), "req/s")
			b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}
