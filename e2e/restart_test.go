package e2e

import (
	"bytes"
	"context"
	crand "crypto/rand"
	ebin "encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/control"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// process is a binary run the test can kill -9 and restart.
type process struct {
	cmd  *exec.Cmd
	log  *lockedBuffer
	done chan struct{}
}

// spawn runs the binary with args in the env's directory.
func (e *env) spawn(args ...string) *process {
	e.t.Helper()
	p := &process{cmd: exec.Command(binary, args...), log: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd.Dir = e.dir
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	e.t.Cleanup(func() {
		p.kill9()
		if e.t.Failed() {
			e.t.Logf("%s:\n%s", strings.Join(args, " "), p.log)
		}
	})
	return p
}

// kill9 kills the process with SIGKILL and waits for it.
func (p *process) kill9() {
	p.cmd.Process.Kill()
	<-p.done
}

// waitLog waits until the process has logged a line containing s.
func (p *process) waitLog(t *testing.T, s string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(p.log.String(), s) {
		select {
		case <-p.done:
			t.Fatalf("the process exited before logging %q:\n%s", s, p.log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q within %v:\n%s", s, within, p.log)
		}
	}
}

// initiator makes handshakes with a server agent from one UDP socket, as
// a client agent would, and returns the grants it gets.
type initiator struct {
	creds *handshake.Credentials
	sock  *net.UDPConn
	to    netip.AddrPort // the server's control port
}

func newInitiator(t *testing.T, dir, name string, to netip.AddrPort) *initiator {
	t.Helper()
	roots, err := ca.LoadRoots(filepath.Join(dir, "ca", "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.LoadCert(filepath.Join(dir, "certs", name+".crt"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.LoadKey(filepath.Join(dir, "certs", name+".key"))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := handshake.NewCredentials(roots, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	sock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	return &initiator{creds: creds, sock: sock, to: to}
}

// handshake makes one SA: the grant, or an error after timeout without
// one (a server that is down, or a refusal).
func (in *initiator) handshake(timeout time.Duration) (*control.Grant, error) {
	var b [4]byte
	crand.Read(b[:])
	idx := ebin.BigEndian.Uint32(b[:]) | 1
	init, msg, err := handshake.Initiate(in.creds, idx, time.Now())
	if err != nil {
		return nil, err
	}
	in.sock.WriteToUDPAddrPort(msg, in.to)
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 4096)
	for {
		in.sock.SetReadDeadline(deadline)
		n, _, err := in.sock.ReadFromUDPAddrPort(buf)
		if err != nil {
			return nil, err
		}
		ans := buf[:n]
		h, err := control.ParseHeader(ans)
		if err != nil {
			continue
		}
		switch h.Type {
		case control.TypeCookieReply:
			if _, cookie, err := control.ParseCookieReply(ans); err == nil {
				in.sock.WriteToUDPAddrPort(init.WithCookie(cookie), in.to)
			}
		case control.TypeResponse:
			res, err := init.Complete(ans, time.Now())
			if err != nil {
				continue // an answer to an earlier initiation
			}
			if res.Payload.Grant == nil {
				return nil, fmt.Errorf("refused: %s", res.Payload.Reason)
			}
			return res.Payload.Grant, nil
		}
	}
}

// TestServerKilledNeverRepeatsSPI: a server agent is killed with SIGKILL
// 20 times at random moments (while it starts, leases its SPIs, or
// grants SAs) and started again, while a client makes handshakes without
// pause. Every SPI granted under one server key, over all 21 lives, is
// distinct: no AES-GCM key and nonce pair can be used twice.
func TestServerKilledNeverRepeatsSPI(t *testing.T) {
	e := newEnv(t)
	ks := e.pairOrg()

	port := freePortPair(t)
	ctrl := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port+1))
	in := newInitiator(t, e.dir, "laptop", ctrl)
	args := []string{"agent", "--ca", "ca/ca.crt", "--cert", "certs/web1.crt", "--key", "certs/web1.key", "--keyserver", ks.addr,
		"--listen", fmt.Sprintf("127.0.0.1:%d", port), "--netstack"}
	type key struct{ gen, spi uint32 }
	granted := map[key]int{} // SPI -> the life that granted it
	lives := map[int]int{}   // grants per life
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	for life := 0; life <= 20; life++ {
		p := e.spawn(args...)
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(300+rng.IntN(900))*time.Millisecond)
		if life == 0 {
			p.waitLog(t, `"agent up"`, 20*time.Second) // the first life runs until it grants
		}
		for ctx.Err() == nil || (life == 0 && lives[0] == 0) {
			g, err := in.handshake(250 * time.Millisecond)
			if err != nil {
				continue
			}
			vc := fmt.Sprintf("%d,%d,%d", g.Enclave, g.Peer, g.Server)
			if vc != "3,7,258" {
				t.Fatalf("grant under VC %s", vc)
			}
			for _, spi := range []uint32{g.SPIOut, g.SPIIn} {
				k := key{g.Generation, spi}
				if was, dup := granted[k]; dup {
					t.Fatalf("SPI %08x of generation %d granted in life %d and again in life %d", spi, g.Generation, was, life)
				}
				granted[k] = life
			}
			lives[life]++
		}
		cancel()
		p.kill9()
		if t.Failed() {
			t.Logf("agent log:\n%s", p.log)
		}
	}
	withGrants := 0
	for _, n := range lives {
		if n > 0 {
			withGrants++
		}
	}
	t.Logf("%d SPIs granted over 21 lives of the server (%d of them granted SAs)", len(granted), withGrants)
	if withGrants < 8 || len(granted) < 40 {
		t.Fatalf("only %d lives granted SAs (%d SPIs): the test did not exercise restarts", withGrants, len(granted))
	}
	if bytes.Contains([]byte(ks.stderr.String()), []byte(`"level":"ERROR"`)) {
		t.Logf("key server log:\n%s", ks.stderr)
	}
}
