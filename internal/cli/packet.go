package cli

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/pcapfile"
	"github.com/enclavekeys/enclave/internal/sa"
)

func newPacketCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "packet",
		Short: "Seal and open PSP packets: Enclave's (tunnel mode, a VC) and any other PSP sender's",
	}
	cmd.AddCommand(newPacketSealCmd(streams), newPacketOpenCmd(streams))
	return cmd
}

func newPacketSealCmd(streams IO) *cobra.Command {
	var saKey, spiText, ivText, vcText, versionText, nextText, pcapPath, mode string
	var noVC bool
	var cryptOffset uint8
	cmd := &cobra.Command{
		Use:   "seal --sa-key K --spi HEX --iv N (--vc I,J,K | --no-vc) [--mode tunnel|transport] [--crypt-offset N] [--pcap FILE] [flags] PAYLOAD_HEX",
		Short: "Encrypt a payload into a PSP packet (Enclave's form, or any other)",
		Long: `Seal PAYLOAD_HEX ("" for none) under an SA key and print the packet as it
follows the UDP header, in lowercase hex: PSP header, VC, encrypted payload,
ICV. By default the packet is Enclave's own: tunnel mode (the payload is an
IP packet, --next-header 4 or 41), a VC, crypt offset 2 (the VC in the
clear). Any other PSP form can be made, as other PSP senders make them:
--mode transport (the payload is a transport's header and data,
--next-header its protocol: 6 TCP, 17 UDP), --no-vc, --crypt-offset N (in
4-octet units after the 16-byte PSP header: 0 encrypts the VC, 1 its
second half, more leaves that much of the payload in the clear,
authenticated), a VC of any value (I,J,K in decimal: two 16-bit enclave
ids and a 32-bit server id). With --pcap FILE, write a one-packet pcap (Ethernet/IPv4/UDP to port
1000) that Wireshark opens, instead.`,
		Example: `  enclave packet seal --sa-key 9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e \
      --spi 80001234 --iv 1 --vc 3,7,258 4500001c000040004011b7c40a0300010a070002656e636c61766521
  enclave packet seal --sa-key 000102030405060708090a0b0c0d0e0f --psp-version 0 --spi 12345678 --iv 1 \
      --mode transport --next-header 17 --no-vc --crypt-offset 1 3039003500100000656e636c61766521`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("give exactly one PAYLOAD_HEX argument (\"\" for an empty payload), got %d", len(args))
			}
			for _, f := range []string{"sa-key", "spi", "iv"} {
				if !cmd.Flags().Changed(f) {
					return usagef("--%s is required", f)
				}
			}
			if noVC == cmd.Flags().Changed("vc") {
				return usagef("give --vc I,J,K or --no-vc")
			}
			var h packet.Header
			var err error
			if h.Version, err = keys.ParseVersion(versionText); err != nil {
				return usagef("--psp-version: %w", err)
			}
			key, err := readHexFlag("--sa-key", saKey, h.Version.KeySize())
			if err != nil {
				return usagef("%w (PSP version %d)", err, h.Version)
			}
			defer clear(key)
			if h.SPI, err = keys.ParseSPI(spiText); err != nil {
				return usagef("--spi: %w", err)
			}
			if h.IV, err = strconv.ParseUint(ivText, 10, 64); err != nil || h.IV == 0 {
				return usagef("--iv %q: want a decimal IV from 1 to %d (the counter starts at 1)", echo.Cut(ivText), uint64(sa.MaxIV))
			}
			if !noVC {
				if h.VC, err = parseAnyVC(vcText); err != nil {
					return usageError(err)
				}
			}
			next, err := strconv.ParseUint(nextText, 10, 8)
			if err != nil {
				return usagef("--next-header %q: want a protocol number, 0 to 255", echo.Cut(nextText))
			}
			h.NextHeader = uint8(next)
			switch tunnel := h.NextHeader == packet.NextIPv4 || h.NextHeader == packet.NextIPv6; {
			case mode == "tunnel" && !tunnel:
				return usagef("--next-header %d: tunnel mode carries IPv4 (4) or IPv6 (41); --mode transport for a transport's payload", next)
			case mode == "transport" && !cmd.Flags().Changed("next-header"):
				return usagef("--mode transport needs --next-header, the payload's transport protocol (6 TCP, 17 UDP, ...)")
			case mode == "transport" && tunnel:
				return usagef("--mode transport takes the payload's transport protocol as --next-header (6 TCP, 17 UDP), not %d", next)
			case mode != "tunnel" && mode != "transport":
				return usagef("--mode %q: want tunnel or transport", echo.Cut(mode))
			}
			if noVC && !cmd.Flags().Changed("crypt-offset") {
				cryptOffset = 0 // no VC to keep clear: everything after the header is encrypted
			}
			if cryptOffset > 63 {
				return usagef("--crypt-offset %d: at most 63 (6 bits)", cryptOffset)
			}
			payload, err := hex.DecodeString(args[0])
			if err != nil {
				return usagef("PAYLOAD_HEX is not hex: %v", err)
			}
			if len(payload) > packet.MaxInner {
				return usagef("PAYLOAD_HEX: %d bytes, at most %d", len(payload), packet.MaxInner)
			}
			g, err := packet.NewAEAD(h.Version, key)
			if err != nil {
				return usageError(err)
			}
			defer g.Reset()
			pkt, err := packet.SealPSP(make([]byte, packet.Overhead+len(payload)), &h, packet.PSPForm{NoVC: noVC, CryptOffset: cryptOffset}, g, payload)
			if errors.Is(err, packet.ErrCryptOffset) {
				hdr := packet.HeaderLen
				if noVC {
					hdr = packet.PSPHeaderLen
				}
				return usagef("--crypt-offset %d: %d bytes in the clear, past the header and payload (%d bytes): at most %d here", cryptOffset, packet.PSPHeaderLen+4*int(cryptOffset), hdr+len(payload), (hdr+len(payload)-packet.PSPHeaderLen)/4)
			}
			if err != nil {
				return usageError(err)
			}
			if pcapPath == "" {
				_, err = fmt.Fprintln(streams.Out, hex.EncodeToString(pkt))
				return err
			}
			return writePcap(pcapPath, pkt)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&saKey, "sa-key", "", "the SA key: 32 hex digits (PSP v0) or 64 (v1), or @FILE")
	fl.StringVar(&spiText, "spi", "", "the SPI as 8 hex digits, e.g. 80001234")
	fl.StringVar(&ivText, "iv", "", "the IV (the SA's packet counter, from 1)")
	fl.StringVar(&vcText, "vc", "", "the VC: I,J,K (server's enclave, peer's enclave, server id; any value, 0 too)")
	fl.BoolVar(&noVC, "no-vc", false, "no VC (V bit clear), as PSP senders without one send")
	fl.StringVar(&mode, "mode", "tunnel", "tunnel (the payload is an IP packet) or transport (a transport's header and data)")
	fl.Uint8Var(&cryptOffset, "crypt-offset", 2, "4-octet units after the PSP header left in the clear (0-63; default 2, the VC exactly, or 0 with --no-vc)")
	fl.StringVar(&versionText, "psp-version", "1", "0 (AES-128-GCM) or 1 (AES-256-GCM)")
	fl.StringVar(&nextText, "next-header", "4", "the payload's protocol: 4 (IPv4) or 41 (IPv6) in tunnel mode; 6 (TCP), 17 (UDP), ... in transport mode")
	fl.StringVar(&pcapPath, "pcap", "", "write a one-packet pcap to this new file instead of printing hex")
	return cmd
}

