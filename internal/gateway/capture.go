package gateway

import (
	"bufio"
	"io"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/pcapfile"
)

// capture writes the decrypted inner packets to a pcapng file (raw IP),
// each with the SA it came on and the policy's verdict in its comment, so
// that Wireshark shows who read what under which key. It is a debugging
// aid: each packet written costs a comment string.
type capture struct {
	mu  sync.Mutex
	buf *bufio.Writer
	w   *pcapfile.RawWriter
	err error
}

func newCapture(w io.Writer) (*capture, error) {
	b := bufio.NewWriterSize(w, 1<<20)
	rw, err := pcapfile.NewRawWriter(b)
	if err != nil {
		return nil, err
	}
	return &capture{buf: b, w: rw}, nil
}

func (c *capture) write(inner []byte, vc keys.VC, spi keys.SPI, v Verdict) {
	comment := "sa spi=" + spi.String() + " vc=" + vc.String() + " verdict=" + v.String()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = c.w.WritePacket(inner, time.Now(), comment)
	}
}

func (c *capture) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = c.buf.Flush()
	}
}

func (c *capture) close() { c.flush() }
