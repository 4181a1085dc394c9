package pcapfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// RawWriter writes IP packets (link type raw IP: each frame starts at the
// IP header) to a pcapng file, each with an optional comment, as the
// gateway's decrypted capture does: the inner packets, and in each
// comment the SA it came on. gopacket's pcapng writer has no per-packet
// comment, hence this one; the format is pcapng's (IETF draft
// "PCAP Next Generation Dump File Format"): a section header, one
// interface, enhanced packet blocks with microsecond timestamps.
type RawWriter struct {
	w   io.Writer
	buf []byte
}

const (
	blockSHB     = 0x0A0D0D0A
	blockIDB     = 0x00000001
	blockEPB     = 0x00000006
	linkRaw      = 101 // LINKTYPE_RAW
	optComment   = 1
	maxComment   = 1024
	byteOrderBOM = 0x1A2B3C4D
)

// ErrTooLarge: a packet or comment is larger than a capture takes.
var ErrTooLarge = errors.New("pcapfile: packet or comment too large")

// NewRawWriter writes the section header and the interface to w.
func NewRawWriter(w io.Writer) (*RawWriter, error) {
	rw := &RawWriter{w: w, buf: make([]byte, 0, MaxFrame+maxComment+64)}
	b := rw.buf[:0]
	b = le32(le32(b, blockSHB), 28)
	b = le32(b, byteOrderBOM)
	b = le16(le16(b, 1), 0)                   // version 1.0
	b = le32(le32(b, 0xffffffff), 0xffffffff) // section length unknown
	b = le32(b, 28)
	b = le32(le32(b, blockIDB), 20)
	b = le16(le16(b, linkRaw), 0)
	b = le32(b, MaxFrame)
	b = le32(b, 20)
	if _, err := w.Write(b); err != nil {
		return nil, fmt.Errorf("pcapfile: %w", err)
	}
	return rw, nil
}

// RawHeaderLen is the size of what NewRawWriter writes first.
const RawHeaderLen = 28 + 20

// RawPacketLen is the size WritePacket writes for a packet of pktLen bytes
// with a comment of commentLen (cut to 1024).
func RawPacketLen(pktLen, commentLen int) int {
	commentLen = min(commentLen, maxComment)
	pad := func(n int) int { return (n + 3) &^ 3 }
	n := 28 + pad(pktLen) + 4
	if commentLen > 0 {
		n += 4 + pad(commentLen) + 4 // the comment and the end of options
	}
	return n
}

// WritePacket writes one IP packet seen at ts, with comment (none if
// empty; cut to 1024 bytes).
func (rw *RawWriter) WritePacket(pkt []byte, ts time.Time, comment string) error {
	if len(pkt) > MaxFrame {
		return ErrTooLarge
	}
	if len(comment) > maxComment {
		comment = comment[:maxComment]
	}
	pad := func(n int) int { return (n + 3) &^ 3 }
	n := RawPacketLen(len(pkt), len(comment))
	us := uint64(ts.UnixMicro())
	b := rw.buf[:0]
	b = le32(le32(b, blockEPB), uint32(n))
	b = le32(b, 0) // interface 0
	b = le32(le32(b, uint32(us>>32)), uint32(us))
	b = le32(le32(b, uint32(len(pkt))), uint32(len(pkt)))
	b = append(b, pkt...)
	b = append(b, make([]byte, pad(len(pkt))-len(pkt))...)
	if comment != "" {
		b = le16(le16(b, optComment), uint16(len(comment)))
		b = append(b, comment...)
		b = append(b, make([]byte, pad(len(comment))-len(comment))...)
		b = le32(b, 0) // opt_endofopt
	}
	b = le32(b, uint32(n))
	rw.buf = b[:0]
	if _, err := rw.w.Write(b); err != nil {
		return fmt.Errorf("pcapfile: %w", err)
	}
	return nil
}

func le32(b []byte, v uint32) []byte { return binary.LittleEndian.AppendUint32(b, v) }
func le16(b []byte, v uint16) []byte { return binary.LittleEndian.AppendUint16(b, v) }
