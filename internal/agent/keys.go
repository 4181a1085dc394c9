package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keyclient"
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
	// spis hands out the SPIs granted under this key; it is kept across
	// fetches for as long as the key is held, with its leases.
	spis *spiAllocator
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
	defer func() { // the key bytes live on only in the derivers and the table
		for _, k := range resp.GetKeys() {
			clear(k.Key)
		}
	}()
	fresh := map[skID]*serverKey{}
	raw := map[skID][]byte{} // the keys' bytes, for the SPI allocators of new keys
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
		fresh[skID{j, g}] = &serverKey{gen: g, current: v.GetCurrent(), until: v.GetValidUntil().AsTime(), deriver: d}
		raw[skID{j, g}] = k.GetKey()
	}
	a.mu.Lock()
	var ended []*conn   // SAs of pairs no longer served at all (forbidden)
	var retired []*conn // SAs of a generation retired (a client that did not move)
	for id := range a.sks {
		if _, ok := fresh[id]; !ok {
			a.table.Remove(sa.Entry{Level: keys.LevelServer, Enclave: a.id.Enclave, Peer: id.peer, Server: a.id.ServerID, Generation: id.gen})
			forbidden := true
			for f := range fresh {
				if f.peer == id.peer {
					forbidden = false // a retired generation: its SAs moved on already
				}
			}
			for _, c := range a.t.bySPI {
				if c.server && c.vc.Peer == id.peer && c.gen == id.gen {
					a.t.remove(c)
					if forbidden {
						ended = append(ended, c)
					} else {
						retired = append(retired, c)
					}
				}
			}
		}
	}
	defer func() { // after the lock: the clients of a forbidden pair's SAs are told
		for _, c := range ended {
			a.notify(c, &control.Inner{Type: control.InnerClose, Close: control.RekeyPolicy})
		}
		if len(ended) > 0 {
			a.metrics.ended.WithLabelValues("key_withdrawn").Add(float64(len(ended)))
			a.log.Info("SAs ended: the key service no longer serves their keys", "sas", len(ended))
		}
		// A client still on a retired generation (its rekey failed, or
		// it missed the notices) is told the SA is gone, so that it
		// stops sending on it and makes a new one at once.
		for _, c := range retired {
			a.notify(c, &control.Inner{Type: control.InnerClose, Close: control.RekeyRotation})
		}
		if len(retired) > 0 {
			a.metrics.ended.WithLabelValues("generation_retired").Add(float64(len(retired)))
			a.log.Info("SAs ended: their generation was retired", "sas", len(retired))
		}
	}()
	for id, k := range fresh {
		if old := a.sks[id]; old != nil {
			k.spis = old.spis
		} else if k.spis, err = newSPIAllocator(raw[id], keys.VC{Enclave: a.id.Enclave, Peer: id.peer, Server: a.id.ServerID}); err != nil {
			a.mu.Unlock()
			return fmt.Errorf("agent: SPI allocator for %d-%d: %w", a.id.Enclave, id.peer, err)
		}
	}
	a.sks = fresh
	a.metrics.serverKeys.Set(float64(len(fresh)))
	a.metrics.sas.Set(float64(len(a.t.bySPI)))
	a.mu.Unlock()
	return a.leaseSPIs(ctx)
}

