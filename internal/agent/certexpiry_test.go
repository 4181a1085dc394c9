package agent

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/handshake"
)

// TestSACappedAtCertificate (issue 31): an SA never outlives the
// certificate of the peer that made it: the client's certificate ends in
// a few seconds, so the server grants the SA until then only; both sides
// say so when it is made, and the SA ends there, counted and logged as
// ended by the certificate (an SA used to run on for up to its hour).
func TestSACappedAtCertificate(t *testing.T) {
	o := pairOrg(t)
	var serverLogs, clientLogs syncBuffer
	server := o.agentFor(serverID("web1", 3, 258, "100.64.3.1/16"), nil, func(c *Config) {
		c.Logger = slog.New(slog.NewJSONHandler(&serverLogs, nil))
	})
	echoServer(t, server, 7)
	// A certificate of one day, issued a day less 4 s ago: it ends in 4 s.
	id := clientID("laptop", 7, "100.64.7.1/16")
	is, err := o.Auth.Issue(id, nil, 1, time.Now().Add(-24*time.Hour+4*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.ParseKeyPEM(is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	creds, err := handshake.NewCredentials(o.Auth.Roots(), is.Cert, key)
	if err != nil {
		t.Fatal(err)
	}
	end := creds.Expires()
	if d := time.Until(end); d <= 0 || d > 5*time.Second {
		t.Fatalf("the certificate ends in %s", d)
	}
	client := o.agentFor(id, []Route{route(server)}, func(c *Config) {
		c.Credentials = creds
		c.Logger = slog.New(slog.NewJSONHandler(&clientLogs, nil))
	})
	roundTrip(t, client, netip.AddrPortFrom(server.Addr(), 7), 100)
	for _, a := range []*Agent{server, client} {
		for _, sa := range a.Associations() {
			if sa.Expires.After(end) {
				t.Fatalf("an SA expires at %s, after the certificate's end %s", sa.Expires, end)
			}
		}
	}
	if !strings.Contains(serverLogs.String(), "an SA ends early, with a certificate") || !strings.Contains(clientLogs.String(), "an SA ends early, with a certificate") {
		t.Fatalf("the cap was not logged:\nserver: %s\nclient: %s", &serverLogs, &clientLogs)
	}
	if st := client.Status(); !st.CertExpires.Equal(end) {
		t.Fatalf("status: certificate expires %s, want %s", st.CertExpires, end)
	}
	waitFor(t, 10*time.Second, func() bool { return server.SAs() == 0 && client.SAs() == 0 })
	if n := metric(t, server, "enclave_agent_sas_ended_total", map[string]string{"reason": "certificate_expired"}); n < 1 {
		t.Fatalf("%v SAs ended by the certificate on the server", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(serverLogs.String(), "SA ended: a certificate it was made with expired") ||
		!strings.Contains(clientLogs.String(), "this device's certificate has expired") {
		if time.Now().After(deadline) {
			t.Fatalf("the end was not logged as the certificate's:\nserver: %s\nclient: %s", &serverLogs, &clientLogs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
