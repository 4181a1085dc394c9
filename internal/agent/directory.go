package agent

import (
	"context"
	"crypto/ed25519"
	"net/netip"
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/registry"
)

// The endpoint directory (issue 22): a server agent registers where it
// takes data with the key service; a client agent with a key service looks
// up a server it has no --peer for by its overlay address, checks the
// entry itself (the server's certificate and signature) and dials the
// endpoint. --peer routes win over the directory.

const (
	// registerEvery: a server registers again this often, and when its
	// addresses change (looked at every addrCheck).
	registerEvery = 10 * time.Minute
	addrCheck     = 30 * time.Second
	// resolvedFor: a resolved endpoint is used this long before it is
	// looked up again; failedFor: a failed lookup is not tried again
	// before this.
	resolvedFor = 10 * time.Minute
	failedFor   = 5 * time.Second
)

// resolved is a directory answer kept for a while.
type resolved struct {
	route  Route
	device string // the server's name, for the directory's ENDPOINT events
	until  time.Time
}

// forgetEndpoint drops what the directory said of a server whose entry
// changed (an ENDPOINT event): the next packet to it asks again.
func (a *Agent) forgetEndpoint(device string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for dst, r := range a.resolved {
		if r.device == device {
			delete(a.resolved, dst)
		}
	}
}

// dataEndpoints are the data endpoints a server registers: its listen
// address if it is specific, else the host's addresses (loopback only
// when there is nothing else), and the public endpoints given.
func (a *Agent) dataEndpoints() []netip.AddrPort {
	port := a.DataPort().Port()
	var out []netip.AddrPort
	if l := a.DataPort().Addr().Unmap(); !l.IsUnspecified() {
		out = append(out, netip.AddrPortFrom(l, port))
	} else {
		var loop []netip.AddrPort
		for ip := range hostAddrs() {
			switch {
			case ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified():
			case a.overlayNet.IsValid() && a.overlayNet.Contains(ip):
				// The overlay's own addresses (the TUN device's): clients
				// reach the server through them, never at them.
			case ip.IsLoopback():
				loop = append(loop, netip.AddrPortFrom(ip, port))
			default:
				out = append(out, netip.AddrPortFrom(ip, port))
			}
		}
		if len(out) == 0 {
			out = loop
		}
	}
	out = append(out, a.cfg.Public...)
	slices.SortFunc(out, func(x, y netip.AddrPort) int { return x.Compare(y) })
	out = slices.Compact(out)
	if len(out) > registry.MaxEndpoints {
		out = out[:registry.MaxEndpoints]
	}
	return out
}

// registerEndpoints keeps the server's directory entry current: at start,
// every registerEvery, and when its addresses or its credentials change
// (a renewal, a CA rollover: the entry carries the certificate clients
// check, so an old one would turn them away until the next round).
func (a *Agent) registerEndpoints() {
	var last []netip.AddrPort
	var at time.Time
	var creds *handshake.Credentials
	t := time.NewTicker(addrCheck)
	defer t.Stop()
	var retry <-chan time.Time // a registration that failed is tried again soon
	wait := time.Second
	for {
		now := a.cfg.Now()
		c := a.creds.Load()
		if eps := a.dataEndpoints(); !slices.Equal(eps, last) || now.Sub(at) >= registerEvery || c != creds {
			if err := a.register(eps, now); err != nil {
				a.log.Warn("directory: registering this server's endpoints", "endpoints", eps, "err", err, "retry_in", wait)
				retry, wait = time.After(wait), min(2*wait, addrCheck)
			} else {
				retry, wait = nil, time.Second
				last, at, creds = eps, now, c
				a.log.Info("directory: endpoints registered", "endpoints", eps)
			}
		}
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
		case <-a.credsChanged:
		case <-retry:
		}
	}
}

func (a *Agent) register(eps []netip.AddrPort, now time.Time) error {
	creds := a.creds.Load()
	req := &api.RegisterEndpointRequest{At: timestamppb.New(now), Signature: ed25519.Sign(creds.Key, registry.EndpointSigned(a.id.Name, eps, now)), Cert: creds.CertDER}
	for _, e := range eps {
		req.Data = append(req.Data, e.String())
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	_, err := a.cfg.KeyService.RegisterEndpoint(ctx, req)
	return err
}

// resolvable reports whether dst may be looked up in the directory: the
// agent has a key service and an enclave, and dst is in its overlay
// network.
func (a *Agent) resolvable(dst netip.Addr) bool {
	return a.cfg.KeyService != nil && a.id.Enclave != 0 && a.id.Overlay.Contains(dst) && dst != a.self
}

// resolve looks dst up in the directory, checks the entry, and makes the
// dial waiting for it go on (or drops its packets). Called without a.mu.
func (a *Agent) resolve(d *dial) {
	ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
	defer cancel()
	e, err := a.cfg.KeyService.ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: d.dst.String()})
	var eps []netip.AddrPort
	var id ca.Identity
	if err == nil {
		eps, id, err = keyclient.VerifyEndpoint(a.creds.Load().Roots, e, d.dst, a.cfg.Now())
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dials[d.dst] != d {
		return // gone meanwhile (the agent stopped)
	}
	now := a.cfg.Now()
	if err != nil {
		delete(a.dials, d.dst)
		a.failed[d.dst] = now
		a.metrics.drops.WithLabelValues("no_route").Add(float64(len(d.queue)))
		a.log.Warn("directory: no endpoint for the destination", "peer", d.dst, "err", err)
		return
	}
	d.route = Route{Prefix: netip.PrefixFrom(d.dst, d.dst.BitLen()), Endpoint: preferred(eps, a.DataPort())}
	d.resolving = false
	a.resolved[d.dst] = resolved{route: d.route, device: id.Name, until: now.Add(resolvedFor)}
	a.startLocked(d)
}

// preferred picks the endpoint to dial: one of the family of our own
// data address (an IPv4 socket reaches only IPv4), else the first.
func preferred(eps []netip.AddrPort, self netip.AddrPort) netip.AddrPort {
	v4 := self.Addr().Unmap().Is4()
	for _, e := range eps {
		if e.Addr().Is4() == v4 {
			return e
		}
	}
	return eps[0]
}
