package batch

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/netnstest"
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

func testConn(t *testing.T, c *net.UDPConn, n int) *Conn {
	t.Helper()
	b, err := New(c, n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBatcher: a batch written with sendmmsg arrives whole, in order, from
// the writer's address, through recvmmsg; an IPv6 destination on an IPv4
// socket is skipped with ErrFamily while the rest still goes; neither call
// allocates.
func TestBatcher(t *testing.T) {
	for _, tc := range []struct{ name, listen string }{
		{"ipv4 socket", "127.0.0.1:0"},
		{"dual-stack socket", "[::]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			from, to := loopbackUDP(t, tc.listen), loopbackUDP(t, "127.0.0.1:0")
			w, r := testConn(t, from, 8), testConn(t, to, 8)
			dst := to.LocalAddr().(*net.UDPAddr).AddrPort()
			msgs := make([][]byte, 8)
			dsts := make([]netip.AddrPort, 8)
			for i := range msgs {
				msgs[i] = bytes.Repeat([]byte{byte(i + 1)}, 100+i)
				dsts[i] = dst
			}
			bufs := make([][]byte, 8)
			for i := range bufs {
				bufs[i] = make([]byte, 65535)
			}
			sizes, segs := make([]int, 8), make([]int, 8)
			srcs := make([]netip.AddrPort, 8)
			receive := func(want int) [][]byte {
				var got [][]byte
				for len(got) < want {
					n, err := r.Read(bufs, sizes, segs, srcs)
					if err != nil {
						t.Fatal(err)
					}
					for i := 0; i < n; i++ {
						if srcs[i].Port() != from.LocalAddr().(*net.UDPAddr).AddrPort().Port() || !srcs[i].Addr().Is4() {
							t.Fatalf("source %v", srcs[i])
						}
						msg, seg := bufs[i][:sizes[i]], segs[i]
						if seg == 0 {
							seg = len(msg)
						}
						for len(msg) > 0 {
							d := msg[:min(seg, len(msg))]
							got = append(got, append([]byte(nil), d...))
							msg = msg[len(d):]
						}
					}
				}
				return got
			}
			if n, err := w.Write(msgs, dsts); n != 8 || err != nil {
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
				want, wantErr = 6, ErrFamily
			}
			n, err := w.Write(msgs, dsts)
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
				w.Write(msgs, dsts)
				for got := 0; got < 8; {
					n, _ := r.Read(bufs, sizes, segs, srcs)
					for i := 0; i < n; i++ {
						got += (sizes[i] + max(segs[i], sizes[i]) - 1) / max(segs[i], 1)
					}
				}
			}); a != 0 {
				t.Errorf("%v allocations per batch", a)
			}
		})
	}
}

// TestBatcherOffload: a run of same-size datagrams to one peer goes as one
// offloaded run and arrives as one coalesced message with its segment size
// (where the kernel has UDP_SEGMENT and UDP_GRO), and splits back into the
// datagrams sent, in order; a run mixing peers and sizes is cut where they
// change.
func TestBatcherOffload(t *testing.T) {
	from, to, other := loopbackUDP(t, "127.0.0.1:0"), loopbackUDP(t, "127.0.0.1:0"), loopbackUDP(t, "127.0.0.1:0")
	w, r := testConn(t, from, 64), testConn(t, to, 64)
	if !w.gso || !r.gro {
		t.Skip("the kernel has no UDP segmentation offload or receive coalescing")
	}
	dst := to.LocalAddr().(*net.UDPAddr).AddrPort()
	odst := other.LocalAddr().(*net.UDPAddr).AddrPort()
	// 20 of 1200 bytes and a short one to dst, 3 to other, 10 of 1200 to dst.
	var msgs [][]byte
	var dsts []netip.AddrPort
	add := func(n, size int, d netip.AddrPort) {
		for i := 0; i < n; i++ {
			b := bytes.Repeat([]byte{byte(len(msgs))}, size)
			msgs, dsts = append(msgs, b), append(dsts, d)
		}
	}
	add(20, 1200, dst)
	add(1, 300, dst)
	add(3, 1200, odst)
	add(10, 1200, dst)
	if n, err := w.Write(msgs, dsts); n != len(msgs) || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	bufs := make([][]byte, 64)
	for i := range bufs {
		bufs[i] = make([]byte, 65535)
	}
	sizes, segs := make([]int, 64), make([]int, 64)
	srcs := make([]netip.AddrPort, 64)
	var got [][]byte
	coalesced := 0
	for len(got) < 31 {
		n, err := r.Read(bufs, sizes, segs, srcs)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			msg, seg := bufs[i][:sizes[i]], segs[i]
			if seg > 0 && seg < len(msg) {
				coalesced++
			} else {
				seg = len(msg)
			}
			for len(msg) > 0 {
				d := msg[:min(seg, len(msg))]
				got = append(got, append([]byte(nil), d...))
				msg = msg[len(d):]
			}
		}
	}
	var want [][]byte
	for i, m := range msgs {
		if dsts[i] == dst {
			want = append(want, m)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d datagrams, want %d", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("datagram %d: %d bytes of %x, want %d of %x", i, len(got[i]), got[i][0], len(want[i]), want[i][0])
		}
	}
	if coalesced == 0 {
		t.Fatal("no run arrived coalesced")
	}
	buf := make([]byte, 2048)
	for i := 0; i < 3; i++ {
		other.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, _, err := other.ReadFromUDPAddrPort(buf); err != nil || n != 1200 {
			t.Fatalf("the other peer's datagram %d: %d bytes, %v", i, n, err)
		}
	}
}

// TestBatcherRunOverMTU: a run of datagrams larger than the route's MTU
// is refused whole by the kernel; Write sends its datagrams one by one
// (the kernel fragments them), and every one arrives.
func TestBatcherRunOverMTU(t *testing.T) {
	name := netnstest.New(t, "encbatch")
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "mtu", "1400").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo mtu 1400: %v: %s", err, out)
	}
	var from, to *net.UDPConn
	netnstest.Do(t, name, func() (err error) {
		if from, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		to, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	defer from.Close()
	defer to.Close()
	w := testConn(t, from, 8)
	if !w.gso {
		t.Skip("the kernel has no UDP segmentation offload")
	}
	dst := to.LocalAddr().(*net.UDPAddr).AddrPort()
	msgs, dsts := make([][]byte, 5), make([]netip.AddrPort, 5)
	for i := range msgs {
		msgs[i], dsts[i] = bytes.Repeat([]byte{byte(i)}, 1450), dst
	}
	if n, err := w.Write(msgs, dsts); n != len(msgs) || err != nil {
		t.Fatalf("write: %d of %d, %v", n, len(msgs), err)
	}
	if !w.gso {
		t.Fatal("runs stay off after one run too large for the route")
	}
	buf := make([]byte, 65535)
	to.SetReadDeadline(time.Now().Add(5 * time.Second))
	for i := range msgs {
		n, err := to.Read(buf)
		if err != nil || !bytes.Equal(buf[:n], msgs[i]) {
			t.Fatalf("datagram %d: %d bytes, %v", i, n, err)
		}
	}
}
