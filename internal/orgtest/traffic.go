package orgtest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/gather"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/packet"
	"github.com/enclavekeys/enclave/internal/sa"
)

// Echo echoes every TCP connection accepted on ln (an agent's stack, say)
// until the test ends.
func Echo(t testing.TB, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
}

// RoundTrip writes n bytes on c, to an echo service, and checks that the
// same come back within timeout.
func RoundTrip(c net.Conn, n int, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	msg := bytes.Repeat([]byte("enclave!"), n/8+1)[:n]
	go c.Write(msg)
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("orgtest: the echo differs")
	}
	return nil
}

// Counter sums the values of metric name (counters and gauges) over the
// series whose labels include labels.
func Counter(t testing.TB, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	v, err := gather.Sum(g, name, labels)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Sealer returns a function that seals inner IPv4 packets as data packets
// of an SA of the test's own: SPI index index at generation gen under vc,
// its key derived from the org key as the key service's would be. A
// gateway reads them like any other SA's.
func Sealer(t testing.TB, org keys.Key, vc keys.VC, gen keys.Generation, index uint32) func(inner []byte) []byte {
	t.Helper()
	spi, ck := SAKey(t, org, vc, gen, index, keys.PSPv0)
	out, err := sa.NewOutbound(sa.Config{SPI: spi, VC: vc, Version: keys.PSPv0, Key: ck.Bytes()})
	if err != nil {
		t.Fatal(err)
	}
	return func(inner []byte) []byte {
		pkt, err := out.Seal(make([]byte, len(inner)+packet.Overhead), packet.NextIPv4, inner)
		if err != nil {
			t.Fatal(err)
		}
		return pkt
	}
}

// SAKey derives the SPI and key of SA index index at generation gen
// under vc from the org key, as the key service and a server would.
func SAKey(t testing.TB, org keys.Key, vc keys.VC, gen keys.Generation, index uint32, v keys.Version) (keys.SPI, keys.SAKey) {
	t.Helper()
	ek, err := keys.PairKey(&org, vc.Enclave, vc.Peer, gen)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := keys.ServerKey(&ek, vc)
	if err != nil {
		t.Fatal(err)
	}
	spi, err := keys.NewSPI(gen, index)
	if err != nil {
		t.Fatal(err)
	}
	ck, err := keys.SAKeyFromServer(&sk, spi, v)
	if err != nil {
		t.Fatal(err)
	}
	return spi, ck
}

// InnerUDP is an IPv4 UDP packet of size bytes from src:40000 to
// dst:port, its first payload byte mark.
func InnerUDP(src, dst netip.Addr, port uint16, size int, mark byte) []byte {
	p := make([]byte, size)
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(size))
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	binary.BigEndian.PutUint16(p[20:], 40000)
	binary.BigEndian.PutUint16(p[22:], port)
	binary.BigEndian.PutUint16(p[24:], uint16(size-20))
	p[28] = mark
	return p
}

// SendRun sends datagrams of one size from c to dst as one offloaded run
// (a single message with UDP segmentation offload, as agents send them).
func SendRun(c *net.UDPConn, dst netip.AddrPort, run [][]byte) error {
	b, err := batch.New(c, len(run))
	if err != nil {
		return err
	}
	dsts := make([]netip.AddrPort, len(run))
	for i := range dsts {
		dsts[i] = dst
	}
	_, err = b.Write(run, dsts)
	return err
}
