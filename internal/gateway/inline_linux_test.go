package gateway

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/enclavekeys/enclave/internal/gsosize"
	"github.com/enclavekeys/enclave/internal/nfqueue"
	"github.com/enclavekeys/enclave/internal/orgtest"
)

// TestRunWithShortUDPLength: a queued run whose UDP length covers only
// its first datagram (a sender that builds its own GSO packets can make
// one) is dropped unread: the kernel would cut and deliver the whole IP
// payload, the datagrams past the UDP length included. The same run with
// a true length is judged as any run.
func TestRunWithShortUDPLength(t *testing.T) {
	l := newRunLab(t)
	iq := &inlineQueue{g: l.g, w: l.w}
	allowed := func(iv uint64) []byte { return l.craft(t, readVC, 0x41, iv, 700, nil) }
	run := bytes.Join([][]byte{allowed(1), allowed(2), allowed(3)}, nil)
	packetOf := func(udpLen int) *nfqueue.Packet {
		p := make([]byte, 28+len(run))
		p[0], p[8], p[9] = 0x45, 64, 17
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		copy(p[12:], []byte{10, 98, 1, 2, 10, 98, 2, 2})
		binary.BigEndian.PutUint16(p[20:], 40000)
		binary.BigEndian.PutUint16(p[22:], 1000)
		binary.BigEndian.PutUint16(p[24:], uint16(udpLen))
		copy(p[28:], run)
		return &nfqueue.Packet{ID: 1, GSO: true, Mark: gsosize.Mark(700), Payload: p, Length: len(p)}
	}
	if v, _ := iq.judge(packetOf(8 + len(run))); v != nfqueue.Accept {
		t.Fatal("an honest run of allowed datagrams was dropped")
	}
	before := orgtest.Counter(t, l.g.metrics.Registry(), "enclave_gateway_runs_total", map[string]string{"outcome": "malformed"})
	if v, _ := iq.judge(packetOf(8 + 700)); v != nfqueue.Drop {
		t.Fatal("a run whose UDP length covers its first datagram only passed")
	}
	if n := orgtest.Counter(t, l.g.metrics.Registry(), "enclave_gateway_runs_total", map[string]string{"outcome": "malformed"}); n != before+1 {
		t.Errorf("malformed runs %v, want %v", n, before+1)
	}
}
