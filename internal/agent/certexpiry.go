package agent

import "time"

// Certificates end SAs. An SA never outlives the certificate of either
// side (the identity that made it): it is capped at the earlier end, the
// cap is logged, and when it ends there the log says which certificate
// ended it. An agent warns of its own certificate's end ahead of time
// (log, status, metric), so that a renewal comes first.

// earliest is the earlier of two times, a zero one not counted.
func earliest(a, b time.Time) time.Time {
	switch {
	case a.IsZero():
		return b
	case b.IsZero() || a.Before(b):
		return a
	}
	return b
}

// capAtCerts caps c's expiry at the end of the peer's chain (peerEnds)
// or this agent's own, whichever comes first, and marks c as capped.
func (a *Agent) capAtCerts(c *conn, peerEnds time.Time) {
	end := earliest(peerEnds, a.creds.Load().Expires())
	// A server's grant is already cut to the certificates' end (to the
	// second below it): within a second of the SA's expiry, the
	// certificate is what ends it.
	if end.IsZero() || !end.Before(c.expires.Add(time.Second)) {
		return
	}
	c.expires, c.certEnds = earliest(end, c.expires), end
	whose := c.peer.Name + "'s"
	if !end.Equal(peerEnds) {
		whose = "this agent's"
	}
	a.log.Warn("an SA ends early, with a certificate: renew it (enclave cert renew, or a new join)", "peer", c.peer.Name, "certificate", whose, "expires", end.UTC().Format(time.RFC3339))
}

// endedByCert says, as an SA capped at a certificate's end expires, that
// the certificate ended it (the peer's next handshake fails for the same
// reason until it is renewed).
func (a *Agent) endedByCert(c *conn) {
	a.log.Warn("SA ended: a certificate it was made with expired; no new SA with this peer until the certificate is renewed", "peer", c.peer.Name, "expired", c.certEnds.UTC().Format(time.RFC3339))
}

// checkOwnCert keeps the metric of this agent's certificate's end
// current and warns of it (handshake.CertWarner).
func (a *Agent) checkOwnCert(now time.Time) {
	end := a.creds.Load().Expires()
	a.metrics.certExpires.Set(float64(end.Unix()))
	a.certWarn.Check(now, end, a.log)
}
