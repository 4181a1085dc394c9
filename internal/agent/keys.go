package agent

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/sa"
)

// skID names a server key: the peer enclave j and the generation.
type skID struct {
	peer keys.EnclaveID
	gen  keys.Generation
}

// serverKey is one SK(i,j,k,g) the key service gave this server.
type serverKey struct {
	gen     keys.Generation
	current bool
	until   time.Time // when the key service stops vouching for it
	deriver *keys.Deriver
}

// currentKey is the current generation's key towards enclave j (called
// under a.mu).
func (a *Agent) currentKey(j keys.EnclaveID) *serverKey {
	var best *serverKey
	for id, k := range a.sks {
		if id.peer == j && k.current && (best == nil || k.gen > best.gen) {
			best = k
		}
	}
	return best
}

// fetchKeys asks the key service for this server's keys and installs them:
// in the derivers that grant SAs and in the key table the stateless opener
// reads. Keys the service no longer serves are removed, and the SAs under
// them with them.
func (a *Agent) fetchKeys(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	a.metrics.keyService.WithLabelValues("GetServerKeys").Inc()
	resp, err := a.cfg.KeyService.GetServerKeys(ctx, &api.GetServerKeysRequest{})
	if err != nil {
		return fmt.Errorf("agent: fetching server keys: %w", err)
	}
	fresh := map[skID]*serverKey{}
	for _, k := range resp.GetKeys() {
		v := k.GetValidity()
		g := keys.Generation(v.GetGeneration())
		j := keys.EnclaveID(k.GetPeer())
		if keys.EnclaveID(k.GetEnclave()) != a.id.Enclave || keys.ServerID(k.GetServer()) != a.id.ServerID {
			continue // not this server's: never expected, never used
		}
		d, err := keys.NewDeriver(k.GetKey(), keys.Scope{Level: keys.LevelServer, Enclave: a.id.Enclave, Peer: j, Server: a.id.ServerID, Generation: g, HasGeneration: true})
		if err != nil {
			return fmt.Errorf("agent: server key for %d-%d: %w", a.id.Enclave, j, err)
		}
		e := sa.Entry{Level: keys.LevelServer, Enclave: a.id.Enclave, Peer: j, Server: a.id.ServerID, Generation: g}
		if err := a.table.Add(e, k.GetKey()); err != nil {
			return fmt.Errorf("agent: key table: %w", err)
		}
		clear(k.Key)
		fresh[skID{j, g}] = &serverKey{gen: g, current: v.GetCurrent(), until: v.GetValidUntil().AsTime(), deriver: d}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for id := range a.sks {
		if _, ok := fresh[id]; !ok {
			a.table.Remove(sa.Entry{Level: keys.LevelServer, Enclave: a.id.Enclave, Peer: id.peer, Server: a.id.ServerID, Generation: id.gen})
			for _, c := range a.t.bySPI {
				if c.server && c.vc.Peer == id.peer && c.gen == id.gen {
					a.t.remove(c)
				}
			}
		}
	}
	a.sks = fresh
	a.metrics.serverKeys.Set(float64(len(fresh)))
	for k := range a.spis { // a key no longer held takes its SPIs with it
		if _, ok := fresh[skID{k.peer, k.gen}]; !ok {
			delete(a.spis, k)
		}
	}
	a.metrics.sas.Set(float64(len(a.t.bySPI)))
	return nil
}

// watchKeys follows the key service's generation stream: a rotation makes
// the server fetch its keys and ask the clients of SAs under the older
// generation to re-establish; a revoked device is refused and its SAs end.
// A broken stream is reopened.
func (a *Agent) watchKeys() {
	for a.ctx.Err() == nil {
		a.metrics.keyService.WithLabelValues("WatchGenerations").Inc()
		stream, err := a.cfg.KeyService.WatchGenerations(a.ctx, &api.WatchGenerationsRequest{})
		if err == nil {
			err = a.followStream(stream)
		}
		if a.ctx.Err() != nil {
			return
		}
		a.log.Warn("generation watch broken; reconnecting", "err", err)
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(time.Second):
		}
		if err := a.fetchKeys(a.ctx); err != nil {
			a.log.Warn("refetching keys", "err", err)
		}
	}
}

