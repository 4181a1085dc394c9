package keyserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// ErrTLSMismatch: a key server answered, but the TLS handshake failed on
// a certificate: its certificate does not name the address dialled or is
// not of this org's CA, or it refused this device's certificate. Waiting
// longer cannot help, so a client says so at once.
var ErrTLSMismatch = errors.New("keyserver: TLS handshake failed on a certificate")

// Probe tries the TLS handshake with each key server in addr (A or A,B,...)
// and returns ErrTLSMismatch, explained, when every one that answered
// failed on a certificate. A server that does not answer (not up yet) is
// no error: the caller's RPCs wait for it.
func Probe(ctx context.Context, addr, serverName string, creds *Credentials) error {
	var mismatches []string
	for _, a := range strings.Split(addr, ",") {
		a = strings.TrimSpace(a)
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return err
		}
		name := serverName
		if name == "" {
			name = host
		}
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 2 * time.Second}, Config: creds.ClientTLS(name)}
		hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		c, err := d.DialContext(hctx, "tcp", a)
		cancel()
		if err == nil {
			// In TLS 1.3 the client's handshake ends before the server
			// has checked the client's certificate: its refusal comes as
			// an alert on the first read. A key server that took the
			// certificate sends its HTTP/2 settings at once.
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
			if err == nil || certificateTrouble(err, name) == "" {
				return nil
			}
		}
		if why := certificateTrouble(err, name); why != "" {
			mismatches = append(mismatches, fmt.Sprintf("%s: %s", a, why))
		}
	}
	if len(mismatches) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrTLSMismatch, strings.Join(mismatches, "; "))
}

// certificateTrouble explains a handshake error that is about a
// certificate, or returns "" for any other (a network error).
func certificateTrouble(err error, name string) string {
	var host x509.HostnameError
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var alert tls.AlertError
	switch {
	case errors.As(err, &host):
		return fmt.Sprintf("%v: its certificate does not name %q (dial a name it lists, see enclave cert show on it, or give --server-name)", host, name)
	case errors.As(err, &unknown):
		return "its certificate is not signed by --ca (another organisation's key server, or the wrong --ca)"
	case errors.As(err, &invalid):
		return fmt.Sprintf("its certificate is not valid: %v", invalid)
	case errors.Is(err, ErrNotKeyserver):
		return err.Error()
	case errors.As(err, &alert), strings.Contains(err.Error(), "remote error: tls:"):
		return fmt.Sprintf("it refused this device's certificate (%v): is --cert issued by the org CA it trusts, and still valid?", err)
	}
	return ""
}
