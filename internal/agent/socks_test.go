package agent

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/proxy"
)

// rw is a request on one side and the replies on the other.
type rw struct {
	in  io.Reader
	out bytes.Buffer
}

func (r *rw) Read(p []byte) (int, error)  { return r.in.Read(p) }
func (r *rw) Write(p []byte) (int, error) { return r.out.Write(p) }

func TestSocksRequest(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want netip.AddrPort
		err  bool
	}{
		{"ipv4", []byte{5, 1, 0, 5, 1, 0, 1, 100, 64, 3, 1, 0, 80}, netip.MustParseAddrPort("100.64.3.1:80"), false},
		{"ipv6", append(append([]byte{5, 1, 0, 5, 1, 0, 4}, netip.MustParseAddr("fd00::1").AsSlice()...), 1, 187), netip.MustParseAddrPort("[fd00::1]:443"), false},
		{"ip as a name", append(append([]byte{5, 1, 0, 5, 1, 0, 3, 10}, "100.64.3.1"...), 0, 22), netip.MustParseAddrPort("100.64.3.1:22"), false},
		{"a host name", append(append([]byte{5, 1, 0, 5, 1, 0, 3, 11}, "example.org"...), 0, 22), netip.AddrPort{}, false},
		{"socks4", []byte{4, 1, 0, 80}, netip.AddrPort{}, true},
		{"no acceptable method", []byte{5, 1, 2}, netip.AddrPort{}, true},
		{"bind", []byte{5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80}, netip.AddrPort{}, true},
		{"bad atyp", []byte{5, 1, 0, 5, 1, 0, 9}, netip.AddrPort{}, true},
		{"short", []byte{5, 1, 0, 5, 1, 0, 1, 100}, netip.AddrPort{}, true},
	}
	for _, tt := range tests {
		got, err := socksHandshake(&rw{in: bytes.NewReader(tt.in)})
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("%s: %v %v", tt.name, got, err)
		}
	}
}

func FuzzSocksRequest(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 100, 64, 3, 1, 0, 80})
	f.Add(append(append([]byte{5, 1, 0, 5, 1, 0, 3, 11}, "example.org"...), 0, 22))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = socksHandshake(&rw{in: bytes.NewReader(b)})
	})
}

// TestSOCKS5AndExpose: a plain HTTP server on this machine, exposed on the
// server agent's overlay address, fetched through the client agent's
// SOCKS5 proxy by Go's own SOCKS5 client.
func TestSOCKS5AndExpose(t *testing.T) {
	o := pairOrg(t)
	web := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello through the enclave") })}
	wl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go web.Serve(wl)
	defer web.Close()
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, nil)
	ex, err := server.Expose(80, wl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer ex.Close()
	client := o.agentFor(clientID("laptop", 7, "100.64.7.1/16"), []Route{route(server)}, nil)
	sl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go client.ServeSOCKS5(sl)
	defer sl.Close()
	d, err := proxy.SOCKS5("tcp", sl.Addr().String(), nil, proxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	cd := d.(proxy.ContextDialer)
	hc := &http.Client{Transport: &http.Transport{DialContext: cd.DialContext}, Timeout: 20 * time.Second}
	resp, err := hc.Get("http://100.64.3.1/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hello through the enclave" {
		t.Fatalf("body %q", body)
	}
	// Somewhere without a route is unreachable at once.
	if _, err := d.Dial("tcp", "100.64.99.1:80"); err == nil {
		t.Fatal("dialled an address with no route")
	}
}
