package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// The SOCKS5 front (RFC 1928, CONNECT without authentication): unmodified
// programs (curl --socks5, ssh -o ProxyCommand) reach overlay addresses
// through it, the agent's stack dialling for them. Written here because no
// maintained SOCKS5 server library is available to this project; it is
// small and its parser is fuzzed.

// SOCKS5 reply codes.
const (
	socksOK          = 0
	socksFailure     = 1
	socksUnreachable = 4
	socksRefused     = 5
	socksBadCommand  = 7
	socksBadAddress  = 8
)

var errSocks = errors.New("agent: malformed SOCKS5 request")

// ErrNoStack: SOCKS5 and Expose work on the in-process network stack only.
var ErrNoStack = errors.New("agent: SOCKS5 and expose need the in-process network stack (on a TUN device, programs use the host's own)")

// ServeSOCKS5 accepts SOCKS5 clients on ln until it is closed.
func (a *Agent) ServeSOCKS5(ln net.Listener) error {
	if a.net == nil {
		return ErrNoStack
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go a.socks(c)
	}
}

func (a *Agent) socks(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second)) // the negotiation, not the stream
	dst, err := socksHandshake(c)
	if err != nil {
		a.metrics.drop("socks_request")
		return
	}
	if !dst.IsValid() {
		socksReply(c, socksBadAddress)
		return
	}
	if !a.reachable(dst.Addr()) {
		socksReply(c, socksUnreachable)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	up, err := a.net.DialContextTCPAddrPort(ctx, dst)
	cancel()
	if err != nil {
		socksReply(c, socksRefused)
		return
	}
	defer up.Close()
	if socksReply(c, socksOK) != nil {
		return
	}
	c.SetDeadline(time.Time{})
	pipe(c, up)
}

// reachable reports whether the agent has, or can make, an SA to dst.
func (a *Agent) reachable(dst netip.Addr) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.t.route[dst] != nil {
		return true
	}
	_, ok := a.routeFor(dst)
	return ok || a.resolvable(dst)
}

// socksHandshake negotiates "no authentication" and reads a CONNECT
// request. A destination named by a host name that is not an IP literal
// gives an invalid AddrPort (the overlay has no DNS).
func socksHandshake(rw io.ReadWriter) (netip.AddrPort, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil || hdr[0] != 5 || hdr[1] == 0 {
		return netip.AddrPort{}, errSocks
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(rw, methods); err != nil {
		return netip.AddrPort{}, errSocks
	}
	noAuth := false
	for _, m := range methods {
		noAuth = noAuth || m == 0
	}
	if !noAuth {
		rw.Write([]byte{5, 0xff})
		return netip.AddrPort{}, errSocks
	}
	if _, err := rw.Write([]byte{5, 0}); err != nil {
		return netip.AddrPort{}, err
	}
	return readSocksRequest(rw)
}

// readSocksRequest reads VER CMD RSV ATYP ADDR PORT. It answers an
// unsupported command itself.
func readSocksRequest(rw io.ReadWriter) (netip.AddrPort, error) {
	var req [4]byte
	if _, err := io.ReadFull(rw, req[:]); err != nil || req[0] != 5 || req[2] != 0 {
		return netip.AddrPort{}, errSocks
	}
	var addr netip.Addr
	switch req[3] {
	case 1:
		var b [4]byte
		if _, err := io.ReadFull(rw, b[:]); err != nil {
			return netip.AddrPort{}, errSocks
		}
		addr = netip.AddrFrom4(b)
	case 4:
		var b [16]byte
		if _, err := io.ReadFull(rw, b[:]); err != nil {
			return netip.AddrPort{}, errSocks
		}
		addr = netip.AddrFrom16(b).Unmap()
	case 3:
		var n [1]byte
		if _, err := io.ReadFull(rw, n[:]); err != nil || n[0] == 0 {
			return netip.AddrPort{}, errSocks
		}
		name := make([]byte, n[0])
		if _, err := io.ReadFull(rw, name); err != nil {
			return netip.AddrPort{}, errSocks
		}
		addr, _ = netip.ParseAddr(string(name)) // invalid unless an IP literal
	default:
		socksReply(rw, socksBadAddress)
		return netip.AddrPort{}, errSocks
	}
	var port [2]byte
	if _, err := io.ReadFull(rw, port[:]); err != nil {
		return netip.AddrPort{}, errSocks
	}
	if req[1] != 1 {
		socksReply(rw, socksBadCommand)
		return netip.AddrPort{}, errSocks
	}
	if !addr.IsValid() {
		return netip.AddrPort{}, nil
	}
	return netip.AddrPortFrom(addr, binary.BigEndian.Uint16(port[:])), nil
}

func socksReply(w io.Writer, code byte) error {
	_, err := w.Write([]byte{5, code, 0, 1, 0, 0, 0, 0, 0, 0})
	return err
}

// pipe copies both ways until either side ends.
func pipe(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
}

// Expose makes a local TCP service reachable on the agent's overlay
// address: connections to port on the agent's stack are forwarded to
// target (host:port on this machine), as Tailscale's userspace networking
// does.
func (a *Agent) Expose(port uint16, target string) (io.Closer, error) {
	if a.net == nil {
		return nil, ErrNoStack
	}
	ln, err := a.net.ListenTCPAddrPort(netip.AddrPortFrom(a.self, port))
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := net.DialTimeout("tcp", target, 10*time.Second)
				if err != nil {
					a.log.Warn("expose: dial", "target", target, "err", err)
					return
				}
				defer up.Close()
				pipe(c, up)
			}()
		}
	}()
	a.log.Info("exposing", "port", strconv.Itoa(int(port)), "target", target)
	return ln, nil
}
