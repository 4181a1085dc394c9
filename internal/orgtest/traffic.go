package orgtest

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/enclavekeys/enclave/internal/gather"
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
