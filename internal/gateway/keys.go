package gateway

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
	"github.com/enclavekeys/enclave/internal/sa"
)

// keyState is what the gateway knows of its grants: the pairs it may
// read, and of those the ones whose pair keys it holds (in the key table
// the opener reads).
type keyState struct {
	mu      sync.RWMutex
	granted map[registry.Pair]bool
	held    map[registry.Pair]bool
	entries []sa.Entry
	// layout is the org's sub-enclave layout (DESIGN §3a): a granted
	// pair of any level covers the devices' pairs beneath it.
	layout keys.Layout
}

// isGranted reports whether a grant covers the devices' enclave pair p
// (the packet's VC): the granted pair itself or one above it.
func (k *keyState) isGranted(p registry.Pair) bool {
	k.mu.RLock()
	defer k.mu.RUnlock()
	for L := k.layout.Levels(); L >= 1; L-- {
		if q := registry.At(k.layout, L, p); k.granted[q] && registry.Covers(k.layout, q, p) {
			return true
		}
	}
	return false
}

// entryPairs are the pairs a path entry lists as held (at most
// control.MaxPathPairs), and whether some granted pair has no key (the
// entry then asks for keys: need-key).
func (k *keyState) entryPairs() ([]control.Pair, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	var ps []control.Pair
	for p := range k.held {
		ps = append(ps, control.Pair{A: uint16(p.A), B: uint16(p.B)})
	}
	slices.SortFunc(ps, func(a, b control.Pair) int { return int(a.A)<<16 + int(a.B) - int(b.A)<<16 - int(b.B) })
	if len(ps) > control.MaxPathPairs {
		ps = ps[:control.MaxPathPairs]
	}
	return ps, len(k.held) < len(k.granted)
}

func (k *keyState) grantedString() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	var s []string
	for p := range k.granted {
		s = append(s, registry.PairName(k.layout, p))
	}
	slices.Sort(s)
	return strings.Join(s, ",")
}

// refetchEvery: grants added later reach the gateway at the latest this
// long after (rotations and revocations come at once on the watch stream).
const refetchEvery = time.Minute

// fetchKeys asks the key service for the gateway's granted pair keys and
// installs them (with NoDerive, it keeps only the list of pairs). A
// gateway granted nothing still runs: it tags and passes everything as
// opaque.
func (g *Gateway) fetchKeys(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := g.cfg.KeyService.GetPairKeys(ctx, &api.GetPairKeysRequest{})
	if status.Code(err) == codes.PermissionDenied {
		g.log.Warn("the key service grants this gateway no pairs: everything passes as opaque", "reason", status.Convert(err).Message())
		resp, err = &api.PairKeys{}, nil
	}
	if err != nil {
		return fmt.Errorf("gateway: fetching pair keys: %w", err)
	}
	var layout keys.Layout
	if resp.GetLayout() != "" {
		if layout, err = keys.ParseLayout(resp.GetLayout()); err != nil {
			for _, k := range resp.GetKeys() {
				clear(k.Key)
			}
			return fmt.Errorf("gateway: the key service's enclave layout: %w", err)
		}
	}
	g.table.SetLayout(layout) // a new layout empties the table: its keys are added again below
	g.names.set(layout)
	g.policyUnder(layout)
	granted, held := map[registry.Pair]bool{}, map[registry.Pair]bool{}
	var entries []sa.Entry
	for _, k := range resp.GetKeys() {
		a, b := k.GetPair().GetA(), k.GetPair().GetB()
		if a == 0 || b == 0 || a > 0xffff || b > 0xffff || k.GetLevel() > uint32(layout.Levels()) {
			clear(k.Key)
			continue // never from a sound key service, never used
		}
		p := registry.NewPair(keys.EnclaveID(a), keys.EnclaveID(b))
		granted[p] = true
		if g.cfg.NoDerive {
			clear(k.Key)
			continue
		}
		e := sa.Entry{Level: keys.LevelPair, Enclave: p.A, Peer: p.B, Generation: keys.Generation(k.GetValidity().GetGeneration()), Sub: int(k.GetLevel())}
		if err := g.table.Add(e, k.GetKey()); err != nil {
			clear(k.Key)
			return fmt.Errorf("gateway: pair key %s: %w", p, err)
		}
		clear(k.Key)
		held[p] = true
		entries = append(entries, e)
	}
	g.keys.mu.Lock()
	defer g.keys.mu.Unlock()
	for _, e := range g.keys.entries { // keys no longer served go
		if !slices.Contains(entries, e) {
			g.table.Remove(e)
		}
	}
	g.keys.granted, g.keys.held, g.keys.entries, g.keys.layout = granted, held, entries, layout
	g.metrics.keys.Set(float64(g.table.Len()))
	return nil
}