// writePcap writes one packet to a new pcap file; an existing file is never
// overwritten.
func writePcap(path string, pkt []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return failed(fmt.Errorf("--pcap: %w (an existing file is never overwritten)", err))
	}
	w, err := pcapfile.NewWriter(f, pcapfile.Options{})
	if err == nil {
		err = w.WritePacket(pkt, time.Now())
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return failed(fmt.Errorf("--pcap: %w", err))
	}
	return nil
}

func newPacketOpenCmd(streams IO) *cobra.Command {
	var saKey, serverKey, serverKey1, pairKey, orgKey, genText, pcapPath string
	cmd := &cobra.Command{
		Use:   "open (--sa-key K | --server-key K [--server-key-1 K] | --pair-key K | --org-key K --generation G) (PACKET_HEX | --pcap FILE)",
		Short: "Authenticate and decrypt a PSP packet, deriving its key from the SPI (and the VC)",
		Long: `Open a PSP packet (the bytes after the UDP header, in hex) and print its
payload in hex: in tunnel mode (next header 4 or 41: Enclave's packets) the
inner IP packet, in transport mode (any other next header) the transport's
header and data. Any PSP sender's packets open: versions 0 and 1, any crypt
offset (the clear bytes past the header are part of the payload), with or
without a VC. Give the SA key itself, or a key above it. A server key is
PSP's master key: the SA key derives from it and the SPI alone; give PSP's
two master keys as --server-key (MK0) and --server-key-1 (MK1), and the
SPI's top bit chooses, as PSP does. A pair key or the org key (with its
generation) derives through the packet's VC, which must be in the clear.
With --pcap FILE, open every packet of a capture (pcap or pcapng, Ethernet,
raw IP or Linux cooked; UDP to port 1000) and print one line per packet:
its payload in hex, or "error: ..." for one that did not open (a frame the
capture cut short is said so: capture with -s 0). A capture taken on a
host that sends with UDP segmentation offload (as enclave agents do) may hold
one large datagram per run of packets instead of the packets: capture on a
router, or where the device cuts runs (ip link set DEV gso_max_segs 1).

Exit status: 0 all opened; 1 authentication failed (wrong key, wrong
generation, tampering); 2 a malformed packet or bad usage.`,
		Example: `  enclave packet open --org-key 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f --generation 1 \
      0402020780001234000000000000000100030007000001027e3d8bedcd5dae07920af0743aa7fdf44207563f23cbc95a76fdc540bee02324eb8c74a06665075d08f5338c`,
		RunE: func(cmd *cobra.Command, args []string) error {
			fl := cmd.Flags()
			var given []string
			for _, name := range []string{"sa-key", "server-key", "pair-key", "org-key"} {
				if fl.Changed(name) {
					given = append(given, "--"+name)
				}
			}
			if fl.Changed("server-key-1") && !fl.Changed("server-key") {
				return usagef("--server-key-1 (PSP's MK1) goes with --server-key (MK0)")
			}
			if len(given) != 1 {
				return usagef("give exactly one of --sa-key, --server-key, --pair-key, --org-key (got %d%s)", len(given), strings.TrimRight(": "+strings.Join(given, " "), ": "))
			}
			if given[0] == "--org-key" && !fl.Changed("generation") {
				return usagef("--org-key needs --generation")
			}
			if given[0] == "--sa-key" && fl.Changed("generation") {
				return usagef("--generation does not apply to --sa-key")
			}
			if fl.Changed("server-key-1") && given[0] != "--server-key" {
				return usagef("--server-key-1 (PSP's MK1) goes with --server-key (MK0)")
			}
			var o opener
			var err error
			switch given[0] {
			case "--sa-key":
				o.saKey, err = readHexFlag("--sa-key", saKey, 16, 32)
			case "--server-key":
				o.root, err = readKeyFlag("--server-key", serverKey)
				o.level = keys.LevelServer
				if err == nil && fl.Changed("server-key-1") {
					o.root1, err = readKeyFlag("--server-key-1", serverKey1)
					o.hasRoot1 = true
				}
			case "--pair-key":
				o.root, err = readKeyFlag("--pair-key", pairKey)
				o.level = keys.LevelPair
			case "--org-key":
				o.root, err = readKeyFlag("--org-key", orgKey)
				o.level = keys.LevelOrg
			}
			if err != nil {
				return usageError(err)
			}
			defer o.zero()
			if fl.Changed("generation") {
				if o.gen, err = keys.ParseGeneration(genText); err != nil {
					return usagef("--generation: %w", err)
				}
				o.hasGen = true
			}
			if pcapPath != "" {
				if len(args) != 0 {
					return usagef("give PACKET_HEX or --pcap, not both")
				}
				return openPcap(streams, &o, pcapPath)
			}
			if len(args) != 1 {
				return usagef("give exactly one PACKET_HEX argument, got %d", len(args))
			}
			pkt, err := hex.DecodeString(strings.TrimSpace(args[0]))
			if err != nil {
				return usagef("PACKET_HEX is not hex: %v", err)
			}
			inner, err := o.open(pkt)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(streams.Out, hex.EncodeToString(inner))
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&saKey, "sa-key", "", "the SA key itself (hex or @FILE)")
	fl.StringVar(&serverKey, "server-key", "", "a server key SK, PSP's master key (hex or @FILE); with --server-key-1, MK0")
	fl.StringVar(&serverKey1, "server-key-1", "", "PSP's MK1, for SPIs whose top bit is 1 (with --server-key as MK0)")
	fl.StringVar(&pairKey, "pair-key", "", "an enclave-pair key EK (hex or @FILE)")
	fl.StringVar(&orgKey, "org-key", "", "the org key (hex or @FILE); needs --generation")
	fl.StringVar(&genText, "generation", "", "the generation of the key given")
	fl.StringVar(&pcapPath, "pcap", "", "open every packet of this pcap or pcapng file")
	return cmd
}

// opener opens packets for the CLI from whichever key the user gave.
type opener struct {
	saKey  []byte
	root   keys.Key
	level  keys.Level
	gen    keys.Generation
	hasGen bool
	// root1 is PSP's MK1 (--server-key-1): with it, root is MK0 and the
	// SPI's top bit chooses between them.
	root1    keys.Key
	hasRoot1 bool
}

func (o *opener) zero() {
	clear(o.saKey)
	o.root.Zero()
	o.root1.Zero()
}

// open returns the inner packet, or an error marked usage (malformed, exit
// 2) or failed (authentication, exit 1).
func (o *opener) open(pkt []byte) (inner []byte, err error) {
	var p packet.Parsed
	if err := packet.ParsePSP(&p, pkt); err != nil {
		return nil, usagef("malformed packet: %w", err)
	}
	if o.hasGen && p.SPI.Parity() != o.gen.Parity() {
		return nil, failed(fmt.Errorf("authentication failed: the packet's SPI %s is for an %s generation, not generation %d", p.SPI, parityName(p.SPI.Parity()), o.gen))
	}
	if o.saKey != nil {
		if len(o.saKey) != p.Version.KeySize() {
			return nil, failed(fmt.Errorf("authentication failed: the packet is PSP version %d (a %d-byte key) but --sa-key has %d bytes", p.Version, p.Version.KeySize(), len(o.saKey)))
		}
		g, err := packet.NewAEAD(p.Version, o.saKey)
		if err != nil {
			return nil, usageError(err)
		}
		defer g.Reset()
		return authFailed(packet.Open(nil, &p, g))
	}
	if o.level == keys.LevelServer {
		// PSP's own derivation: the SA key from the master key (the
		// server key; MK0 or MK1 by the SPI's top bit) and the SPI. It
		// needs no VC, so it opens any PSP sender's packets.
		mk := &o.root
		if o.hasRoot1 && p.SPI.Parity() == 1 {
			mk = &o.root1
		}
		defer func() {
			if !o.hasRoot1 && p.SPI.Parity() == 1 && errors.Is(err, errAuthFailed) {
				err = failed(fmt.Errorf("%w (the SPI %s has its top bit set: a PSP sender used its MK1 there; give it as --server-key-1, and MK0 as --server-key)", errAuthFailed, p.SPI))
			}
		}()
		ck, err := keys.SAKeyFromServer(mk, p.SPI, p.Version)
		if err != nil {
			return nil, usageError(err)
		}
		g, err := packet.NewAEAD(p.Version, ck.Bytes())
		ck.Zero()
		if err != nil {
			return nil, usageError(err)
		}
		defer g.Reset()
		return authFailed(packet.Open(nil, &p, g))
	}
	// A key above the server level: derive from the packet's own VC and
	// SPI, so the packet must carry the VC in the clear.
	if err := packet.Parse(&p, pkt); err != nil {
		if errors.Is(err, packet.ErrNoVC) || errors.Is(err, packet.ErrNextHeader) || errors.Is(err, packet.ErrEnclaveZero) {
			return nil, usagef("%w: a pair or org key derives the SA key from the VC; give --server-key (PSP's master key) or --sa-key", err)
		}
		return nil, usagef("malformed packet: %w", err)
	}
	// Without --generation, the SPI's parity stands in for it (the
	// generation itself is an input only at the org level).
	e := sa.Entry{Level: o.level, Enclave: p.VC.Enclave, Peer: p.VC.Peer, Server: p.VC.Server, Generation: keys.Generation(p.SPI.Parity())}
	if o.hasGen {
		e.Generation = o.gen
	}
	table := sa.NewKeyTable(1)
	if err := table.Add(e, o.root[:]); err != nil {
		return nil, usageError(err)
	}
	var q packet.Parsed
	return authFailed(sa.NewOpener(table, 0).OpenInto(nil, &q, pkt))
}

// errAuthFailed is the failure of a packet that does not authenticate.
var errAuthFailed = errors.New("authentication failed: wrong key or generation, or the packet was changed")

func authFailed(inner []byte, err error) ([]byte, error) {
	switch {
	case err == nil:
		return inner, nil
	case errors.Is(err, packet.ErrAuth):
		return nil, failed(errAuthFailed)
	case errors.Is(err, packet.ErrKeyLength), errors.Is(err, sa.ErrNoKey), errors.Is(err, sa.ErrGeneration), errors.Is(err, keys.ErrScope):
		return nil, failed(fmt.Errorf("authentication failed: %w", err))
	}
	return nil, usageError(err)
}

func parityName(p uint32) string {
	if p == 1 {
		return "odd"
	}
	return "even"
}

// openPcap opens every PSP packet of a capture, one output line each. The
// exit status is the worst outcome: 2 for a malformed packet, else 1 for a
// failed one.
func openPcap(streams IO, o *opener, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return usageError(fmt.Errorf("--pcap: %w", err))
	}
	defer f.Close()
	rd, err := pcapfile.NewReader(f, packet.DefaultPort)
	if err != nil {
		return usagef("--pcap %s: %w", path, err)
	}
	worst, bad, seen, frames := ExitOK, 0, 0, 0
	for {
		fr, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return usagef("--pcap %s: %w", path, err)
		}
		frames++
		if fr.Payload == nil {
			continue // not PSP traffic
		}
		seen++
		if fr.Truncated != "" {
			bad++
			fmt.Fprintf(streams.Out, "error: frame %d: %s\n", fr.Index, fr.Truncated)
			worst = max(worst, ExitUsage)
			continue
		}
		inner, err := o.open(fr.Payload)
		if err == nil {
			fmt.Fprintln(streams.Out, hex.EncodeToString(inner))
			continue
		}
		bad++
		fmt.Fprintf(streams.Out, "error: frame %d: %v\n", fr.Index, err)
		var ee *exitError
		if errors.As(err, &ee) && ee.code > worst {
			worst = ee.code
		}
	}
	if seen == 0 {
		return failed(fmt.Errorf("--pcap %s: no UDP packets to port %d in %d frames", path, packet.DefaultPort, frames))
	}
	if bad > 0 {
		return &exitError{worst, fmt.Errorf("%d of %d packets did not open", bad, seen)}
	}
	return nil
}

// parseAnyVC parses "I,J,K" with any values (0 too): what a PSP sender
// may put in a VC.
func parseAnyVC(text string) (keys.VC, error) {
	parts := strings.Split(text, ",")
	if len(parts) != 3 {
		return keys.VC{}, fmt.Errorf("--vc %q: want I,J,K (server's enclave, peer's enclave, server id)", echo.Cut(text))
	}
	i, err1 := strconv.ParseUint(parts[0], 10, 16)
	j, err2 := strconv.ParseUint(parts[1], 10, 16)
	k, err3 := strconv.ParseUint(parts[2], 10, 32)
	if err := errors.Join(err1, err2, err3); err != nil {
		return keys.VC{}, fmt.Errorf("--vc %q: want I,J,K: two 16-bit enclave ids and a 32-bit server id", echo.Cut(text))
	}
	return keys.VC{Enclave: keys.EnclaveID(i), Peer: keys.EnclaveID(j), Server: keys.ServerID(k)}, nil
}
