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
		Short: "Seal and open Enclave data packets (PSP with a VC)",
	}
	cmd.AddCommand(newPacketSealCmd(streams), newPacketOpenCmd(streams))
	return cmd
}

func newPacketSealCmd(streams IO) *cobra.Command {
	var saKey, spiText, ivText, vcText, versionText, nextText, pcapPath string
	cmd := &cobra.Command{
		Use:   "seal --sa-key K --spi HEX --iv N --vc I,J,K [--pcap FILE] [flags] PAYLOAD_HEX",
		Short: "Encrypt an inner packet into a data packet",
		Long: `Seal PAYLOAD_HEX (the inner IP packet; "" for none) under an SA key and print
the data packet as it follows the UDP header, in lowercase hex: PSP header,
VC, encrypted inner packet, ICV. With --pcap FILE, write a one-packet pcap
(Ethernet/IPv4/UDP to port 1000) that Wireshark opens, instead.`,
		Example: `  enclave packet seal --sa-key 9bd253cc0a1a23bb1960342d4073736a70e5ac3eb0bb0ba7924bac4dea4c800e \
      --spi 80001234 --iv 1 --vc 3,7,258 4500001c000040004011b7c40a0300010a070002656e636c61766521`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("give exactly one PAYLOAD_HEX argument (\"\" for an empty payload), got %d", len(args))
			}
			for _, f := range []string{"sa-key", "spi", "iv", "vc"} {
				if !cmd.Flags().Changed(f) {
					return usagef("--%s is required", f)
				}
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
			if h.VC, err = parseVC(vcText); err != nil {
				return usageError(err)
			}
			switch nextText {
			case "4":
				h.NextHeader = packet.NextIPv4
			case "41":
				h.NextHeader = packet.NextIPv6
			default:
				return usagef("--next-header %q: want 4 (IPv4) or 41 (IPv6)", echo.Cut(nextText))
			}
			inner, err := hex.DecodeString(args[0])
			if err != nil {
				return usagef("PAYLOAD_HEX is not hex: %v", err)
			}
			if len(inner) > packet.MaxInner {
				return usagef("PAYLOAD_HEX: %d bytes, at most %d", len(inner), packet.MaxInner)
			}
			g, err := packet.NewAEAD(h.Version, key)
			if err != nil {
				return usageError(err)
			}
			defer g.Reset()
			pkt, err := packet.Seal(make([]byte, packet.Overhead+len(inner)), &h, g, inner)
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
	fl.StringVar(&vcText, "vc", "", "the VC: I,J,K (server's enclave, peer's enclave, server id)")
	fl.StringVar(&versionText, "psp-version", "1", "0 (AES-128-GCM) or 1 (AES-256-GCM)")
	fl.StringVar(&nextText, "next-header", "4", "the inner protocol: 4 (IPv4) or 41 (IPv6)")
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
	var saKey, serverKey, pairKey, orgKey, genText, pcapPath string
	cmd := &cobra.Command{
		Use:   "open (--sa-key K | --server-key K | --pair-key K | --org-key K --generation G) (PACKET_HEX | --pcap FILE)",
		Short: "Authenticate and decrypt a data packet, deriving its key from the VC and SPI",
		Long: `Open a data packet (the bytes after the UDP header, in hex) and print its inner
packet in hex. Give the SA key itself, or any key above it: the packet's VC
and SPI say how to derive the SA key from a server key, a pair key, or the org
key with its generation. With --pcap FILE, open every packet of a pcap or
pcapng file (UDP to port 1000) and print one line per packet: the inner packet
in hex, or "error: ..." for a packet that did not open. A capture taken on a
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
			if len(given) != 1 {
				return usagef("give exactly one of --sa-key, --server-key, --pair-key, --org-key (got %d: %s)", len(given), strings.Join(given, " "))
			}
			if given[0] == "--org-key" && !fl.Changed("generation") {
				return usagef("--org-key needs --generation")
			}
			if given[0] == "--sa-key" && fl.Changed("generation") {
				return usagef("--generation does not apply to --sa-key")
			}
			var o opener
			var err error
			switch given[0] {
			case "--sa-key":
				o.saKey, err = readHexFlag("--sa-key", saKey, 16, 32)
			case "--server-key":
				o.root, err = readKeyFlag("--server-key", serverKey)
				o.level = keys.LevelServer
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
	fl.StringVar(&serverKey, "server-key", "", "a server key SK (hex or @FILE)")
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
}

func (o *opener) zero() {
	clear(o.saKey)
	o.root.Zero()
}

// open returns the inner packet, or an error marked usage (malformed, exit
// 2) or failed (authentication, exit 1).
func (o *opener) open(pkt []byte) ([]byte, error) {
	var p packet.Parsed
	if err := packet.Parse(&p, pkt); err != nil {
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
	// A key above the SA level: derive from the packet's own VC and SPI.
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

func authFailed(inner []byte, err error) ([]byte, error) {
	switch {
	case err == nil:
		return inner, nil
	case errors.Is(err, packet.ErrAuth):
		return nil, failed(errors.New("authentication failed: wrong key or generation, or the packet was changed"))
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

// parseVC parses "I,J,K".
func parseVC(text string) (keys.VC, error) {
	parts := strings.Split(text, ",")
	if len(parts) != 3 {
		return keys.VC{}, fmt.Errorf("--vc %q: want I,J,K (server's enclave, peer's enclave, server id)", echo.Cut(text))
	}
	i, err := keys.ParseEnclaveID(parts[0])
	if err != nil {
		return keys.VC{}, fmt.Errorf("--vc %q: %w", echo.Cut(text), err)
	}
	j, err := keys.ParseEnclaveID(parts[1])
	if err != nil {
		return keys.VC{}, fmt.Errorf("--vc %q: %w", echo.Cut(text), err)
	}
	k, err := keys.ParseServerID(parts[2])
	if err != nil {
		return keys.VC{}, fmt.Errorf("--vc %q: %w", echo.Cut(text), err)
	}
	return keys.VC{Enclave: i, Peer: j, Server: k}, nil
}
