// Package pcapfile writes Enclave data packets as pcap files (Ethernet,
// IPv4, UDP to the PSP port) that Wireshark and PSP tools read, and reads
// the PSP payloads back out of pcap or pcapng files.
package pcapfile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/enclavekeys/enclave/internal/packet"
)

// Options set the outer headers written around each payload. The zero
// value uses documentation addresses (RFC 5737, RFC 7042) and the PSP port.
type Options struct {
	SrcMAC, DstMAC   net.HardwareAddr
	SrcIP, DstIP     net.IP // IPv4
	SrcPort, DstPort uint16
}

func (o *Options) defaults() {
	if o.SrcMAC == nil {
		o.SrcMAC = net.HardwareAddr{0x02, 0, 0x5e, 0x10, 0, 1}
	}
	if o.DstMAC == nil {
		o.DstMAC = net.HardwareAddr{0x02, 0, 0x5e, 0x10, 0, 2}
	}
	if o.SrcIP == nil {
		o.SrcIP = net.IPv4(192, 0, 2, 1)
	}
	if o.DstIP == nil {
		o.DstIP = net.IPv4(192, 0, 2, 2)
	}
	if o.SrcPort == 0 {
		o.SrcPort = packet.DefaultPort
	}
	if o.DstPort == 0 {
		o.DstPort = packet.DefaultPort
	}
}

// Writer writes packets to a pcap file.
type Writer struct {
	opts Options
	w    *pcapgo.Writer
	buf  gopacket.SerializeBuffer
}

// NewWriter writes the pcap file header to w.
func NewWriter(w io.Writer, opts Options) (*Writer, error) {
	opts.defaults()
	if opts.SrcIP.To4() == nil || opts.DstIP.To4() == nil {
		return nil, errors.New("pcapfile: outer addresses must be IPv4")
	}
	pw := pcapgo.NewWriter(w)
	if err := pw.WriteFileHeader(65535, layers.LinkTypeEthernet); err != nil {
		return nil, fmt.Errorf("pcapfile: %w", err)
	}
	return &Writer{opts: opts, w: pw, buf: gopacket.NewSerializeBuffer()}, nil
}

// WritePacket writes payload (the bytes after the UDP header) as one frame
// with correct IPv4 and UDP checksums.
func (w *Writer) WritePacket(payload []byte, ts time.Time) error {
	eth := &layers.Ethernet{SrcMAC: w.opts.SrcMAC, DstMAC: w.opts.DstMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: w.opts.SrcIP.To4(), DstIP: w.opts.DstIP.To4()}
	udp := &layers.UDP{SrcPort: layers.UDPPort(w.opts.SrcPort), DstPort: layers.UDPPort(w.opts.DstPort)}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		return fmt.Errorf("pcapfile: %w", err)
	}
	if err := w.buf.Clear(); err != nil {
		return fmt.Errorf("pcapfile: %w", err)
	}
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(w.buf, opts, eth, ip, udp, gopacket.Payload(payload)); err != nil {
		return fmt.Errorf("pcapfile: %w", err)
	}
	frame := w.buf.Bytes()
	ci := gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(frame), Length: len(frame)}
	if err := w.w.WritePacket(ci, frame); err != nil {
		return fmt.Errorf("pcapfile: %w", err)
	}
	return nil
}

// Packet is one frame read from a capture.
type Packet struct {
	// Index counts frames from 1, as Wireshark numbers them.
	Index     int
	Timestamp time.Time
	// Payload is the UDP payload, when the frame is UDP to the port asked
	// for; else nil and Skip says why.
	Payload []byte
	Skip    string
}

// ErrFormat: the input is neither a pcap nor a pcapng file, or its
// framing is inconsistent.
var ErrFormat = errors.New("pcapfile: not a well-formed pcap or pcapng file")

// MaxFile bounds what Read takes in, and MaxFrame a frame's captured
// length (Wireshark's own limit), so that a hostile file cannot make it
// allocate without bound.
const (
	MaxFile  = 1 << 30
	MaxFrame = 262144
)

// Read returns every frame of a pcap or pcapng capture, with the UDP
// payload of those sent to port (0: any UDP port).
func Read(r io.Reader, port uint16) ([]Packet, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxFile+1))
	if err != nil {
		return nil, fmt.Errorf("pcapfile: %w", err)
	}
	if len(data) > MaxFile {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrFormat, MaxFile)
	}
	if len(data) < 4 {
		return nil, fmt.Errorf("%w: %d bytes", ErrFormat, len(data))
	}
	type source interface {
		ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
		LinkType() layers.LinkType
	}
	var src source
	if bytes.Equal(data[:4], []byte{0x0a, 0x0d, 0x0d, 0x0a}) {
		if err := checkNg(data); err != nil {
			return nil, err
		}
		ng, err := pcapgo.NewNgReader(bytes.NewReader(data), pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrFormat, err)
		}
		src = ng
	} else {
		pr, err := pcapgo.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrFormat, err)
		}
		if pr.Snaplen() > MaxFrame {
			pr.SetSnaplen(MaxFrame)
		}
		src = pr
	}
	var out []Packet
	for i := 1; ; i++ {
		data, ci, err := src.ReadPacketData()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, fmt.Errorf("pcapfile: frame %d: %w", i, err)
		}
		p := Packet{Index: i, Timestamp: ci.Timestamp}
		pkt := gopacket.NewPacket(data, src.LinkType(), gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
		switch {
		case udp == nil:
			p.Skip = "not UDP"
		case port != 0 && uint16(udp.DstPort) != port:
			p.Skip = fmt.Sprintf("UDP to port %d", udp.DstPort)
		default:
			p.Payload = append([]byte{}, udp.Payload...) // never nil, even when empty
		}
		out = append(out, p)
	}
}

// checkNg walks the blocks of a pcapng file and refuses one whose block or
// captured lengths do not fit: the pcapng reader below trusts them when it
// allocates.
func checkNg(data []byte) error {
	var order binary.ByteOrder = binary.LittleEndian
	for off := 0; off < len(data); {
		if len(data)-off < 12 {
			return fmt.Errorf("%w: truncated pcapng block at %d", ErrFormat, off)
		}
		typ := order.Uint32(data[off:])
		if typ == 0x0a0d0d0a { // a section header fixes the byte order
			switch binary.LittleEndian.Uint32(data[off+8:]) {
			case 0x1a2b3c4d:
				order = binary.LittleEndian
			case 0x4d3c2b1a:
				order = binary.BigEndian
			default:
				return fmt.Errorf("%w: bad pcapng byte-order magic", ErrFormat)
			}
		}
		n := int(order.Uint32(data[off+4:]))
		if n < 12 || n%4 != 0 || n > len(data)-off {
			return fmt.Errorf("%w: pcapng block at %d has length %d", ErrFormat, off, n)
		}
		var capLen, room int
		switch typ {
		case 6, 2: // enhanced packet, obsolete packet
			if n < 32 {
				return fmt.Errorf("%w: short packet block at %d", ErrFormat, off)
			}
			capLen, room = int(order.Uint32(data[off+20:])), n-32
		case 3: // simple packet: the reader allocates its original length
			if n < 16 {
				return fmt.Errorf("%w: short packet block at %d", ErrFormat, off)
			}
			capLen, room = int(order.Uint32(data[off+8:])), MaxFrame
		}
		if capLen > room || capLen > MaxFrame {
			return fmt.Errorf("%w: packet block at %d claims %d captured bytes", ErrFormat, off, capLen)
		}
		off += n
	}
	return nil
}
