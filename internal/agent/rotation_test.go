package agent

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/keys"
)

// TestRotationLateGrant: an SA granted under the old key while the new
// one was being installed is added after the rotation made its list of
// SAs to move. Its client is asked all the same (by the next pass), as
// are the clients of the SAs on the list; an SA already replaced by one of
// the new generation is not asked, nor one with another enclave (its
// pair did not rotate; generations are counted per pair).
func TestRotationLateGrant(t *testing.T) {
	sink, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}) // the clients' control ports
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	ctrl := sink.LocalAddr().(*net.UDPAddr).AddrPort()
	now := time.Now()
	a := timerAgent(t, &now, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a.ctx = ctx
	sa := func(i, peer int, j keys.EnclaveID, gen keys.Generation) *conn {
		c := fakeSA(i, peer, true, now.Add(time.Hour), netip.AddrPort{})
		c.vc = keys.VC{Enclave: 3, Peer: j, Server: 7}
		c.gen, c.session.Remote = gen, uint32(1000+i)
		c.setControl(ctrl)
		a.mu.Lock()
		a.t.add(c, now)
		a.mu.Unlock()
		return c
	}
	sa(0, 0, 7, 1)
	sa(1, 1, 7, 1)
	sa(2, 2, 7, 1)
	sa(3, 2, 7, 2) // client 2 already moved
	sa(5, 5, 9, 1) // pair 3-9 did not rotate
	a.rotated(7, 2)
	sa(4, 4, 7, 1) // granted under the old key, added just after

	asked := map[uint32]bool{}
	buf := make([]byte, 256)
	sink.SetReadDeadline(time.Now().Add(1500 * time.Millisecond)) // all three passes
	for {
		n, err := sink.Read(buf)
		if err != nil {
			break
		}
		m, err := control.ParseSealed(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		asked[m.Receiver] = true
	}
	var got []uint32
	for r := range asked {
		got = append(got, r)
	}
	slices.Sort(got)
	if want := []uint32{1000, 1001, 1004}; !slices.Equal(got, want) {
		t.Fatalf("notices went to the sessions %v, want %v", got, want)
	}
}