// watchKeys follows the generation stream: a rotation of a granted pair
// refetches the keys; the stream is reopened when it breaks, and the keys
// are refetched now and then for grants added since.
func (g *Gateway) watchKeys() {
	for g.ctx.Err() == nil {
		stream, err := g.cfg.KeyService.WatchGenerations(g.ctx, &api.WatchGenerationsRequest{})
		if err == nil {
			err = g.followStream(stream)
		}
		if g.ctx.Err() != nil {
			return
		}
		g.ks.Set(keyclient.Reconnecting, g.cfg.Now(), err)
		g.log.Warn("generation watch broken; reconnecting", "keyserver", g.cfg.KeyServiceAddr, "err", err)
		select {
		case <-g.ctx.Done():
			return
		case <-time.After(keyclient.Spread(keyclient.ReconnectSpread)): // a restarted key server is not met by every device at once
		}
		// Wait for the key service (the keys held go on working), then
		// catch up on what the stream missed.
		if err := keyclient.Retry(g.ctx, g.log, "pair keys", g.cfg.KeyServiceAddr, g.fetchKeys); err != nil && g.ctx.Err() == nil {
			g.log.Error("the key service refuses this gateway's keys", "keyserver", g.cfg.KeyServiceAddr, "err", err)
			select {
			case <-g.ctx.Done():
				return
			case <-time.After(keyclient.MaxWait):
			}
		}
	}
}

func (g *Gateway) followStream(stream api.KeyService_WatchGenerationsClient) error {
	events := make(chan *api.GenerationEvent)
	errs := make(chan error, 1)
	go func() {
		for {
			ev, err := stream.Recv()
			if err != nil {
				errs <- err
				return
			}
			select {
			case events <- ev:
			case <-g.ctx.Done():
				return
			}
		}
	}()
	refetch := time.NewTicker(refetchEvery)
	defer refetch.Stop()
	for {
		select {
		case err := <-errs:
			return err
		case <-g.ctx.Done():
			// The reader may have gone without an error: it stops at
			// shutdown with an event in hand.
			return g.ctx.Err()
		case <-refetch.C:
			if err := g.fetchKeys(g.ctx); err != nil {
				g.log.Warn("refetching keys", "err", err)
			}
		case ev := <-events:
			switch ev.GetKind() {
			case api.GenerationEvent_ROTATED:
				// An enclave tier may not serve the new generation for a
				// moment after the event: try again for two seconds
				// before leaving it to the minute's refetch.
				err := g.fetchKeys(g.ctx)
				for try := 1; err != nil && try < 20 && g.ctx.Err() == nil; try++ {
					select {
					case <-g.ctx.Done():
					case <-time.After(100 * time.Millisecond):
					}
					err = g.fetchKeys(g.ctx)
				}
				if err != nil {
					g.log.Warn("fetching keys after a rotation", "err", err)
					continue
				}
				g.log.Info("pair rotated", "pair", fmt.Sprintf("%d-%d", ev.GetPair().GetA(), ev.GetPair().GetB()), "generation", ev.GetGeneration())
			case api.GenerationEvent_SNAPSHOT_DONE:
				g.ks.Set(keyclient.Watching, g.cfg.Now(), nil)
				// A change made between the last fetch and this stream's
				// start was told to no stream: fetch once more.
				if err := g.fetchKeys(g.ctx); err != nil {
					g.log.Warn("fetching keys to catch up with the key service", "err", err)
				}
			case api.GenerationEvent_CHANGED:
				// A grant or a pair's policy changed: the pairs this
				// gateway reads change with them, now.
				before := g.keys.grantedString()
				if err := g.fetchKeys(g.ctx); err != nil {
					g.log.Warn("fetching keys after a registry change", "err", err)
					continue
				}
				if after := g.keys.grantedString(); after != before {
					g.log.Info("pairs read changed", "reason", ev.GetReason(), "before", before, "after", after)
				}
			case api.GenerationEvent_REVOKED:
				g.log.Error("this gateway was revoked by the key service: it keeps no keys")
				g.dropAllKeys()
				return fmt.Errorf("gateway: this device was revoked")
			}
		}
	}
}

// dropAllKeys forgets every key the gateway holds (it was revoked).
func (g *Gateway) dropAllKeys() {
	g.keys.mu.Lock()
	for _, e := range g.keys.entries {
		g.table.Remove(e)
	}
	g.keys.granted, g.keys.held, g.keys.entries = nil, nil, nil
	g.keys.mu.Unlock()
	g.dkx.clear()
	g.metrics.keys.Set(float64(g.table.Len()))
}
