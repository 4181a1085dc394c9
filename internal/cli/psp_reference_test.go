package cli

import (
	"bytes"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// PSP's two master keys in testdata/psp (see testdata/README.md).
const (
	pspMK0 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	pspMK1 = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
)

// cleartextPayloads are what each packet of a cleartext capture becomes
// once opened: its IP packet (tunnel mode) or its IP payload (transport).
func cleartextPayloads(t *testing.T, path string, tunnel bool) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for {
		data, _, err := r.ReadPacketData()
		if err != nil {
			break
		}
		p := gopacket.NewPacket(data, layers.LayerTypeEthernet, gopacket.Default)
		var ip, payload []byte
		if v4, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
			ip, payload = append(v4.Contents, v4.Payload...), v4.Payload
		} else if v6, ok := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
			ip, payload = append(v6.Contents, v6.Payload...), v6.Payload
		} else {
			t.Fatalf("%s: a packet neither IPv4 nor IPv6", path)
		}
		if tunnel {
			out = append(out, hex.EncodeToString(ip))
		} else {
			out = append(out, hex.EncodeToString(payload))
		}
	}
	return out
}

// openReference opens every capture psp_encrypt made (dir/*.pcap but the
// cleartexts) with enclave packet open from PSP's two master keys and
// checks each packet against its cleartext; the corrupt ones fail.
func openReference(t *testing.T, dir string) int {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.pcap"))
	n := 0
	for _, path := range files {
		name := filepath.Base(path)
		if strings.Contains(name, "cleartext") {
			continue
		}
		clear := filepath.Join("..", "..", "testdata", "psp", "v4_cleartext.pcap")
		if strings.Contains(name, "_v6") {
			clear = filepath.Join("..", "..", "testdata", "psp", "v6_cleartext.pcap")
		}
		want := cleartextPayloads(t, clear, strings.HasPrefix(name, "tunnel"))
		code, out, stderr := runCLI("packet", "open", "--server-key", pspMK0, "--server-key-1", pspMK1, "--pcap", path)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if strings.Contains(name, "corrupt") {
			if code != 1 || len(lines) != len(want) || !strings.Contains(lines[0], "authentication failed") {
				t.Errorf("%s: a forced bit error: exit %d\n%s%s", name, code, out, stderr)
			}
			continue
		}
		if code != 0 || len(lines) != len(want) {
			t.Errorf("%s: exit %d, %d lines for %d packets\n%s%s", name, code, len(lines), len(want), out, stderr)
			continue
		}
		for i := range want {
			if lines[i] != want[i] {
				t.Errorf("%s packet %d:\n got %s\nwant %s", name, i+1, lines[i], want[i])
			}
		}
		n++
	}
	return n
}

// TestPSPReferenceVectors (issue 35): every configuration of Google's
// reference PSP encoder (transport and tunnel mode, AES-GCM-128 and -256,
// crypt offsets, with and without a VC, both master keys), over IPv4 and
// IPv6, opens with enclave packet open to exactly the cleartext; its
// forced bit errors are refused.
func TestPSPReferenceVectors(t *testing.T) {
	n := openReference(t, filepath.Join("..", "..", "testdata", "psp"))
	if n != 32 {
		t.Fatalf("%d reference captures opened, want 32 (16 configurations, IPv4 and IPv6)", n)
	}
	// MK0 alone for packets whose SPI chose MK1: the failure says so.
	code, out, _ := runCLI("packet", "open", "--server-key", pspMK0, "--pcap", filepath.Join("..", "..", "testdata", "psp", "tunnel_128_off_vc_v4.pcap"))
	if code != 1 || !strings.Contains(out, "has its top bit set: a PSP sender used its MK1 there; give it as --server-key-1") {
		t.Errorf("MK0 alone for MK1's packets: exit %d\n%s", code, out)
	}
	// Sealed without a VC, nothing after the header is in the clear.
	code, out, _ = runCLI("packet", "seal", "--sa-key", pspMK0, "--spi", "12345678", "--iv", "1", "--no-vc", "45")
	if code != 0 || !strings.HasPrefix(out, "04010005") {
		t.Errorf("--no-vc: crypt offset 0 by default: exit %d %s", code, out)
	}
}

// TestPSPReferenceBuilt builds the reference encoder from its source and
// opens what it makes now (where PSP_REFERENCE_SRC names google/psp's
// src/ directory and gcc, libpcap-dev and libssl-dev are installed).
func TestPSPReferenceBuilt(t *testing.T) {
	src := os.Getenv("PSP_REFERENCE_SRC")
	if src == "" {
		t.Skip("PSP_REFERENCE_SRC is not set: give it google/psp's src/ directory to build psp_encrypt here (the committed vectors in testdata/psp were made so)")
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("no gcc to build the PSP reference encoder")
	}
	out := t.TempDir()
	if b, err := exec.Command(filepath.Join("..", "..", "testdata", "psp", "make.sh"), src, out).CombinedOutput(); err != nil {
		t.Fatalf("building and running psp_encrypt: %v\n%s", err, b)
	}
	if n := openReference(t, out); n != 32 {
		t.Fatalf("%d captures made and opened, want 32", n)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "build.log")); bytes.Contains(b, []byte("error")) {
		t.Logf("build log:\n%s", b)
	}
}