// leaseSPIs asks the key service for SPI leases for the current keys
// that need one (a key just fetched, or one whose lease is half used), one
// request per key, and waits for the answers.
func (a *Agent) leaseSPIs(ctx context.Context) error {
	type want struct {
		id skID
		k  *serverKey
		n  uint32
	}
	var ws []want
	a.mu.Lock()
	for id, k := range a.sks {
		if !k.current || k.spis == nil {
			continue
		}
		if size, ok := k.spis.wantLease(); ok {
			ws = append(ws, want{id, k, size})
		}
	}
	a.mu.Unlock()
	var first error
	for _, w := range ws {
		if err := a.leaseOne(ctx, w.id, w.k.spis, w.n); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// leaseOne asks for a lease of n counter values of key id, for s (whose
// request in flight it ends).
func (a *Agent) leaseOne(ctx context.Context, id skID, s *spiAllocator, n uint32) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	a.metrics.keyService.WithLabelValues("LeaseSPIs").Inc()
	resp, err := a.cfg.KeyService.LeaseSPIs(ctx, &api.LeaseSPIsRequest{Peer: uint32(id.peer), Generation: uint32(id.gen), Count: n})
	if err == nil && (keys.EnclaveID(resp.GetPeer()) != id.peer || keys.Generation(resp.GetGeneration()) != id.gen ||
		keys.EnclaveID(resp.GetEnclave()) != a.id.Enclave || keys.ServerID(resp.GetServer()) != a.id.ServerID || resp.GetCount() == 0) {
		err = fmt.Errorf("the key service answered with a lease of another key or none")
	}
	a.mu.Lock()
	s.leaseDone(err == nil)
	if err == nil {
		s.add(resp.GetFirst(), resp.GetCount())
	}
	a.mu.Unlock()
	if status.Code(err) == codes.ResourceExhausted { // every SPI of the key was leased
		err = fmt.Errorf("%w: %v", ErrSPIsExhausted, err)
	}
	if err != nil {
		return fmt.Errorf("agent: leasing SPIs of %d-%d generation %d: %w", a.id.Enclave, id.peer, id.gen, err)
	}
	return nil
}

// watchKeys follows the key service's generation stream: a rotation makes
// the server fetch its keys and ask the clients of SAs under the older
// generation to re-establish; a revoked device is refused and its SAs end.
// A broken stream is reopened once the key service answers again (the
// keys are fetched again first, catching up on what the stream missed);
// meanwhile SAs and grants go on under the keys and SPI leases held.
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
		if a.selfRevoked.Load() || keyclient.IsRevoked(err) {
			a.revokedSelf(err)
			return
		}
		a.ks.Set(keyclient.Reconnecting, a.cfg.Now(), err)
		a.log.Warn("generation watch broken; reconnecting", "keyserver", a.cfg.KeyServiceAddr, "err", err)
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(keyclient.Spread(keyclient.ReconnectSpread)): // a restarted key server is not met by every device at once
		}
		catchUp := a.fetchKeys
		if !a.server { // a client fetches nothing: it reconnects and takes the new snapshot
			catchUp = func(ctx context.Context) error {
				ctx, cancel := context.WithCancel(ctx)
				defer cancel()
				s, err := a.cfg.KeyService.WatchGenerations(ctx, &api.WatchGenerationsRequest{})
				if err == nil {
					_, err = s.Recv() // it answers
				}
				return err
			}
		}
		if err := keyclient.Retry(a.ctx, a.log, "watch", a.cfg.KeyServiceAddr, catchUp); err != nil && a.ctx.Err() == nil {
			if keyclient.IsRevoked(err) {
				a.revokedSelf(err)
				return
			}
			a.log.Error("the key service refuses this server's keys", "keyserver", a.cfg.KeyServiceAddr, "err", err)
			select { // a refusal may be lifted (an admin's mistake): ask again later
			case <-a.ctx.Done():
				return
			case <-time.After(keyclient.MaxWait):
			}
		}
	}
}

