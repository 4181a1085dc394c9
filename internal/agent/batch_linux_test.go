package agent

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

func loopbackUDP(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Skipf("no loopback socket %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	return c
}

// TestBatcher: a batch written with sendmmsg arrives whole, in order, from
// the writer's address, through recvmmsg; an IPv6 destination on an IPv4
// socket is skipped with errFamily while the rest still goes; neither call
// allocates.
func TestBatcher(t *testing.T) {
	for _, tc := range []struct{ name, listen string }{
		{"ipv4 socket", "127.0.0.1:0"},
		{"dual-stack socket", "[::]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			from, to := loopbackUDP(t, tc.listen), loopbackUDP(t, "127.0.0.1:0")
			w, err := newBatcher(from, 8)
			if err != nil {
				t.Fatal(err)
			}
			r, err := newBatcher(to, 8)
			if err != nil {
				t.Fatal(err)
			}
			dst := to.LocalAddr().(*net.UDPAddr).AddrPort()
			msgs := make([][]byte, 8)
			dsts := make([]netip.AddrPort, 8)
			for i := range msgs {
				msgs[i] = bytes.Repeat([]byte{byte(i + 1)}, 100+i)
				dsts[i] = dst
			}
			bufs := make([][]byte, 8)
			for i := range bufs {
				bufs[i] = make([]byte, 2048)
			}
			sizes := make([]int, 8)
			srcs := make([]netip.AddrPort, 8)
			receive := func(want int) [][]byte {
				var got [][]byte
				for len(got) < want {
					n, err := r.read(bufs, sizes, srcs)
					if err != nil {
						t.Fatal(err)
					}
					for i := 0; i < n; i++ {
						if srcs[i].Port() != from.LocalAddr().(*net.UDPAddr).AddrPort().Port() || !srcs[i].Addr().Is4() {
							t.Fatalf("source %v", srcs[i])
						}
						got = append(got, append([]byte(nil), bufs[i][:sizes[i]]...))
					}
				}
				return got
			}
			if n, err := w.write(msgs, dsts); n != 8 || err != nil {
				t.Fatalf("write: %d, %v", n, err)
			}
			for i, g := range receive(8) {
				if !bytes.Equal(g, msgs[i]) {
					t.Fatalf("datagram %d: %x", i, g)
				}
			}

			// A datagram the kernel refuses (too large) and, on an IPv4
			// socket, one to an IPv6 peer: skipped, and the rest still go
			// (nothing leaves the host: the IPv6 one is refused before the
			// system call).
			msgs[2] = make([]byte, 70000)
			want, wantErr := 7, error(nil)
			if tc.listen == "127.0.0.1:0" {
				dsts[5] = netip.MustParseAddrPort("[2001:db8::1]:9")
				want, wantErr = 6, errFamily
			}
			n, err := w.write(msgs, dsts)
			if n != want || err == nil || (wantErr != nil && !errors.Is(err, wantErr)) {
				t.Fatalf("write with refused datagrams: %d, %v", n, err)
			}
			got := receive(want)
			if !bytes.Equal(got[2], msgs[3]) || !bytes.Equal(got[want-1], msgs[7]) {
				t.Fatalf("the batch did not go on after the refused datagrams")
			}
			msgs[2] = bytes.Repeat([]byte{3}, 102)
			dsts[5] = dst

			if a := testing.AllocsPerRun(50, func() {
				w.write(msgs, dsts)
				for got := 0; got < 8; {
					n, _ := r.read(bufs, sizes, srcs)
					got += n
				}
			}); a != 0 {
				t.Errorf("%v allocations per batch", a)
			}
		})
	}
}
