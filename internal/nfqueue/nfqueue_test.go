package nfqueue

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// packetMessage builds a queued-packet message as the kernel sends one.
func packetMessage(id uint32, payload []byte, extra ...[]byte) []byte {
	hdr := binary.BigEndian.AppendUint32(nil, id)
	hdr = append(binary.BigEndian.AppendUint16(hdr, 0x0800), 2)
	body := configMessage(3, attr(attrPacketHdr, hdr), attr(attrInDev, be32(4)), attr(attrPayload, payload))
	for _, e := range extra {
		body = append(body, e...)
	}
	m := binary.NativeEndian.AppendUint32(nil, uint32(nlmsgHdrLen+len(body)))
	m = binary.NativeEndian.AppendUint16(m, msgPacket)
	m = append(m, make([]byte, 10)...)
	return append(m, body...)
}

func TestParsePacket(t *testing.T) {
	payload := []byte("an IP packet, 29 bytes long..")
	var p Packet
	if err := parsePacket(&p, packetMessage(77, payload)); err != nil {
		t.Fatal(err)
	}
	if p.ID != 77 || p.Protocol != 0x0800 || p.Hook != 2 || p.InDev != 4 || !bytes.Equal(p.Payload, payload) || p.Length != len(payload) {
		t.Fatalf("%+v", p)
	}
	for _, c := range []struct {
		info          uint32
		gso, notReady bool
	}{{0, false, false}, {skbGSO, true, false}, {skbCsumNotReady, false, true}, {skbGSO | skbCsumNotReady | 1<<2, true, true}} {
		if err := parsePacket(&p, packetMessage(5, payload, attr(attrSkbInfo, be32(c.info)))); err != nil || p.GSO != c.gso || p.ChecksumNotReady != c.notReady {
			t.Errorf("skb info %#x: %+v, %v", c.info, p, err)
		}
	}
	good := packetMessage(1, payload)
	for name, msg := range map[string][]byte{
		"empty":        nil,
		"short header": good[:10],
		"length past":  append(binary.NativeEndian.AppendUint32(nil, 9999), good[4:]...),
		"no nfgenmsg":  packetMessage(1, nil)[:nlmsgHdrLen],
		"bad attr":     append(bytes.Clone(good), 0xff, 0xff, 0, 0),
		"verdict type": append(bytes.Clone(good[:4]), append([]byte{msgVerdict & 0xff, msgVerdict >> 8}, good[6:]...)...),
	} {
		if name == "bad attr" {
			binary.NativeEndian.PutUint32(msg, uint32(len(msg)))
		}
		if err := parsePacket(&p, msg); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// No packet header: no id, no verdict possible.
	body := configMessage(3, attr(attrPayload, payload))
	m := binary.NativeEndian.AppendUint32(nil, uint32(nlmsgHdrLen+len(body)))
	m = binary.NativeEndian.AppendUint16(m, msgPacket)
	m = append(append(m, make([]byte, 10)...), body...)
	if err := parsePacket(&p, m); !errors.Is(err, ErrMalformed) {
		t.Errorf("no header: %v", err)
	}
}

// TestVerdictMessages: the framing of verdicts, single and batched, with
// and without a payload, parses back as netlink messages of the right
// lengths and alignment.
func TestVerdictMessages(t *testing.T) {
	var b []byte
	var err error
	b, _ = appendVerdict(b, 5, Accept, 10, true, nil, noMark)
	b, _ = appendVerdict(b, 5, Drop, 11, false, nil, noMark)
	b, _ = appendVerdict(b, 5, Accept, 12, false, []byte("abcde"), noMark)
	b, _ = appendVerdict(b, 5, Accept, 14, false, nil, 0xE5C000E6)
	if _, err = appendVerdict(b, 5, Accept, 13, false, make([]byte, maxPayload+1), noMark); !errors.Is(err, ErrPayload) {
		t.Fatalf("oversize payload: %v", err)
	}
	type want struct {
		typ     uint16
		verdict uint32
		id      uint32
		n       int
	}
	for i, w := range []want{{msgBatch, 1, 10, 32}, {msgVerdict, 0, 11, 32}, {msgVerdict, 1, 12, 32 + 12}, {msgVerdict, 1, 14, 40}} {
		n := int(binary.NativeEndian.Uint32(b))
		if n != w.n || n%4 != 0 || binary.NativeEndian.Uint16(b[4:]) != w.typ || binary.BigEndian.Uint16(b[18:]) != 5 {
			t.Fatalf("message %d: % x", i, b[:n])
		}
		if binary.BigEndian.Uint32(b[24:]) != w.verdict || binary.BigEndian.Uint32(b[28:]) != w.id {
			t.Fatalf("message %d verdict: % x", i, b[:n])
		}
		if w.id == 14 && (binary.NativeEndian.Uint16(b[32:]) != 8 || binary.NativeEndian.Uint16(b[34:]) != attrMark || binary.BigEndian.Uint32(b[36:]) != 0xE5C000E6) {
			t.Fatalf("message %d mark: % x", i, b[:n])
		}
		b = b[n:]
	}
	if len(b) != 0 {
		t.Fatalf("%d bytes left", len(b))
	}
}

// FuzzParsePacket: any message from the socket parses or is refused with
// ErrMalformed (or a kernel error), never a panic, and a parsed payload
// lies within the message.
func FuzzParsePacket(f *testing.F) {
	f.Add(packetMessage(1, []byte("payload")))
	f.Add(packetMessage(2, nil, attr(attrCapLen, be32(1500)), attr(attrMark, be32(7))))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, msg []byte) {
		var p Packet
		if err := parsePacket(&p, msg); err != nil {
			return
		}
		if len(p.Payload) > len(msg) || p.Length < len(p.Payload) {
			t.Fatalf("%+v from %d bytes", p, len(msg))
		}
	})
}
