package pcapfile

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/testvec"
)

const designPacket = "0402020780001234000000000000000100030007000001027e3d8bedcd5dae07920af074" +
	"3aa7fdf44207563f23cbc95a76fdc540bee02324eb8c74a06665075d08f5338c"

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, Options{})
	if err != nil {
		t.Fatal(err)
	}
	payloads := [][]byte{testvec.Hex(t, designPacket), {}, bytes.Repeat([]byte{7}, 1400)}
	ts := time.Unix(1764000000, 123000).UTC()
	for _, p := range payloads {
		if err := w.WritePacket(p, ts); err != nil {
			t.Fatal(err)
		}
	}
	got, err := readAll(bytes.NewReader(buf.Bytes()), packet.DefaultPort)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(payloads) {
		t.Fatalf("read %d packets, wrote %d", len(got), len(payloads))
	}
	for i, p := range got {
		if p.Index != i+1 || !bytes.Equal(p.Payload, payloads[i]) || p.Skip != "" || !p.Timestamp.Equal(ts) {
			t.Fatalf("packet %d: %+v", i, p)
		}
	}
	// The frame is well formed: Ethernet/IPv4/UDP to port 1000 with valid
	// checksums, as Wireshark will see it.
	r, _ := pcapgo.NewReader(bytes.NewReader(buf.Bytes()))
	data, _, err := r.ReadPacketData()
	if err != nil {
		t.Fatal(err)
	}
	pkt := gopacket.NewPacket(data, layers.LinkTypeEthernet, gopacket.Default)
	if el := pkt.ErrorLayer(); el != nil {
		t.Fatalf("decode: %v", el.Error())
	}
	ip := pkt.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	udp := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
	if udp.DstPort != 1000 || ip.Protocol != layers.IPProtocolUDP || udp.Checksum == 0 {
		t.Fatalf("outer headers: port %d proto %v checksum %#x", udp.DstPort, ip.Protocol, udp.Checksum)
	}
	// Recompute the UDP checksum and compare.
	want := udp.Checksum
	udp.Checksum = 0
	_ = udp.SetNetworkLayerForChecksum(ip)
	sb := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(sb, gopacket.SerializeOptions{ComputeChecksums: true}, udp, gopacket.Payload(udp.Payload)); err != nil {
		t.Fatal(err)
	}
	if got := uint16(sb.Bytes()[6])<<8 | uint16(sb.Bytes()[7]); got != want {
		t.Fatalf("UDP checksum %#x, recomputed %#x", want, got)
	}
}

func TestReadSkipsOtherTraffic(t *testing.T) {
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, Options{DstPort: 53})
	_ = w.WritePacket([]byte("dns"), time.Unix(0, 0))
	got, err := readAll(&buf, packet.DefaultPort)
	if err != nil || len(got) != 1 || got[0].Payload != nil || got[0].Skip != "UDP to port 53" {
		t.Fatalf("%+v, %v", got, err)
	}
}

func TestReadPcapng(t *testing.T) {
	var buf bytes.Buffer
	ng, err := pcapgo.NewNgWriter(&buf, layers.LinkTypeEthernet)
	if err != nil {
		t.Fatal(err)
	}
	var pc bytes.Buffer
	w, _ := NewWriter(&pc, Options{})
	_ = w.WritePacket(testvec.Hex(t, designPacket), time.Unix(1, 0))
	r, _ := pcapgo.NewReader(bytes.NewReader(pc.Bytes()))
	data, ci, _ := r.ReadPacketData()
	ci.InterfaceIndex = 0
	if err := ng.WritePacket(ci, data); err != nil {
		t.Fatal(err)
	}
	_ = ng.Flush()
	got, err := readAll(&buf, 0)
	if err != nil || len(got) != 1 || !bytes.Equal(got[0].Payload, testvec.Hex(t, designPacket)) {
		t.Fatalf("pcapng: %+v, %v", got, err)
	}
}

func TestReadRejectsGarbage(t *testing.T) {
	for _, in := range [][]byte{nil, []byte("hello"), bytes.Repeat([]byte{0xff}, 40)} {
		if _, err := readAll(bytes.NewReader(in), 0); !errors.Is(err, ErrFormat) {
			t.Errorf("%q: %v", in, err)
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, Options{SrcIP: []byte{1, 2, 3}}); err == nil {
		t.Error("bad source address accepted")
	}
}

// readAll reads every frame of a capture.
func readAll(r io.Reader, port uint16) ([]Packet, error) {
	rd, err := NewReader(r, port)
	if err != nil {
		return nil, err
	}
	var out []Packet
	for {
		p, err := rd.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, p)
	}
}

// records is an endless-looking pcap stream: a file header, then n
// records of empty frames, generated as they are read.
type records struct {
	hdr  []byte
	n    int
	left []byte
}

func (r *records) Read(p []byte) (int, error) {
	if len(r.left) == 0 {
		switch {
		case r.hdr != nil:
			r.left, r.hdr = r.hdr, nil
		case r.n > 0:
			r.left = make([]byte, 16) // ts, ts, caplen 0, len 0
			r.n--
		default:
			return 0, io.EOF
		}
	}
	n := copy(p, r.left)
	r.left = r.left[n:]
	return n, nil
}

