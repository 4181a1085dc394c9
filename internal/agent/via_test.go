package agent

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/enclavekeys/enclave/internal/control"
)

// TestViaRead: a message the kernel coalesced from the relay's runs may
// hold datagrams of several origins; via hands them over unframed, one
// origin's run per message, in order, across as many reads as the
// caller's buffers need. A badly framed datagram is dropped alone; a
// message from anyone but the relay entirely.
func TestViaRead(t *testing.T) {
	relay := netip.MustParseAddrPort("10.0.0.1:1000")
	a, b := netip.MustParseAddrPort("10.0.0.2:1000"), netip.MustParseAddrPort("10.0.0.3:1000")
	frame := func(origin netip.AddrPort, body []byte) []byte {
		f := make([]byte, control.MaxRelayHeader+len(body))
		hl, err := control.PutRelayHeader(f, origin)
		if err != nil {
			t.Fatal(err)
		}
		return f[:hl+copy(f[hl:], body)]
	}
	body := func(mark byte, n int) []byte { return bytes.Repeat([]byte{mark}, n) }
	// One coalesced message: a×3, b×2, garbage, a (short), all framed to
	// one segment size but the last.
	seg := len(frame(a, body(0, 100)))
	var msg []byte
	for _, d := range [][]byte{frame(a, body(1, 100)), frame(a, body(2, 100)), frame(a, body(3, 100)), frame(b, body(4, 100)), frame(b, body(5, 100)), bytes.Repeat([]byte{0xee}, seg), frame(a, body(6, 50))} {
		msg = append(msg, d...)
	}
	v := &via{relay: relay}
	v.in = [][]byte{msg, frame(a, body(7, 10)), frame(a, body(8, 10))}
	v.sizes = []int{len(msg), len(v.in[1]), len(v.in[2])}
	v.segs = []int{seg, 0, 0}
	v.srcs = []netip.AddrPort{relay, netip.MustParseAddrPort("10.0.0.9:1000"), relay}
	v.n = 3

	type out struct {
		origin netip.AddrPort
		data   []byte
		seg    int
	}
	want := []out{
		{a, append(append(body(1, 100), body(2, 100)...), body(3, 100)...), 100},
		{b, append(body(4, 100), body(5, 100)...), 100},
		{a, body(6, 50), 0},
		{a, body(8, 10), 0},
	}
	bufs := [][]byte{make([]byte, 65535), make([]byte, 65535)}
	sizes, segs, srcs := make([]int, 2), make([]int, 2), make([]netip.AddrPort, 2)
	var got []out
	for len(got) < len(want) {
		n, err := v.Read(bufs, sizes, segs, srcs)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			got = append(got, out{srcs[i], bytes.Clone(bufs[i][:sizes[i]]), segs[i]})
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d messages, want %d", len(got), len(want))
	}
	for k := range want {
		if got[k].origin != want[k].origin || got[k].seg != want[k].seg || !bytes.Equal(got[k].data, want[k].data) {
			t.Errorf("message %d: origin %v, segment %d, %d bytes; want %v, %d, %d bytes", k, got[k].origin, got[k].seg, len(got[k].data), want[k].origin, want[k].seg, len(want[k].data))
		}
	}
}
