package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/enclavekeys/enclave/internal/agent"
	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// subEnclaves is the sub-enclave step (DESIGN §3a): a second, small
// organisation made with layout 8.8, since a layout is chosen when an org
// is created. Enclave 3 holds sub-enclaves 3.1 (server web) and 3.2
// (server db); a client in 7 reaches both through the relay of an auditor
// granted the sub-pair 3.2-7 only. The auditor reads the db traffic and
// passes the web traffic unread.
func (s *scenario) subEnclaves(st *Step) error {
	o, err := newOrg(filepath.Join(s.o.dir, "sub-enclaves"), s.o.log.With("org", "sub-enclaves"))
	if err != nil {
		return err
	}
	defer o.stop()
	if err := o.startOrgTier(s.ctx, "ks-org", registry.Rotation{Interval: labInterval, Grace: labGrace}); err != nil {
		return err
	}
	l, _ := keys.ParseLayout("8.8")
	if err := o.servers["ks-org"].svc.SetLayout(s.ctx, l); err != nil {
		return err
	}
	id := func(dotted string) keys.EnclaveID { v, _ := l.ParseID(dotted); return v }
	ctx, cancel := context.WithTimeout(s.ctx, 20*time.Second)
	defer cancel()
	k := func(v uint32) *uint32 { return &v }
	for _, e := range []struct{ id, name string }{{"3", "corp"}, {"3.1", "web"}, {"3.2", "db"}, {"7", "users"}} {
		if _, err := o.admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: uint32(id(e.id)), Name: e.name}); err != nil {
			return fmt.Errorf("enclave %s: %w", e.id, err)
		}
	}
	for _, d := range []*api.AddDeviceRequest{
		{Name: "ks-org", Role: "keyserver"},
		{Name: "web", Role: "server", Enclave: uint32(id("3.1")), ServerId: k(31)},
		{Name: "db", Role: "server", Enclave: uint32(id("3.2")), ServerId: k(32)},
		{Name: "user", Role: "client", Enclave: uint32(id("7"))},
		{Name: "auditor", Role: "gateway", Enclave: uint32(id("7"))},
	} {
		if _, err := o.admin.AddDevice(ctx, d); err != nil {
			return fmt.Errorf("device %s: %w", d.Name, err)
		}
	}
	if _, err := o.admin.AllowPair(ctx, &api.AllowPairRequest{A: uint32(id("3")), B: uint32(id("7"))}); err != nil {
		return err
	}
	if _, err := o.admin.AddGrant(ctx, &api.AddGrantRequest{Device: "auditor", Pairs: []*api.Pair{{A: uint32(id("3.2")), B: uint32(id("7"))}}}); err != nil {
		return err
	}

	addrs := map[string]netip.Addr{}
	var routes []agent.Route
	for _, sv := range []struct {
		name, enclave, addr string
		k                   keys.ServerID
	}{{"web", "3.1", "100.64.3.1/16", 31}, {"db", "3.2", "100.64.3.2/16", 32}} {
		a, err := o.startAgent(ca.Identity{Name: sv.name, Role: ca.RoleServer, Enclave: id(sv.enclave), ServerID: sv.k, HasServerID: true, Overlay: ip(sv.addr)}, "ks-org", nil, netip.AddrPort{})
		if err != nil {
			return err
		}
		ln, err := a.Net().ListenTCPAddrPort(netip.AddrPortFrom(a.Addr(), 7))
		if err != nil {
			return err
		}
		o.onStop(func() { ln.Close() })
		go echoTCP(ln)
		addrs[sv.name] = a.Addr()
		routes = append(routes, agent.Route{Prefix: netip.PrefixFrom(a.Addr(), 32), Endpoint: a.DataPort()})
	}
	auditor, err := o.startGateway(ca.Identity{Name: "auditor", Role: ca.RoleGateway, Enclave: id("7")}, false, "")
	if err != nil {
		return err
	}
	user, err := o.startAgent(ca.Identity{Name: "user", Role: ca.RoleClient, Enclave: id("7"), Overlay: ip("100.64.7.1/16")}, "", routes, auditor.RelayAddr())
	if err != nil {
		return err
	}
	for _, srv := range []string{"web", "db"} {
		msg := make([]byte, 16<<10)
		for i := range msg {
			msg[i] = byte(s.rng.IntN(256))
		}
		if err := echoTo(s.ctx, user, netip.AddrPortFrom(addrs[srv], 7), msg, 10*time.Second); err != nil {
			return fmt.Errorf("user → %s: %w", srv, err)
		}
	}
	count := func(pair, outcome string) float64 {
		return counter(auditor.Metrics().Registry(), "enclave_gateway_pair_packets_total", map[string]string{"pair": pair, "outcome": outcome})
	}
	readDB, opaqueWeb, readWeb := count("3.2-7", "read"), count("3.1-7", "opaque"), count("3.1-7", "read")
	st.fig("layout", l.String())
	st.fig("auditor granted", "3.2-7 (EK_2 only)")
	st.fig("auditor read 3.2-7", readDB)
	st.fig("auditor opaque 3.1-7", opaqueWeb)
	st.fig("auditor read 3.1-7", readWeb)
	if readDB <= 0 || opaqueWeb <= 0 || readWeb > 0 {
		return errors.New("the auditor did not read exactly its sub-pair")
	}
	return nil
}
