package cli

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const (
	designInner  = "4500001c000040004011b7c40a0300010a070002656e636c61766521"
	designPacket = "0402020780001234000000000000000100030007000001027e3d8bedcd5dae07920af074" +
		"3aa7fdf44207563f23cbc95a76fdc540bee02324eb8c74a06665075d08f5338c"
)

func TestPacketSealOpen(t *testing.T) {
	dir := t.TempDir()
	seal := []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,258"}
	flipped := designPacket[:len(designPacket)-1] + "d"
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"DESIGN example", append(seal, designInner), 0, designPacket + "\n", ""},
		{"empty payload", append(seal, ""), 0, "", ""},
		{"v0", []string{"packet", "seal", "--sa-key", designV0, "--psp-version", "0", "--spi", "80001234", "--iv", "7", "--vc", "3,7,258", "--next-header", "41", "00"}, 0, "", ""},
		{"open from org key", []string{"packet", "open", "--org-key", designOK, "--generation", "1", designPacket}, 0, designInner + "\n", ""},
		{"open from pair key", []string{"packet", "open", "--pair-key", designEK, designPacket}, 0, designInner + "\n", ""},
		{"open from server key", []string{"packet", "open", "--server-key", designSK, designPacket}, 0, designInner + "\n", ""},
		{"open from SA key", []string{"packet", "open", "--sa-key", designV1, designPacket}, 0, designInner + "\n", ""},

		{"wrong generation, same parity", []string{"packet", "open", "--org-key", designOK, "--generation", "3", designPacket}, 1, "", "authentication failed"},
		{"wrong generation parity", []string{"packet", "open", "--org-key", designOK, "--generation", "2", designPacket}, 1, "", "odd generation"},
		{"wrong key", []string{"packet", "open", "--pair-key", designSK, designPacket}, 1, "", "authentication failed"},
		{"tampered", []string{"packet", "open", "--sa-key", designV1, flipped}, 1, "", "authentication failed"},
		{"v0 key for v1 packet", []string{"packet", "open", "--sa-key", designV0, designPacket}, 1, "", "PSP version 1"},
		{"malformed", []string{"packet", "open", "--sa-key", designV1, designPacket[:40]}, 2, "", "malformed packet"},
		{"malformed version", []string{"packet", "open", "--sa-key", designV1, "04020213" + designPacket[8:]}, 2, "", "reserved PSP version"},
		{"not hex", []string{"packet", "open", "--sa-key", designV1, "zz"}, 2, "", "not hex"},
		{"two keys", []string{"packet", "open", "--sa-key", designV1, "--pair-key", designEK, designPacket}, 2, "", "exactly one"},
		{"org without generation", []string{"packet", "open", "--org-key", designOK, designPacket}, 2, "", "--generation"},
		{"no packet", []string{"packet", "open", "--sa-key", designV1}, 2, "", "PACKET_HEX"},

		{"seal: key length for v0", append([]string{"packet", "seal", "--psp-version", "0", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,258"}, "00"), 2, "", "want 16"},
		{"seal: iv 0", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "0", "--vc", "3,7,258", "00"}, 2, "", "starts at 1"},
		{"seal: spi index 0", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80000000", "--iv", "1", "--vc", "3,7,258", "00"}, 2, "", "index"},
		{"seal: a VC of any value, 0 too", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "0,0,0", "00"}, 0, "", ""},
		{"seal: VC and --no-vc", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,1", "--no-vc", "00"}, 2, "", "--no-vc"},
		{"seal: transport without its protocol", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--no-vc", "--mode", "transport", "00"}, 2, "", "--mode transport needs --next-header"},
		{"seal: transport with an IP next header", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--no-vc", "--mode", "transport", "--next-header", "41", "00"}, 2, "", "--mode transport takes"},
		{"open: MK1 alone", []string{"packet", "open", "--server-key-1", designSK, designPacket}, 2, "", "goes with --server-key"},
		{"seal: crypt offset past the payload", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--no-vc", "--crypt-offset", "9", "00"}, 2, "", "at most 0 here"},
		{"seal: vc short", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7", "00"}, 2, "", "I,J,K"},
		{"seal: next header", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,1", "--next-header", "6", "00"}, 2, "", "next-header"},
		{"seal: missing flag", []string{"packet", "seal", "--sa-key", designV1, "--iv", "1", "--vc", "3,7,1", "00"}, 2, "", "--spi is required"},
		{"seal: no payload", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,1"}, 2, "", "PAYLOAD_HEX"},
		{"seal: bad payload", []string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,1", "0g"}, 2, "", "not hex"},
		{"seal: pcap exists", append(append([]string{}, seal...), "--pcap", dir, "00"), 1, "", "never overwritten"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(tt.args...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d (stdout %q, stderr %q)", code, tt.code, stdout, stderr)
			}
			if tt.stdout != "" && stdout != tt.stdout {
				t.Fatalf("stdout %q, want %q", stdout, tt.stdout)
			}
			if tt.code != 0 && (!strings.Contains(stderr, tt.stderr) || strings.Count(stderr, "\n") != 1) {
				t.Fatalf("stderr %q, want one line with %q", stderr, tt.stderr)
			}
		})
	}
}

// TestPacketPcap: seal to a pcap, open it back from the pcap, and mix in a
// packet that does not open.
func TestPacketPcap(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "one.pcap")
	code, stdout, stderr := runCLI("packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "1", "--vc", "3,7,258", "--pcap", file, designInner)
	if code != 0 || stdout != "" {
		t.Fatalf("seal --pcap: exit %d, %q %q", code, stdout, stderr)
	}
	code, stdout, stderr = runCLI("packet", "open", "--org-key", designOK, "--generation", "1", "--pcap", file)
	if code != 0 || stdout != designInner+"\n" {
		t.Fatalf("open --pcap: exit %d, %q %q", code, stdout, stderr)
	}
	code, stdout, _ = runCLI("packet", "open", "--org-key", designOK, "--generation", "3", "--pcap", file)
	if code != 1 || !strings.HasPrefix(stdout, "error: frame 1: authentication failed") {
		t.Fatalf("wrong generation over pcap: exit %d, %q", code, stdout)
	}
	if code, _, _ := runCLI("packet", "open", "--sa-key", designV1, "--pcap", file, designPacket); code != 2 {
		t.Fatalf("pcap and hex together: exit %d", code)
	}
	junk := filepath.Join(dir, "junk")
	os.WriteFile(junk, []byte("not a capture"), 0o644)
	if code, _, stderr := runCLI("packet", "open", "--sa-key", designV1, "--pcap", junk); code != 2 || !strings.Contains(stderr, "pcap") {
		t.Fatalf("junk pcap: exit %d %q", code, stderr)
	}
	// A missing input file is bad input, as a missing @keyfile is.
	if code, _, _ := runCLI("packet", "open", "--sa-key", designV1, "--pcap", filepath.Join(dir, "missing")); code != 2 {
		t.Fatalf("missing pcap: exit %d", code)
	}
	if code, _, _ := runCLI("packet", "open", "--sa-key", "@"+filepath.Join(dir, "missing"), "--pcap", junk); code != 2 {
		t.Fatalf("missing key file: exit %d", code)
	}
}

// TestPacketPSPForms (issue 35): every form seal makes opens with open,
// from the SA key and from the server key as PSP's master key (MK0/MK1
// by the SPI's top bit); a pair key needs the VC in the clear and says
// what to give instead; a flipped bit is refused.
func TestPacketPSPForms(t *testing.T) {
	const other = "1111111111111111111111111111111111111111111111111111111111111111"
	udp := "3039003500160000656e636c6176652d7472616e73706f7274"
	for _, form := range [][]string{
		{"--mode", "transport", "--next-header", "17", "--no-vc", "--crypt-offset", "0"},
		{"--mode", "transport", "--next-header", "17", "--no-vc", "--crypt-offset", "1"},
		{"--mode", "transport", "--next-header", "17", "--vc", "0,0,0", "--crypt-offset", "0"},
		{"--mode", "transport", "--next-header", "17", "--vc", "3,7,258", "--crypt-offset", "3"},
		{"--next-header", "4", "--no-vc", "--crypt-offset", "6"},
		{"--next-header", "4", "--vc", "3,7,258", "--crypt-offset", "1"},
	} {
		payload := udp
		if slices.Contains(form, "4") {
			payload = designInner
		}
		code, out, stderr := runCLI(append(append([]string{"packet", "seal", "--sa-key", designV1, "--spi", "80001234", "--iv", "9"}, form...), payload)...)
		if code != 0 {
			t.Fatalf("seal %v: exit %d %s", form, code, stderr)
		}
		pkt := strings.TrimSpace(out)
		for _, keyArgs := range [][]string{
			{"--sa-key", designV1},
			{"--server-key", designSK},
			{"--server-key", other, "--server-key-1", designSK}, // SPI 80001234: top bit 1, MK1
		} {
			code, out, stderr := runCLI(append(append([]string{"packet", "open"}, keyArgs...), pkt)...)
			if code != 0 || strings.TrimSpace(out) != payload {
				t.Errorf("open %v of %v: exit %d %q %s", keyArgs, form, code, out, stderr)
			}
		}
		if code, _, stderr := runCLI("packet", "open", "--server-key", designSK, "--server-key-1", other, pkt); code != 1 || !strings.Contains(stderr, "authentication failed") {
			t.Errorf("MK1 wrong for an SPI whose top bit is 1: exit %d %s", code, stderr)
		}
		flipped := pkt[:len(pkt)-1] + string("0123456789abcdef"[(strings.IndexByte("0123456789abcdef", pkt[len(pkt)-1])+1)%16])
		if code, _, _ := runCLI("packet", "open", "--sa-key", designV1, flipped); code != 1 {
			t.Errorf("a flipped bit of %v: exit %d", form, code)
		}
		if !slices.Contains(form, "3,7,258") || slices.Contains(form, "1") && slices.Contains(form, "4") {
			if code, _, stderr := runCLI("packet", "open", "--pair-key", designEK, pkt); code != 2 || !strings.Contains(stderr, "give --server-key") {
				t.Errorf("a pair key for %v: exit %d %s", form, code, stderr)
			}
		}
	}
}
