// Package packet is the Enclave data packet (DESIGN §4): a PSP packet in
// tunnel mode whose header carries the VC, the key-derivation information.
//
//	outer IP | UDP | PSP header (16) | VC (8) | encrypted inner IP packet | ICV (16)
//
//	PSP header: byte 0      next header (4 = inner IPv4, 41 = inner IPv6)
//	            byte 1      hdr ext len = 2 (the VC is present)
//	            byte 2      R (2 bits) = 0 | crypt offset (6 bits) = 2
//	            byte 3      S | D | version (4 bits) | V = 1 | 1
//	            bytes 4-7   SPI, big-endian
//	            bytes 8-15  IV, big-endian
//	VC:         [i]16 server's enclave || [j]16 peer's enclave || [k]32 server id
//
// The nonce is SPI || IV; the additional data is everything before the crypt
// offset (header and VC), so the VC travels in the clear but authenticated.
// This package encodes and decodes that format without copying and seals
// and opens packets in place with a given AES-GCM key.
package packet

import (
	"encoding/binary"

	"github.com/enclavekeys/enclave/internal/keys"
)

// Sizes of the format.
const (
	// PSPHeaderLen is the fixed PSP header (through the IV).
	PSPHeaderLen = 16
	// VCLen is the VC, the header extension Enclave always carries.
	VCLen = 8
	// HeaderLen is everything before the encrypted inner packet.
	HeaderLen = PSPHeaderLen + VCLen
	// TagLen is the ICV (the AES-GCM tag).
	TagLen = 16
	// Overhead is what sealing adds to an inner packet.
	Overhead = HeaderLen + TagLen
	// DefaultPort is the UDP destination port of PSP.
	DefaultPort = 1000
)

// Next-header values of tunnel mode.
const (
	NextIPv4 = 4
	NextIPv6 = 41
)

const (
	hdrExtLenVC = 2 // 8-octet units beyond the first 8 bytes: IV + VC
	cryptOffVC  = 2 // 4-octet units after the PSP header: the VC stays clear
	vBit        = 0x02
	fixedBit    = 0x01
	sBit        = 0x80
	dBit        = 0x40
)

// Header is a decoded PSP header with its VC.
type Header struct {
	// NextHeader is the inner protocol: NextIPv4 or NextIPv6.
	NextHeader uint8
	// CryptOffset is in 4-octet units after the PSP header. Enclave sends 2
	// (the VC stays clear); a received packet may leave more in the clear.
	CryptOffset uint8
	// Sample and Drop are PSP's S and D flags; Enclave sends them clear and
	// does not act on them.
	Sample, Drop bool
	// Version is the PSP version: the cipher of the SA.
	Version keys.Version
	// SPI names the SA; bit 31 is the generation parity.
	SPI keys.SPI
	// IV is the SA's per-packet counter, starting at 1.
	IV uint64
	// VC is the derivation information (i, j, k).
	VC keys.VC
}

// Nonce is the AES-GCM nonce of the packet: SPI || IV.
func (h *Header) Nonce() [12]byte {
	var n [12]byte
	binary.BigEndian.PutUint32(n[0:], uint32(h.SPI))
	binary.BigEndian.PutUint64(n[4:], h.IV)
	return n
}

// Put writes the header and VC into b[:HeaderLen] as Enclave sends them
// (hdr ext len 2, crypt offset 2, V set). It validates first: the next
// header must be 4 or 41, the version 0 or 1, the SPI index non-zero.
func (h *Header) Put(b []byte) error {
	if len(b) < HeaderLen {
		return ErrShort
	}
	if h.NextHeader != NextIPv4 && h.NextHeader != NextIPv6 {
		return ErrNextHeader
	}
	if !h.Version.Valid() {
		return ErrVersion
	}
	if !h.SPI.Valid() {
		return ErrSPIIndexZero
	}
	if h.VC.Enclave == 0 || h.VC.Peer == 0 {
		return ErrEnclaveZero
	}
	h.put(b, true, cryptOffVC)
	return nil
}

// put writes the header into b (16 bytes, and 8 more for the VC when vc
// is set) with the crypt offset given, unchecked: Put and SealPSP check
// first.
func (h *Header) put(b []byte, vc bool, cryptOffset uint8) {
	b[0] = h.NextHeader
	b[1] = 1 // the IV's 8 octets beyond the first 8
	flags := byte(h.Version)<<2 | fixedBit
	if vc {
		b[1] = hdrExtLenVC
		flags |= vBit
		binary.BigEndian.PutUint16(b[16:], uint16(h.VC.Enclave))
		binary.BigEndian.PutUint16(b[18:], uint16(h.VC.Peer))
		binary.BigEndian.PutUint32(b[20:], uint32(h.VC.Server))
	}
	b[2] = cryptOffset
	if h.Sample {
		flags |= sBit
	}
	if h.Drop {
		flags |= dBit
	}
	b[3] = flags
	binary.BigEndian.PutUint32(b[4:], uint32(h.SPI))
	binary.BigEndian.PutUint64(b[8:], h.IV)
}

