package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keyserver"
)

// Enrollment on the command line (issue 22): an admin makes a join token
// (enclave admin token create), and the new host joins with it (enclave
// join): its key pair is made there and never leaves it.

func newTokenCmd(streams IO, cf *connFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Make join tokens, with which a new host enrolls (enclave join)"}
	var name, role, overlay string
	var enclave enclaveFlag
	var serverID serverIDFlag
	var ttl time.Duration
	create := &cobra.Command{
		Use:   "create --name N --role R [--enclave I] [--server-id K] [--ip ADDR/PREFIX] [--ttl D]",
		Short: "Make a single-use token for one new device, and print the command the host joins with",
		Long: `Make a join token: with it one new host enrolls as the device described
(enclave join), getting its certificate from the key service's issuing CA
for a key it makes itself. The token is shown once (only its hash is kept),
works once, and expires after --ttl (default 1h, at most a week). Roles:
server, client, gateway, monitor.`,
		Example: `  $A token create --name web2 --role server --enclave 3 --server-id 302 --ip 100.64.3.3/16
  $A token create --name phone --role client --enclave 7 --ip 100.64.7.9/16 --ttl 15m`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" || role == "" {
				return usagef("--name and --role are required")
			}
			req := &api.CreateJoinTokenRequest{Name: name, Role: role, Enclave: uint32(enclave.id), Overlay: overlay, TtlSeconds: uint32(ttl / time.Second)}
			if serverID.set {
				k := uint32(serverID.id)
				req.ServerId = &k
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				r, err := api.NewAdminClient(conn).CreateJoinToken(ctx, req)
				if err != nil {
					return rpcError(err)
				}
				w := streams.Out
				fmt.Fprintf(w, "%s\n", r.GetMessage())
				fmt.Fprintf(w, "token: %s\n", r.GetToken())
				fmt.Fprintf(w, "on the new host:\n  enclave join --keyserver %s --token %s --ca-fingerprint %s --dir /etc/enclave\n",
					cf.keyserver, r.GetToken(), ca.Fingerprint(creds.Roots.Certs()[0]))
				return nil
			})
		},
	}
	fl := create.Flags()
	fl.StringVar(&name, "name", "", "the device's name")
	fl.StringVar(&role, "role", "", "server, client, gateway or monitor")
	fl.Var(&enclave, "enclave", "the device's enclave")
	fl.Var(&serverID, "server-id", "the server id (servers)")
	fl.StringVar(&overlay, "ip", "", "the device's overlay address and network, e.g. 100.64.3.3/16 (agents need one)")
	fl.DurationVar(&ttl, "ttl", time.Hour, "how long the token may be used")
	cmd.AddCommand(create)
	return cmd
}

func newJoinCmd(streams IO) *cobra.Command {
	var addr, token, fingerprint, dir, serverName string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "join --keyserver ADDR --token T --ca-fingerprint sha256:HEX --dir DIR",
		Short: "Enroll this host with a join token: make its key here and get its certificate from the key service",
		Long: `Enroll this host as the device a join token was made for (enclave admin
token create). The key pair is made here and never leaves the host: the
key service gets a signing request, checks the token, registers the device
and answers with its certificate, issued by its issuing CA. The key server
is trusted only if its certificate chains to the CA whose fingerprint is
given (enclave ca show prints it), so nothing but the token and the
fingerprint travels to the host.

It writes DIR/ca.crt, DIR/NAME.crt and DIR/NAME.key (mode 0600), and prints
the agent command that uses them. Existing files are never overwritten.`,
		Example: `  enclave join --keyserver 192.0.2.1:7443 --token enclave-join-... --ca-fingerprint sha256:0f1e... --dir /etc/enclave`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for n, v := range map[string]string{"keyserver": addr, "token": token, "ca-fingerprint": fingerprint, "dir": dir} {
				if v == "" {
					return usagef("--%s is required", n)
				}
			}
			if !strings.HasPrefix(fingerprint, "sha256:") || len(fingerprint) != len("sha256:")+64 {
				return usagef("--ca-fingerprint %q: want sha256: and 64 hex digits (enclave ca show prints it)", echo.Cut(fingerprint))
			}
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				return usagef("--keyserver %q: want HOST:PORT", echo.Cut(addr))
			}
			if serverName == "" {
				serverName = host
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			priv, csr, err := ca.NewKeyRequest()
			if err != nil {
				return failed(err)
			}
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(pinnedTLS(fingerprint, serverName))))
			if err != nil {
				return usagef("--keyserver: %w", err)
			}
			defer conn.Close()
			r, err := api.NewEnrollClient(conn).Join(ctx, &api.JoinRequest{Token: token, Csr: csr})
			if err != nil {
				return rpcError(err)
			}
			return writeJoined(streams, dir, fingerprint, r, priv)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&addr, "keyserver", "", "the key service's address HOST:PORT")
	fl.StringVar(&token, "token", "", "the join token (enclave admin token create)")
	fl.StringVar(&fingerprint, "ca-fingerprint", "", "the org CA's fingerprint, sha256:HEX (enclave ca show)")
	fl.StringVar(&dir, "dir", "", "where to write ca.crt, NAME.crt and NAME.key")
	fl.StringVar(&serverName, "server-name", "", "the name in the key server's certificate (default: the host of --keyserver)")
	fl.DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the key service")
	return cmd
}

