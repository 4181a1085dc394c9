package lab

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/enclavekeys/enclave/internal/checksum"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
)

// LostPing is one of the sample's pings that got no reply: which SA, when
// it was sent (ms from the rotation; negative before it), on which SA's
// SPI, and whether the generator held the re-established SA by then.
type LostPing struct {
	SA      int    `json:"sa"`
	Seq     uint16 `json:"seq"`
	SentMs  int64  `json:"sent_ms"`
	SPI     string `json:"spi"`
	Rekeyed bool   `json:"rekeyed"`
}

// pingStats is what the sample's pinger saw.
type pingStats struct {
	sent, lost int64
	lostBefore int64 // of lost, sent before the rotation
	// Replies that could not be counted: no sample SA has their SPI, or
	// they did not open under it.
	unknownSPI, unopened int64
	sendErrors           int64
	lostDetail           []LostPing // the first maxLostDetail
}

// maxLostDetail bounds the lost pings listed in the report.
const maxLostDetail = 20

// pingRecord is one ping as sent.
type pingRecord struct {
	at      time.Time
	spi     keys.SPI
	rekeyed bool
	failed  bool // not sent (a local error): not counted
}

// startPings sends an ICMP echo on each sample SA every 20 ms to the
// server's stack and counts the replies; the returned function stops and
// reports what it saw, times relative to the rotation's start (rotated
// is set when it starts).
func (b *bench) startPings(rotated *atomic.Pointer[time.Time]) func() pingStats {
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return func() pingStats { return pingStats{} }
	}
	conn.SetReadBuffer(8 << 20)
	var st pingStats
	var unknown, unopened atomic.Int64
	sample := b.sas[:b.cfg.Sample]
	// sent[i] lists SA i's pings in order (seq 1, 2, ...); got[i] marks
	// the sequence numbers answered.
	sent := make([][]pingRecord, len(sample))
	got := make([][]atomic.Bool, len(sample))
	for i := range got {
		got[i] = make([]atomic.Bool, 1<<16)
	}
	// bySPI finds a sample SA by the SPI of a reply: the receive SPI of
	// each SA a ping was sent on is stored before the ping goes, so that
	// a reply never comes before its SPI is known.
	var bySPI sync.Map
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // replies
		defer wg.Done()
		buf := make([]byte, 2048)
		var p packet.Parsed
		for {
			conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				select {
				case <-stop:
					return
				default:
					continue
				}
			}
			if n < packet.HeaderLen {
				continue
			}
			spi := keys.SPI(binary.BigEndian.Uint32(buf[4:8]))
			v, ok := bySPI.Load(spi)
			if !ok {
				unknown.Add(1)
				continue
			}
			s := v.(*benchSA)
			s.mu.Lock()
			in, prev := s.in, s.prev
			s.mu.Unlock()
			var inner []byte
			switch {
			case in != nil && spi == in.SPI():
				inner, err = in.Open(&p, buf[:n])
			case prev != nil && spi == prev.SPI():
				inner, err = prev.Open(&p, buf[:n])
			default:
				unknown.Add(1)
				continue
			}
			if err != nil {
				unopened.Add(1)
				continue
			}
			if len(inner) >= 28 && inner[20] == 0 && s.n < len(got) { // ICMP echo reply
				got[s.n][binary.BigEndian.Uint16(inner[26:])].Store(true)
			}
		}
	}()
	go func() { // requests
		defer wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for seq := uint16(1); seq != 0; seq++ {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			for i, s := range sample {
				s.mu.Lock()
				out, in := s.out, s.in
				s.mu.Unlock()
				bySPI.Store(in.SPI(), s)
				inner := icmpEcho(overlayOf(s.n), seq)
				pkt, err := out.Seal(make([]byte, packet.Overhead+len(inner)), packet.NextIPv4, inner)
				var spi keys.SPI
				if err == nil {
					spi = keys.SPI(binary.BigEndian.Uint32(pkt[4:8]))
					_, err = conn.WriteToUDPAddrPort(pkt, b.data)
				}
				// One not sent stays in the sequence, so that seq
				// stays the index, and is reported apart.
				sent[i] = append(sent[i], pingRecord{at: time.Now(), spi: spi, rekeyed: s.rekeyed.Load(), failed: err != nil})
			}
		}
	}()
	return func() pingStats {
		time.Sleep(time.Second) // the last replies
		close(stop)
		wg.Wait()
		conn.Close()
		var t0 time.Time
		if r := rotated.Load(); r != nil {
			t0 = *r
		}
		for i, recs := range sent {
			for j, r := range recs {
				if r.failed {
					st.sendErrors++
					continue
				}
				st.sent++
				if got[i][j+1].Load() {
					continue
				}
				st.lost++
				if r.at.Before(t0) {
					st.lostBefore++
				}
				if len(st.lostDetail) < maxLostDetail {
					st.lostDetail = append(st.lostDetail, LostPing{SA: i, Seq: uint16(j + 1), SentMs: r.at.Sub(t0).Milliseconds(), SPI: r.spi.String(), Rekeyed: r.rekeyed})
				}
			}
		}
		st.unknownSPI, st.unopened = unknown.Load(), unopened.Load()
		return st
	}
}

// icmpEcho is an ICMP echo request from src to the server's address.
func icmpEcho(src netip.Addr, seq uint16) []byte {
	p := make([]byte, 28)
	p[0], p[8], p[9] = 0x45, 64, 1
	binary.BigEndian.PutUint16(p[2:], 28)
	s, d := src.As4(), [4]byte{100, 64, 0, 1}
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[10:], ^checksum.Sum(0, p[:20]))
	p[20] = 8 // echo request
	binary.BigEndian.PutUint16(p[24:], 0xe1)
	binary.BigEndian.PutUint16(p[26:], seq)
	binary.BigEndian.PutUint16(p[22:], ^checksum.Sum(0, p[20:]))
	return p
}