func (a *Agent) followStream(stream api.KeyService_WatchGenerationsClient) error {
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		switch ev.GetKind() {
		case api.GenerationEvent_ROTATED:
			// An enclave tier may not serve the new generation for a
			// moment after the event (it asks the org tier): try again
			// before giving up, or the clients are never asked to move.
			var err error
			for try := 0; try < 20; try++ {
				if err = a.fetchKeys(a.ctx); err == nil || a.ctx.Err() != nil {
					break
				}
				a.log.Warn("fetching keys after a rotation", "err", err, "try", try+1)
				select {
				case <-a.ctx.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
			if err != nil {
				continue
			}
			a.rotated(keys.Generation(ev.GetGeneration()))
		case api.GenerationEvent_DEVICE_REVOKED:
			a.revoke(ev.GetDevice())
		case api.GenerationEvent_REVOKED:
			a.log.Error("this device was revoked by the key service")
			return fmt.Errorf("agent: this device was revoked")
		}
	}
}

// rotated asks the clients of SAs under a generation older than g to
// re-establish before the old one stops being accepted. The notices are
// spread in random order over 2 ms per SA, at most the first half of the
// time the oldest of those SAs has left and RekeySpread, so that neither
// this server nor the clients see a storm of handshakes however many SAs
// there are.
func (a *Agent) rotated(g keys.Generation) {
	now := a.cfg.Now()
	a.mu.RLock()
	var old []*conn
	left := time.Duration(-1)
	for _, c := range a.t.bySPI {
		if c.server && c.gen < g {
			old = append(old, c)
			if d := c.expires.Sub(now); left < 0 || d < left {
				left = d
			}
		}
	}
	a.mu.RUnlock()
	if len(old) == 0 {
		return
	}
	// A few SAs are asked at once; many are spread, at most half the time
	// left and RekeySpread (2 ms an SA keeps a hundred thousand under
	// 500 handshakes a second).
	spread := min(max(left/2, 0), a.cfg.RekeySpread, time.Duration(len(old))*2*time.Millisecond)
	a.log.Info("rotation: asking clients to re-establish", "sas", len(old), "generation", g, "over", spread)
	rand.Shuffle(len(old), func(i, j int) { old[i], old[j] = old[j], old[i] })
	a.spawn(func() { a.spreadNotices(old, spread) })
}

// spreadNotices sends each SA's RekeyNotice at its place in spread (in
// the order given), stopping when the agent does. A notice is a datagram
// and may be lost, or its client may fail to reach the server while it is
// busy: two more passes, each over a quarter of spread, ask again the
// clients whose SA is still the route (not yet replaced).
func (a *Agent) spreadNotices(old []*conn, spread time.Duration) {
	for pass := 0; pass < 3 && len(old) > 0; pass++ {
		over := spread
		if pass > 0 {
			over = spread / 4
		}
		start := time.Now()
		for i, c := range old {
			at := over * time.Duration(i) / time.Duration(len(old))
			if wait := at - time.Since(start); wait > 0 {
				select {
				case <-a.ctx.Done():
					return
				case <-time.After(wait):
				}
			}
			if !a.stillCurrent(c) {
				continue
			}
			deadline := max(c.expires.Sub(a.cfg.Now()).Truncate(time.Second), 0)
			a.notify(c, &control.Inner{Type: control.InnerRekeyNotice, Rekey: &control.RekeyNotice{Reason: control.RekeyRotation, Deadline: deadline}})
		}
		if pass == 0 {
			// Give the last ones asked the time to answer before the
			// next pass.
			select {
			case <-a.ctx.Done():
				return
			case <-time.After(spread / 8):
			}
		}
		a.mu.RLock()
		kept := old[:0]
		for _, c := range old {
			if !c.closed.Load() && a.notReplacedLocked(c) {
				kept = append(kept, c)
			}
		}
		a.mu.RUnlock()
		old = kept
	}
}

// stillCurrent reports whether c is open and its client has no SA of a
// newer generation yet.
func (a *Agent) stillCurrent(c *conn) bool {
	if c.closed.Load() {
		return false
	}
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.notReplacedLocked(c)
}

func (a *Agent) notReplacedLocked(c *conn) bool {
	for _, o := range a.t.byPeer[c.overlay] {
		if o != c && o.gen > c.gen && !o.closed.Load() {
			return false
		}
	}
	return true
}

// revoke refuses a device from now on and ends its SAs.
func (a *Agent) revoke(name string) {
	a.mu.Lock()
	a.revoked[name] = true
	var gone []*conn
	for _, c := range a.t.bySPI {
		if c.peer.Name == name {
			gone = append(gone, c)
		}
	}
	for _, c := range gone {
		a.t.remove(c)
	}
	if gs := a.gwByName[name]; gs != nil { // a revoked gateway gets no more keys
		delete(a.gws, gs.session.Local)
		delete(a.gwByName, name)
	}
	for _, d := range a.deliveries[name] {
		clear(d.grant.KeyOut)
		clear(d.grant.KeyIn)
	}
	delete(a.deliveries, name)
	n := len(a.t.bySPI)
	a.mu.Unlock()
	a.metrics.sas.Set(float64(n))
	for _, c := range gone {
		a.notify(c, &control.Inner{Type: control.InnerClose, Close: control.RekeyRevocation})
	}
	if len(gone) > 0 {
		a.log.Info("revoked device: SAs ended", "device", name, "sas", len(gone))
	}
}

// notify sends a sealed message on c's session.
func (a *Agent) notify(c *conn, in *control.Inner) {
	msg, err := c.session.Seal(in)
	if err != nil {
		return
	}
	a.sendControl(msg, c.ctrl)
}