// pinnedTLS trusts a key server only if its chain holds the CA with the
// given fingerprint and its certificate, a key server's, chains to that CA
// and names serverName. The host has no CA file yet: the fingerprint is
// its trust, and the key server serves the CA at the end of its chain.
func pinnedTLS(fingerprint, serverName string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below, against the pinned CA, not the system's roots
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the key server sent no certificate")
			}
			var root *x509.Certificate
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				if ca.Fingerprint(c) == fingerprint {
					root = c
				} else {
					inter.AddCert(c)
				}
			}
			if root == nil {
				return fmt.Errorf("the key server does not serve the CA %s: wrong --ca-fingerprint, or not this org's key server", fingerprint)
			}
			roots, err := ca.NewRoots(root)
			if err != nil {
				return err
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots.Pool(), Intermediates: inter, DNSName: serverName, CurrentTime: time.Now(),
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("the key server's certificate: %w", err)
			}
			if id, err := ca.IdentityOf(leaf); err != nil || id.Role != ca.RoleKeyserver || id.Org != roots.Org() {
				return fmt.Errorf("%w: %s", keyserver.ErrNotKeyserver, leaf.Subject.CommonName)
			}
			return nil
		},
	}
}

// writeJoined checks the answer (a certificate for this key, under the
// pinned CA) and writes the files.
func writeJoined(streams IO, dir, fingerprint string, r *api.JoinReply, priv ed25519.PrivateKey) error {
	chain, err := ca.ParsePEMCerts(r.GetCertificatePem())
	if err != nil {
		return failed(fmt.Errorf("the key service's answer: %w", err))
	}
	roots, err := ca.ParsePEMCerts(r.GetCaPem())
	if err != nil {
		return failed(fmt.Errorf("the key service's answer: %w", err))
	}
	pinned := false
	for _, c := range roots {
		pinned = pinned || ca.Fingerprint(c) == fingerprint
	}
	rs, err := ca.NewRoots(roots...)
	if err != nil || !pinned || len(chain) == 0 {
		return failed(errors.New("the key service's answer does not hold the pinned CA and a certificate"))
	}
	id, err := rs.VerifyChain(chain, time.Now())
	if err != nil {
		return failed(fmt.Errorf("the certificate the key service issued: %w", err))
	}
	if pub, ok := chain[0].PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(priv.Public()) {
		return failed(errors.New("the key service issued a certificate for another key"))
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return failed(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return failed(err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"ca.crt", r.GetCaPem(), 0o644},
		{id.Name + ".crt", r.GetCertificatePem(), 0o644},
		{id.Name + ".key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
	}
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(dir, f.name)); err == nil {
			return failed(fmt.Errorf("refusing to overwrite %s (the device is registered now: move the old files away and ask for a new token only if this join must be done again)", filepath.Join(dir, f.name)))
		}
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return failed(err)
		}
	}
	clear(keyDER)
	fmt.Fprintf(streams.Out, "joined as %s; certificate until %s\n", id, chain[0].NotAfter.UTC().Format(time.RFC3339))
	c, k, cafile := filepath.Join(dir, id.Name+".crt"), filepath.Join(dir, id.Name+".key"), filepath.Join(dir, "ca.crt")
	fmt.Fprintf(streams.Out, "run it: enclave agent --ca %s --cert %s --key %s --keyserver KEYSERVER --tun enc0\n", cafile, c, k)
	return nil
}
