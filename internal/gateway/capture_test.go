package gateway

import (
	"os"
	"testing"

	"github.com/google/gopacket/pcapgo"

	"github.com/enclavekeys/enclave/internal/keys"
)

// TestCaptureRotates (issue 32): a capture to files rotates at its size:
// FILE becomes FILE.1, the older ones move up to FILE.N and the oldest go;
// every file is a whole pcapng no larger than the size, and the packets
// kept are the newest, in order.
func TestCaptureRotates(t *testing.T) {
	path := t.TempDir() + "/inner.pcapng"
	const max = 4096
	c, err := newCaptureFiles(&CaptureFiles{Path: path, MaxSize: max, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	pkt := make([]byte, 200)
	for i := range 100 {
		pkt[0] = byte(i)
		c.write(pkt, keys.VC{Enclave: 3, Peer: 7, Server: 1}, keys.SPI(i+1), Verdict(0))
	}
	c.close()
	if err := c.flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".3"); err == nil {
		t.Fatal("a third old file was kept")
	}
	var firsts []byte
	for _, p := range []string{path + ".2", path + ".1", path} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Size() > max {
			t.Fatalf("%s is %d bytes, over %d", p, st.Size(), max)
		}
		f, _ := os.Open(p)
		r, err := pcapgo.NewNgReader(f, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		n := 0
		for {
			data, _, err := r.ReadPacketData()
			if err != nil {
				break
			}
			if n == 0 {
				firsts = append(firsts, data[0])
			}
			n++
		}
		f.Close()
		if n == 0 {
			t.Fatalf("%s holds no packet", p)
		}
	}
	if !(firsts[0] < firsts[1] && firsts[1] < firsts[2]) {
		t.Fatalf("the files are not oldest to newest: first packets %v", firsts)
	}
}