func (a *Agent) followStream(stream api.KeyService_WatchGenerationsClient) error {
	snapshot := map[keys.EnclaveID]keys.Generation{} // this stream's: the server's pairs now
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		switch ev.GetKind() {
		case api.GenerationEvent_SNAPSHOT:
			if j, ok := a.peerOf(ev.GetPair()); ok {
				snapshot[j] = keys.Generation(ev.GetGeneration())
			}
		case api.GenerationEvent_ENDPOINT:
			a.forgetEndpoint(ev.GetDevice())
		case api.GenerationEvent_SNAPSHOT_DONE:
			if a.server {
				a.catchUp(snapshot)
			}
			a.ks.Set(keyclient.Watching, a.cfg.Now(), nil)
			a.snapshotOnce.Do(func() { close(a.snapshot) })
		case api.GenerationEvent_ROTATED:
			j, ok := a.peerOf(ev.GetPair())
			if !ok {
				continue // a pair this server is not in
			}
			g := keys.Generation(ev.GetGeneration())
			// An enclave tier may not serve the new generation for a
			// moment after the event (it asks the org tier): try again
			// until it does, or the clients are never asked to move.
			var err error
			for try := 0; try < 20; try++ {
				if err = a.fetchKeys(a.ctx); err == nil && !a.holdsCurrent(j, g) {
					err = fmt.Errorf("agent: the key service does not serve generation %d of %d-%d yet", g, a.id.Enclave, j)
				}
				if err == nil || a.ctx.Err() != nil {
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
			a.rotated(j, g)
		case api.GenerationEvent_CHANGED:
			// A pair allowed or forbidden: fetch the keys the server
			// holds now (a forbidden pair's SAs end with its keys).
			if err := a.fetchKeys(a.ctx); err != nil {
				a.log.Warn("fetching keys after a registry change", "err", err)
				continue
			}
			a.log.Info("registry change applied", "pair", fmt.Sprintf("%d-%d", ev.GetPair().GetA(), ev.GetPair().GetB()), "reason", ev.GetReason())
		case api.GenerationEvent_DEVICE_REVOKED:
			if ev.GetDevice() == a.id.Name {
				a.revokedSelf(errors.New("the key service's watch stream says this device was revoked"))
				return errors.New("agent: this device is revoked")
			}
			a.revoke(ev.GetDevice())
		case api.GenerationEvent_REVOKED:
			a.log.Error("this device was revoked by the key service")
			return fmt.Errorf("agent: this device was revoked")
		}
	}
}

// catchUp brings a server up to a stream's snapshot of its pairs: a
// change made between its last fetch and the stream's start (a pair
// allowed, forbidden or rotated while the watch was reconnecting, or just
// after the fetch at start) was told to no stream, so the keys are fetched
// again when they differ from it, and the clients of SAs under an older
// generation are asked to move.
func (a *Agent) catchUp(snapshot map[keys.EnclaveID]keys.Generation) {
	a.mu.RLock()
	stale := false
	for id, k := range a.sks {
		if g, ok := snapshot[id.peer]; k.current && (!ok || g != k.gen) {
			stale = true // a pair forbidden, or rotated since
		}
	}
	a.mu.RUnlock()
	for j, g := range snapshot {
		stale = stale || !a.holdsCurrent(j, g) // a pair allowed, or rotated
	}
	if stale {
		if err := a.fetchKeys(a.ctx); err != nil {
			a.log.Warn("fetching keys to catch up with the key service", "err", err)
			return
		}
		a.log.Info("keys fetched again: the registry changed while the watch was away")
	}
	for j, g := range snapshot {
		if a.holdsCurrent(j, g) {
			a.rotated(j, g)
		}
	}
}

// peerOf is the enclave across pair p from this server's (false if the
// pair is not this server's).
func (a *Agent) peerOf(p *api.Pair) (keys.EnclaveID, bool) {
	switch own := uint32(a.id.Enclave); {
	case p.GetA() == own:
		return keys.EnclaveID(p.GetB()), true
	case p.GetB() == own:
		return keys.EnclaveID(p.GetA()), true
	}
	return 0, false
}

// holdsCurrent reports whether this server's current key towards j is of
// generation g or newer.
func (a *Agent) holdsCurrent(j keys.EnclaveID, g keys.Generation) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	k := a.currentKey(j)
	return k != nil && k.gen >= g
}

