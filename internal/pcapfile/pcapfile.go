// Package pcapfile writes Enclave data packets as pcap files (Ethernet,
// IPv4, UDP to the PSP port) that Wireshark and PSP tools read, and reads
// the PSP payloads back out of pcap or pcapng files.
package pcapfile

import (
	"bufio"
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
	// Truncated says the capture cut the frame short (its snap length):
	// a frame to the port then has an empty Payload and this reason.
	Truncated string
}

// ErrFormat: the input is neither a pcap nor a pcapng file, or its
// framing is inconsistent.
var ErrFormat = errors.New("pcapfile: not a well-formed pcap or pcapng file")

// MaxFrame bounds a frame's captured length (Wireshark's own limit), and
// maxBlock a pcapng block (a frame and its options), so that a hostile file
// cannot make the reader allocate without bound. A capture is read as a
// stream: memory does not grow with its size.
const (
	MaxFrame = 262144
	maxBlock = MaxFrame + 64<<10
)

// linkTypeLinuxSLL2 is Linux cooked capture v2 (tcpdump -i any), link
// type 276 as gopacket's 8-bit LinkType holds it (276 mod 256: no link
// type of its own is 20).
const linkTypeLinuxSLL2 = layers.LinkType(276 & 0xff)

// Reader reads the frames of a pcap or pcapng capture one at a time.
type Reader struct {
	src interface {
		ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
		LinkType() layers.LinkType
	}
	port  uint16
	index int
}

// NewReader starts reading a pcap or pcapng capture from r; Next yields
// the UDP payload of frames sent to port (0: any UDP port).
func NewReader(r io.Reader, port uint16) (*Reader, error) {
	br := bufio.NewReader(r)
	magic, err := br.Peek(4)
	if err != nil {
		return nil, fmt.Errorf("%w: %d bytes", ErrFormat, len(magic))
	}
	rd := &Reader{port: port}
	if bytes.Equal(magic, []byte{0x0a, 0x0d, 0x0d, 0x0a}) {
		ng, err := pcapgo.NewNgReader(&ngBlocks{r: br}, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrFormat, err)
		}
		rd.src = ng
		return rd, nil
	}
	pr, err := pcapgo.NewReader(br)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	if pr.Snaplen() > MaxFrame {
		pr.SetSnaplen(MaxFrame) // the reader refuses frames longer than this
	}
	rd.src = pr
	return rd, nil
}

// Next returns the next frame, or io.EOF after the last.
func (rd *Reader) Next() (Packet, error) {
	data, ci, err := rd.src.ReadPacketData()
	if err == io.EOF {
		return Packet{}, io.EOF
	}
	rd.index++
	if err != nil {
		return Packet{}, fmt.Errorf("%w: frame %d: %v", ErrFormat, rd.index, err)
	}
	p := Packet{Index: rd.index, Timestamp: ci.Timestamp}
	var pkt gopacket.Packet
	if lt := rd.src.LinkType(); lt == linkTypeLinuxSLL2 {
		// Linux cooked capture v2 (tcpdump -i any): a 20-byte header
		// whose first two bytes are the protocol, then the IP packet.
		if len(data) < 20 {
			p.Skip = "a cooked (SLL2) frame too short for its header"
			return p, nil
		}
		first := layers.LayerTypeIPv4
		if binary.BigEndian.Uint16(data) == uint16(layers.EthernetTypeIPv6) {
			first = layers.LayerTypeIPv6
		}
		pkt = gopacket.NewPacket(data[20:], first, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
	} else {
		pkt = gopacket.NewPacket(data, lt, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
	}
	udp, _ := pkt.Layer(layers.LayerTypeUDP).(*layers.UDP)
	switch {
	case ci.CaptureLength < ci.Length:
		// Cut by the capture's snap length: its tag is gone, and it would
		// only fail authentication.
		p.Truncated = fmt.Sprintf("frame cut at capture: %d of %d bytes (capture with -s 0)", ci.CaptureLength, ci.Length)
		if udp != nil && (rd.port == 0 || uint16(udp.DstPort) == rd.port) {
			p.Payload = []byte{}
		} else {
			p.Skip = p.Truncated
		}
	case udp == nil:
		p.Skip = "not UDP"
	case rd.port != 0 && uint16(udp.DstPort) != rd.port:
		p.Skip = fmt.Sprintf("UDP to port %d", udp.DstPort)
	default:
		p.Payload = append([]byte{}, udp.Payload...) // never nil, even when empty
	}
	return p, nil
}

// ngBlocks passes a pcapng stream through one whole block at a time,
// refusing a block whose lengths do not fit before the pcapng reader sees
// it: that reader trusts them when it allocates.
type ngBlocks struct {
	r     io.Reader
	order binary.ByteOrder
	off   int64  // offset of the next block
	buf   []byte // the current block, still to be handed out
}

func (b *ngBlocks) Read(p []byte) (int, error) {
	if len(b.buf) == 0 {
		if err := b.next(); err != nil {
			return 0, err
		}
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

// next reads and checks one block.
func (b *ngBlocks) next() error {
	var hdr [12]byte
	if _, err := io.ReadFull(b.r, hdr[:8]); err != nil {
		if err == io.EOF {
			return io.EOF
		}
		return fmt.Errorf("%w: truncated pcapng block at %d", ErrFormat, b.off)
	}
	typ := binary.LittleEndian.Uint32(hdr[:4]) // the SHB's type reads the same either way
	if typ == 0x0a0d0d0a {                     // a section header fixes the byte order
		if _, err := io.ReadFull(b.r, hdr[8:12]); err != nil {
			return fmt.Errorf("%w: truncated pcapng section header at %d", ErrFormat, b.off)
		}
		switch binary.LittleEndian.Uint32(hdr[8:]) {
		case 0x1a2b3c4d:
			b.order = binary.LittleEndian
		case 0x4d3c2b1a:
			b.order = binary.BigEndian
		default:
			return fmt.Errorf("%w: bad pcapng byte-order magic", ErrFormat)
		}
	} else if b.order == nil {
		return fmt.Errorf("%w: pcapng data before a section header", ErrFormat)
	} else {
		typ = b.order.Uint32(hdr[:4])
	}
	n := int(b.order.Uint32(hdr[4:8]))
	if n < 12 || n%4 != 0 || n > maxBlock {
		return fmt.Errorf("%w: pcapng block at %d has length %d", ErrFormat, b.off, n)
	}
	block := make([]byte, n)
	have := 8
	if typ == 0x0a0d0d0a {
		have = 12
	}
	copy(block, hdr[:have])
	if _, err := io.ReadFull(b.r, block[have:]); err != nil {
		return fmt.Errorf("%w: truncated pcapng block at %d", ErrFormat, b.off)
	}
	var capLen, room int
	switch typ {
	case 6, 2: // enhanced packet, obsolete packet
		if n < 32 {
			return fmt.Errorf("%w: short packet block at %d", ErrFormat, b.off)
		}
		capLen, room = int(b.order.Uint32(block[20:])), n-32
	case 3: // simple packet: the reader allocates its original length
		if n < 16 {
			return fmt.Errorf("%w: short packet block at %d", ErrFormat, b.off)
		}
		capLen, room = int(b.order.Uint32(block[8:])), MaxFrame
	}
	if capLen > room || capLen > MaxFrame {
		return fmt.Errorf("%w: packet block at %d claims %d captured bytes", ErrFormat, b.off, capLen)
	}
	b.off += int64(n)
	b.buf = block
	return nil
}