// Parsed is a decoded packet. Its slices alias the packet's bytes; nothing
// is copied.
type Parsed struct {
	Header
	// HasVC is PSP's V bit: a VC follows the IV.
	HasVC bool
	// VCClear says the VC lies wholly before the crypt offset, so that
	// Header.VC holds it (a packet may encrypt its VC: crypt offset 0 or
	// 1).
	VCClear bool
	// HdrLen is the PSP header with its extensions (8 octets a hdr ext
	// len unit beyond the first 8): where the payload starts.
	HdrLen int
	// AAD is the authenticated clear part: PSP header and every byte
	// before the crypt offset (16 + 4 x crypt offset bytes).
	AAD []byte
	// Sealed is the encrypted rest followed by the tag.
	Sealed []byte
}

// Tunnel reports whether the payload is an IP packet (next header 4 or
// 41: tunnel mode); else it is a transport's (transport mode: TCP, UDP,
// ...).
func (p *Parsed) Tunnel() bool { return p.NextHeader == NextIPv4 || p.NextHeader == NextIPv6 }

// ParsePSP decodes any valid PSP packet (pkt: the bytes after the UDP
// header) into p without copying: versions 0 and 1, tunnel and transport
// mode, any crypt offset, with or without a VC of any value. Each
// malformation has its own error; the tag is not checked here.
func ParsePSP(p *Parsed, pkt []byte) error {
	*p = Parsed{}
	if len(pkt) < PSPHeaderLen+TagLen {
		return ErrShort
	}
	flags := pkt[3]
	if flags&fixedBit == 0 {
		return ErrFixedBit
	}
	switch v := keys.Version(flags >> 2 & 0x0f); {
	case v.Valid():
	case v == 2 || v == 3:
		return ErrGMAC
	default:
		return ErrVersion
	}
	spi := keys.SPI(binary.BigEndian.Uint32(pkt[4:]))
	if !spi.Valid() {
		return ErrSPIIndexZero
	}
	ext := int(pkt[1])
	hasVC := flags&vBit != 0
	hdr := 8 * (1 + ext)
	if ext < 1 || (hasVC && ext < hdrExtLenVC) {
		return ErrHdrExtLen
	}
	if hdr > len(pkt)-TagLen {
		return ErrShort // too short for its own header and tag
	}
	off := pkt[2] & 0x3f
	clear := PSPHeaderLen + 4*int(off)
	if clear > len(pkt)-TagLen {
		return ErrCryptOffset
	}
	p.IV = binary.BigEndian.Uint64(pkt[8:])
	if p.IV == 0 {
		*p = Parsed{}
		return ErrIVZero
	}
	p.NextHeader = pkt[0]
	p.CryptOffset = off
	p.Sample = flags&sBit != 0
	p.Drop = flags&dBit != 0
	p.Version = keys.Version(flags >> 2 & 0x0f)
	p.SPI = spi
	p.HasVC = hasVC
	p.HdrLen = hdr
	if hasVC && clear >= HeaderLen {
		p.VCClear = true
		p.VC = keys.VC{
			Enclave: keys.EnclaveID(binary.BigEndian.Uint16(pkt[16:])),
			Peer:    keys.EnclaveID(binary.BigEndian.Uint16(pkt[18:])),
			Server:  keys.ServerID(binary.BigEndian.Uint32(pkt[20:])),
		}
	}
	p.AAD = pkt[:clear]
	p.Sealed = pkt[clear:]
	return nil
}

// Parse decodes an Enclave data packet: a PSP packet (ParsePSP) in tunnel
// mode whose VC is in the clear and names two enclaves, so that its key
// derives from it, with DESIGN §4's hdr ext len 2 and crypt offset 2 and
// nothing else (a wider clear part would let readers of different
// releases take different bytes as the inner packet). A PSP packet without one is ErrNoVC (counted no_vc,
// not malformed), one in transport mode ErrNextHeader.
func Parse(p *Parsed, pkt []byte) error {
	if err := ParsePSP(p, pkt); err != nil {
		return err
	}
	var err error
	switch {
	case !p.HasVC || !p.VCClear:
		err = ErrNoVC
	case p.HdrLen != HeaderLen:
		err = ErrHdrExtLen
	case p.CryptOffset != cryptOffVC:
		// DESIGN §4 fixes it: every reader (agent, gateway, NIC, any
		// release) takes the same bytes as the inner packet.
		err = ErrCryptOffset
	case !p.Tunnel():
		err = ErrNextHeader
	case p.VC.Enclave == 0 || p.VC.Peer == 0:
		err = ErrEnclaveZero
	}
	if err != nil {
		*p = Parsed{}
	}
	return err
}
