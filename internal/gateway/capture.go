package gateway

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/pcapfile"
)

// capture writes the decrypted inner packets to a pcapng file (raw IP),
// each with the SA it came on and the policy's verdict in its comment, so
// that Wireshark shows who read what under which key. It is a debugging
// aid: each packet written costs a comment string. Written to a file
// (CaptureFiles), it is rotated at a size, so that a busy gateway never
// fills its disk with it.
type capture struct {
	mu      sync.Mutex
	buf     *bufio.Writer
	w       *pcapfile.RawWriter
	err     error
	files   *CaptureFiles
	f       *os.File
	written int64
	dropped uint64 // packets not written: the capture failed
	told    bool   // the failure was returned by flush once
}

// CaptureFiles is a rotated capture: Path holds the newest packets; at
// MaxSize bytes it becomes Path.1 (the older ones Path.2 ... Path.Keep,
// the oldest dropped) and a new pcapng starts, each file whole.
type CaptureFiles struct {
	Path    string
	MaxSize int64 // bytes; 0: never rotated
	Keep    int   // older files kept beside Path
}

func newCapture(w io.Writer) (*capture, error) {
	c := &capture{}
	return c, c.start(w)
}

// newCaptureFiles starts a rotated capture at f.Path (truncated).
func newCaptureFiles(f *CaptureFiles) (*capture, error) {
	if f.MaxSize < 0 || f.Keep < 0 {
		return nil, fmt.Errorf("%w: capture size and files kept must not be negative", ErrConfig)
	}
	c := &capture{files: f}
	file, err := os.OpenFile(f.Path, os.O_WRONLY|os.O_TRUNC|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	c.f = file
	return c, c.start(file)
}

func (c *capture) start(w io.Writer) error {
	c.buf = bufio.NewWriterSize(w, 1<<20)
	rw, err := pcapfile.NewRawWriter(c.buf)
	if err != nil {
		return err
	}
	c.w, c.written = rw, pcapfile.RawHeaderLen
	return nil
}

// rotate moves the full file aside and starts a new one (under c.mu).
func (c *capture) rotate() error {
	if err := c.buf.Flush(); err != nil {
		return err
	}
	if err := c.f.Close(); err != nil {
		return err
	}
	p, keep := c.files.Path, c.files.Keep
	if keep == 0 {
		os.Remove(p)
	} else {
		os.Remove(fmt.Sprintf("%s.%d", p, keep))
		for i := keep - 1; i >= 1; i-- {
			os.Rename(fmt.Sprintf("%s.%d", p, i), fmt.Sprintf("%s.%d", p, i+1))
		}
		if err := os.Rename(p, p+".1"); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	c.f = f
	return c.start(f)
}

func (c *capture) write(inner []byte, vc keys.VC, spi keys.SPI, v Verdict) {
	comment := "sa spi=" + spi.String() + " vc=" + vc.String() + " verdict=" + v.String()
	n := int64(pcapfile.RawPacketLen(len(inner), len(comment)))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && c.files != nil && c.files.MaxSize > 0 && c.written+n > c.files.MaxSize && c.written > pcapfile.RawHeaderLen {
		c.err = c.rotate()
	}
	if c.err != nil {
		c.dropped++
		return
	}
	c.err = c.w.WritePacket(inner, time.Now(), comment)
	c.written += n
}

// flush writes what is buffered, and returns the error that stopped the
// capture the first time it is asked after it happened.
func (c *capture) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = c.buf.Flush()
	}
	if c.err != nil && !c.told {
		c.told = true
		return fmt.Errorf("%w (%d packets not written)", c.err, c.dropped)
	}
	return nil
}

func (c *capture) close() {
	c.flush()
	if c.f != nil {
		c.f.Close()
	}
}