// TestStreams: a large capture is read in constant memory (the whole file
// used to be read first, and every frame kept).
func TestStreams(t *testing.T) {
	var hdr bytes.Buffer
	if _, err := NewWriter(&hdr, Options{}); err != nil {
		t.Fatal(err)
	}
	const frames = 600_000 // about 10 MB of records
	rd, err := NewReader(&records{hdr: hdr.Bytes(), n: frames}, 0)
	if err != nil {
		t.Fatal(err)
	}
	var peak uint64
	var ms runtime.MemStats
	for i := 0; ; i++ {
		p, err := rd.Next()
		if err == io.EOF {
			if i != frames {
				t.Fatalf("read %d frames, want %d", i, frames)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if p.Skip == "" {
			t.Fatal("an empty frame read as UDP")
		}
		if i%100_000 == 0 {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
		}
	}
	if peak > 32<<20 {
		t.Fatalf("live heap reached %d MB reading a 10 MB capture", peak>>20)
	}
}

// TestHostileBlockLengths: a pcapng block that claims more than it may
// hold is refused before anything is allocated for it.
func TestHostileBlockLengths(t *testing.T) {
	shb := []byte{0x0a, 0x0d, 0x0d, 0x0a, 28, 0, 0, 0, 0x4d, 0x3c, 0x2b, 0x1a, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 28, 0, 0, 0}
	huge := append(bytes.Clone(shb), 6, 0, 0, 0, 0xf0, 0xff, 0xff, 0x7f)
	if _, err := readAll(bytes.NewReader(huge), 0); !errors.Is(err, ErrFormat) {
		t.Fatalf("2 GB block: %v", err)
	}
	epb := make([]byte, 32)
	copy(epb, []byte{6, 0, 0, 0, 32, 0, 0, 0})
	epb[20] = 0xff // captured length 255 in a block with no room
	if _, err := readAll(bytes.NewReader(append(bytes.Clone(shb), epb...)), 0); !errors.Is(err, ErrFormat) {
		t.Fatalf("captured length past its block: %v", err)
	}
}

// FuzzRead: any bytes are refused or read without panicking.
func FuzzRead(f *testing.F) {
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, Options{})
	_ = w.WritePacket(testvec.Hex(f, designPacket), time.Unix(0, 0))
	f.Add(buf.Bytes())
	f.Add([]byte{0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		pkts, _ := readAll(bytes.NewReader(in), 0)
		for _, p := range pkts {
			if p.Payload == nil && p.Skip == "" {
				t.Fatalf("frame %d has neither payload nor reason", p.Index)
			}
		}
	})
}

// TestRawWriter: inner IP packets with comments, read back by gopacket's
// pcapng reader and, where it is installed, by tshark with their comments.
func TestRawWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "inner.pcapng")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewRawWriter(f)
	if err != nil {
		t.Fatal(err)
	}
	pkts := [][]byte{
		unhexT(t, "4500001c000040004011b7c40a0300010a070002656e636c61766521"), // UDP "enclave!"
		unhexT(t, "450000210001000040017cc60a0300010a07000208004d6a000100016869"),
	}
	ts := time.Unix(1764000000, 123456000)
	for i, p := range pkts {
		if err := w.WritePacket(p, ts, fmt.Sprintf("sa spi=8000123%d vc=3,7,258", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.WritePacket(make([]byte, MaxFrame+1), ts, ""); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversize: %v", err)
	}
	f.Close()
	r, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ng, err := pcapgo.NewNgReader(r, pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	if ng.LinkType() != layers.LinkTypeRaw {
		t.Fatalf("link type %v", ng.LinkType())
	}
	for i, want := range pkts {
		data, ci, err := ng.ReadPacketData()
		if err != nil || !bytes.Equal(data, want) || !ci.Timestamp.Equal(ts) {
			t.Fatalf("packet %d: %x %v %v", i, data, ci.Timestamp, err)
		}
	}
	if _, err := exec.LookPath("tshark"); err != nil {
		t.Log("tshark is not installed: the comments are not read back")
		return
	}
	out, err := exec.Command("tshark", "-r", path, "-T", "fields", "-e", "frame.comment", "-e", "ip.proto").CombinedOutput()
	if err != nil {
		t.Fatalf("tshark: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "sa spi=80001230 vc=3,7,258\t17") || !strings.Contains(string(out), "sa spi=80001231 vc=3,7,258\t1") {
		t.Fatalf("tshark read:\n%s", out)
	}
}

func unhexT(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCookedV2AndTruncated: a capture of tcpdump -i any (Linux cooked v2,
// link type 276) yields its UDP payloads; a frame the snap length cut is
// marked truncated, not handed on as if whole.
func TestCookedV2AndTruncated(t *testing.T) {
	udp := []byte{0x30, 0x39, 0x03, 0xe8, 0, 12, 0, 0, 'p', 's', 'p', '!'} // to port 1000
	ip := append([]byte{0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1}, udp...)
	frame := append(append([]byte{0x08, 0x00, 0, 0, 0, 0, 0, 1, 0, 1, 0, 6}, make([]byte, 8)...), ip...) // SLL2: protocol IPv4
	var b bytes.Buffer
	hdr := []byte{0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0x14, 0x01, 0, 0} // little-endian, snaplen 65535, link type 276
	b.Write(hdr)
	record := func(data []byte, orig int) {
		rec := make([]byte, 16)
		rec[8], rec[12] = byte(len(data)), byte(orig)
		b.Write(rec)
		b.Write(data)
	}
	record(frame, len(frame))
	record(frame[:len(frame)-4], len(frame)) // cut by the snap length
	rd, err := NewReader(bytes.NewReader(b.Bytes()), 1000)
	if err != nil {
		t.Fatal(err)
	}
	p, err := rd.Next()
	if err != nil || string(p.Payload) != "psp!" || p.Truncated != "" {
		t.Fatalf("a cooked v2 frame: %+v %v", p, err)
	}
	p, err = rd.Next()
	if err != nil || p.Truncated == "" || !strings.Contains(p.Truncated, "48 of 52 bytes") {
		t.Fatalf("a truncated frame: %+v %v", p, err)
	}
}
