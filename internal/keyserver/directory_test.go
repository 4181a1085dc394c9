package keyserver

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/registry"
)

// TestEndpointDirectory: a server registers its data endpoints, signed; a
// client of an allowed pair resolves it and checks the entry itself; a
// changed entry does not check out; a client of a pair not allowed, one
// with no enclave, and a non-server registering are refused.
func TestEndpointDirectory(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	admin := l.client(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	for _, e := range []uint32{3, 7, 9} {
		if _, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: e, Name: fmt.Sprintf("e%d", e)}); err != nil {
			t.Fatal(err)
		}
	}
	admin.AllowPair(ctx, &api.AllowPairRequest{A: 3, B: 7})
	k := uint32(258)
	for _, d := range []*api.AddDeviceRequest{{Name: "web1", Role: "server", Enclave: 3, ServerId: &k}, {Name: "laptop", Role: "client", Enclave: 7},
		{Name: "stranger", Role: "client", Enclave: 9}, {Name: "nomad", Role: "client"}} {
		if _, err := admin.AddDevice(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	// laptop watches: a change of web1's entry reaches it.
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	watch, err := l.client(ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7, Overlay: netip.MustParsePrefix("100.64.7.1/16")}).WatchGenerations(wctx, &api.WatchGenerationsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan *api.GenerationEvent, 64)
	go func() {
		for {
			ev, err := watch.Recv()
			if err != nil {
				close(events)
				return
			}
			events <- ev
		}
	}()
	webID := ca.Identity{Name: "web1", Role: ca.RoleServer, Enclave: 3, ServerID: 258, HasServerID: true, Overlay: netip.MustParsePrefix("100.64.3.1/16")}
	webCreds := l.creds(webID)
	web := l.clientWith(webCreds)
	data := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.10:1000"), netip.MustParseAddrPort("[2001:db8::10]:1000")}
	at := l.clock.Now()
	sig := ed25519.Sign(webCreds.Cert.PrivateKey.(ed25519.PrivateKey), registry.EndpointSigned("web1", data, at))
	req := &api.RegisterEndpointRequest{Data: []string{data[0].String(), data[1].String()}, At: timestamppb.New(at), Signature: sig, Cert: webCreds.Cert.Certificate[0]}
	if _, err := web.RegisterEndpoint(ctx, req); err != nil {
		t.Fatalf("register: %v", err)
	}
	deadline := time.After(10 * time.Second)
	for got := false; !got; {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("the watch ended")
			}
			if ev.GetKind() == api.GenerationEvent_ENDPOINT {
				if ev.GetDevice() != "web1" {
					t.Fatalf("an ENDPOINT event for %q", ev.GetDevice())
				}
				got = true
			}
		case <-deadline:
			t.Fatal("no ENDPOINT event reached the client's watch")
		}
	}
	laptop := l.client(ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7, Overlay: netip.MustParsePrefix("100.64.7.1/16")})
	e, err := laptop.ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: "100.64.3.1"})
	if err != nil {
		t.Fatalf("resolve: %v", err)
	}
	got, id, err := keyclient.VerifyEndpoint(l.auth.Roots(), e, netip.MustParseAddr("100.64.3.1"), t0)
	if err != nil || id.Name != "web1" || len(got) != 2 || got[0] != data[0] {
		t.Fatalf("the entry: %v %v %v", got, id, err)
	}
	// An entry its server has not renewed for MaxEndpointAge is stale (a
	// key service could otherwise serve it for ever), as is one signed
	// for the future; just inside either bound it checks out.
	ahead := func(d time.Duration) *api.EndpointEntry { // as a server with a fast clock signs
		f := proto.Clone(e).(*api.EndpointEntry)
		f.At = timestamppb.New(at.Add(d))
		f.Signature = ed25519.Sign(webCreds.Cert.PrivateKey.(ed25519.PrivateKey), registry.EndpointSigned("web1", data, at.Add(d)))
		return f
	}
	for _, c := range []struct {
		name  string
		e     *api.EndpointEntry
		now   time.Time
		stale bool
	}{
		{"just within the age", e, at.Add(keyclient.MaxEndpointAge - time.Second), false},
		{"past the age", e, at.Add(keyclient.MaxEndpointAge + time.Second), true},
		{"signed 4 minutes ahead", ahead(4 * time.Minute), at, false},
		{"signed 6 minutes ahead", ahead(6 * time.Minute), at, true},
	} {
		_, _, err := keyclient.VerifyEndpoint(l.auth.Roots(), c.e, netip.MustParseAddr("100.64.3.1"), c.now)
		if c.stale != errors.Is(err, keyclient.ErrStale) || c.stale != errors.Is(err, keyclient.ErrEntry) || (!c.stale && err != nil) {
			t.Errorf("%s: %v (stale: %v)", c.name, err, c.stale)
		}
	}
	// A key service that changes an entry is caught by the client.
	e.Data[0] = "203.0.113.66:1000"
	if _, _, err := keyclient.VerifyEndpoint(l.auth.Roots(), e, netip.MustParseAddr("100.64.3.1"), t0); err == nil {
		t.Fatal("a changed entry checked out")
	}
	if _, _, err := keyclient.VerifyEndpoint(l.auth.Roots(), e, netip.MustParseAddr("100.64.3.2"), t0); err == nil {
		t.Fatal("an entry for another address checked out")
	}
	for _, c := range []struct {
		who  ca.Identity
		code codes.Code
	}{
		{ca.Identity{Name: "stranger", Role: ca.RoleClient, Enclave: 9}, codes.NotFound},
		{ca.Identity{Name: "nomad", Role: ca.RoleClient}, codes.PermissionDenied},
	} {
		if _, err := l.client(c.who).ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: "100.64.3.1"}); status.Code(err) != c.code {
			t.Errorf("%s resolving: %v, want %v", c.who.Name, err, c.code)
		}
	}
	// An address no server registered, and one whose server the caller
	// may not reach, answer alike (issue 31: no existence probe); each is
	// audited, and a caller that keeps probing is throttled.
	_, none := laptop.ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: "100.64.3.99"})
	_, barred := l.client(ca.Identity{Name: "stranger", Role: ca.RoleClient, Enclave: 9}).ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: "100.64.3.1"})
	if status.Code(none) != codes.NotFound || strings.NewReplacer("3.99", "3.1", "laptop", "stranger").Replace(status.Convert(none).Message()) != status.Convert(barred).Message() {
		t.Fatalf("a free address and a barred server answer apart: %v / %v", none, barred)
	}
	if log := readFile(t, l.audit); !strings.Contains(log, "100.64.3.99: no server registered there") || !strings.Contains(log, "pair 3-9 is not allowed") {
		t.Fatalf("the causes are not in the audit log:\n%s", log)
	}
	lapCreds := l.creds(ca.Identity{Name: "laptop", Role: ca.RoleClient, Enclave: 7, Overlay: netip.MustParsePrefix("100.64.7.1/16")})
	lsig := ed25519.Sign(lapCreds.Cert.PrivateKey.(ed25519.PrivateKey), registry.EndpointSigned("laptop", data, at))
	if _, err := l.clientWith(lapCreds).RegisterEndpoint(ctx, &api.RegisterEndpointRequest{Data: req.Data, At: req.At, Signature: lsig, Cert: lapCreds.Cert.Certificate[0]}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a client registering: %v", err)
	}
	bad := &api.RegisterEndpointRequest{Data: req.Data, At: req.At, Signature: lsig, Cert: req.Cert}
	if _, err := web.RegisterEndpoint(ctx, bad); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a registration signed by another key: %v", err)
	}
	if _, err := web.RegisterEndpoint(ctx, &api.RegisterEndpointRequest{Data: req.Data, At: req.At, Signature: lsig, Cert: lapCreds.Cert.Certificate[0]}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a server registering another device's certificate: %v", err)
	}
	_, throttled := tally(t, 40, codes.NotFound, func(i int) codes.Code {
		_, err := laptop.ResolveEndpoint(ctx, &api.ResolveEndpointRequest{Overlay: fmt.Sprintf("100.64.4.%d", i+1)})
		return status.Code(err)
	})
	if throttled == 0 {
		t.Fatal("40 probes of the directory in a row were never throttled")
	}
}