// rotated asks the clients of SAs with enclave j under a generation older
// than g (the pair's new one) to re-establish before the old one stops being accepted. The notices are
// spread in random order over 2 ms per SA, at most the first half of the
// time the oldest of those SAs has left and RekeySpread, so that neither
// this server nor the clients see a storm of handshakes however many SAs
// there are.
func (a *Agent) rotated(j keys.EnclaveID, g keys.Generation) {
	now := a.cfg.Now()
	old := a.staleSAs(j, g)
	if len(old) == 0 {
		return
	}
	left := time.Duration(-1)
	for _, c := range old {
		if d := c.expires.Sub(now); left < 0 || d < left {
			left = d
		}
	}
	// A few SAs are asked at once; many are spread, at most half the time
	// left and RekeySpread (2 ms an SA keeps a hundred thousand under
	// 500 handshakes a second).
	spread := min(max(left/2, 0), a.cfg.RekeySpread, time.Duration(len(old))*2*time.Millisecond)
	a.log.Info("rotation: asking clients to re-establish", "sas", len(old), "peer", j, "generation", g, "over", spread)
	a.spawn(func() { a.spreadNotices(j, g, old, spread) })
}

// staleSAs lists, in random order, the open server SAs with enclave j
// under a generation older than g whose client has no SA of a newer one
// yet.
func (a *Agent) staleSAs(j keys.EnclaveID, g keys.Generation) []*conn {
	a.mu.RLock()
	var old []*conn
	for _, c := range a.t.bySPI {
		if c.server && c.vc.Peer == j && c.gen < g && !c.closed.Load() && a.notReplacedLocked(c) {
			old = append(old, c)
		}
	}
	a.mu.RUnlock()
	rand.Shuffle(len(old), func(i, j int) { old[i], old[j] = old[j], old[i] })
	return old
}

// noticePause is the least time between two passes of notices, for the
// clients asked last to answer.
const noticePause = 200 * time.Millisecond

// spreadNotices sends each SA's RekeyNotice at its place in spread (in
// the order given), stopping when the agent does. A notice is a datagram
// and may be lost, or its client may fail to reach the server while it is
// busy: two more passes, each over a quarter of spread, ask the clients
// still under a generation older than g of pair (own, j). Those passes look at the table
// again, not at the first list: an SA granted under the old key while the
// new one was being installed (its grant decided just before, added just
// after the first list was made) is asked too.
func (a *Agent) spreadNotices(j keys.EnclaveID, g keys.Generation, old []*conn, spread time.Duration) {
	for pass := 0; pass < 3; pass++ {
		if pass > 0 {
			old = a.staleSAs(j, g)
		}
		if len(old) == 0 {
			return
		}
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
		// Give the last ones asked the time to answer before the next
		// pass.
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(max(spread/8, noticePause)):
		}
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
// revokedSelf: the key service revoked this device. Its SAs end (their
// peers are told), it asks the key service nothing more and starts no
// handshake: status says revoked until the process is stopped. A device
// that should work again needs a new identity (a certificate or a join
// token under another name).
func (a *Agent) revokedSelf(why error) {
	if !a.selfRevoked.CompareAndSwap(false, true) {
		return
	}
	a.ks.Set(keyclient.Revoked, a.cfg.Now(), why)
	a.log.Error("this device is revoked: its SAs end, and it asks the key service nothing more and makes no new SA",
		"identity", a.id.String(), "err", why, "what to do", "enclave admin device list shows when it was revoked; a device that should work again needs a new identity (another name's certificate or join token)")
	a.mu.Lock()
	var gone []*conn
	for _, c := range a.t.bySPI {
		gone = append(gone, c)
	}
	for _, c := range gone {
		a.t.remove(c)
	}
	clear(a.dials)
	a.mu.Unlock()
	a.metrics.sas.Set(0)
	for _, c := range gone {
		a.notify(c, &control.Inner{Type: control.InnerClose, Close: control.RekeyRevocation})
	}
}

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
	a.sendControl(msg, c.controlEndpoint())
}
