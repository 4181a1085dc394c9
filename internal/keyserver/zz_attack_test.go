package keyserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"path/filepath"
	"strings"
	"github.com/enclavekeys/enclave/internal/audit"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Unauthenticated connections (no client certificate at all) take every
// place of the replica's bound and hold them.
func TestZZCertlessConnsExhaustReplica(t *testing.T) {
	g := NewConnGuard(4, 2, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	var held []*tls.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 4 {
		c, err := tls.Dial("tcp", l.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(http2.ClientPreface))
		fr := http2.NewFramer(c, c)
		fr.WriteSettings()
		held = append(held, c)
	}
	time.Sleep(12 * time.Second) // past HandshakeTimeout: they stay
	t.Logf("open after 12s: %d", g.Open())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	admin := l.creds(ca.Identity{Name: "alice", Role: ca.RoleAdmin})
	conn, err := Dial(l.addr, "127.0.0.1", admin)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = api.NewAdminClient(conn).Layout(ctx, &api.LayoutRequest{})
	t.Logf("enrolled admin after 4 certless conns: %v", status.Code(err))
	if status.Code(err) == codes.OK {
		t.Fatal("not locked out")
	}
}

// A certificate the registry refuses (not the pinned one) still takes
// the device's connection places: the real device is locked out.
func TestZZStaleCertLocksOutDevice(t *testing.T) {
	g := NewConnGuard(100, 2, nil, nil)
	l := newLabWith(t, func(c *Config, _ *ca.Authority) { c.Conns = g })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	id := ca.Identity{Name: "pinned", Role: ca.RoleServer, Enclave: 3, ServerID: 77, HasServerID: true}
	real := l.creds(id)
	stale := l.creds(id)
	leaf, _ := x509.ParseCertificate(real.Cert.Certificate[0])
	admin := l.client(idAdmin)
	if _, err := admin.AddEnclave(ctx, &api.AddEnclaveRequest{Id: 3, Name: "web"}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.AddDevice(ctx, &api.AddDeviceRequest{Name: "pinned", Role: "server", Enclave: 3, ServerId: u32(77), Fingerprint: ca.Fingerprint(leaf)}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		conn, err := Dial(l.addr, "127.0.0.1", stale)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, err = api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{})
		t.Logf("stale cert RPC: %v", status.Code(err))
	}
	conn, err := Dial(l.addr, "127.0.0.1", real)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = api.NewKeyServiceClient(conn).GetServerKeys(ctx, &api.GetServerKeysRequest{})
	t.Logf("pinned cert RPC: %v", status.Code(err))
}

func TestZZOpenedSummaryTooLong(t *testing.T) {
	org := strings.Repeat("o", 40) + ".example.com"
	name := strings.Repeat("n", 64)
	who := "spiffe://" + org + "/enclave/3/server/" + name + " at 15:04:05.000"
	var opened []string
	for range maxOpenedPerEntry {
		opened = append(opened, who)
	}
	log, err := audit.Open(filepath.Join(t.TempDir(), "a.log"), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	e := audit.Entry{Caller: "keyserver", Role: "keyserver", RPC: "WatchGenerations", Decision: audit.Allow,
		Reason: "watch streams opened since 2025-01-01T00:00:00Z: 100 (nothing issued: watching generations)", Opened: opened}
	err = log.Append(e)
	t.Logf("org %d chars, item %d bytes: Append = %v; healthy: %v", len(org), len(who), err, log.Healthy())
}
