package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

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
		Example: `  enclave admin token create --name web2 --role server --enclave 3 --server-id 302 --ip 100.64.3.3/16
  enclave admin token create --name phone --role client --enclave 7 --ip 100.64.7.9/16 --ttl 15m`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" || role == "" {
				return usagef("--name and --role are required")
			}
			req := &api.CreateJoinTokenRequest{Name: name, Role: role, Overlay: overlay, TtlSeconds: uint32(ttl / time.Second)}
			if serverID.set {
				k := uint32(serverID.id)
				req.ServerId = &k
			}
			return cf.with(func(ctx context.Context, conn *grpc.ClientConn, creds *keyserver.Credentials) error {
				id, err := layoutID(ctx, api.NewAdminClient(conn), &enclave)
				if err != nil {
					return err
				}
				req.Enclave = uint32(id)
				r, err := api.NewAdminClient(conn).CreateJoinToken(ctx, req)
				if err != nil {
					return rpcError(err)
				}
				w := streams.Out
				fmt.Fprintf(w, "%s\n", r.GetMessage())
				fmt.Fprintf(w, "token: %s\n", r.GetToken())
				fmt.Fprintf(w, "on the new host (the token on standard input, out of the process list):\n  printf '%%s\\n' %s | enclave join --keyserver %s --token-file - --ca-fingerprint %s --dir /etc/enclave\n",
					r.GetToken(), cf.keyserver, ca.Fingerprint(creds.Roots.Certs()[0]))
				fmt.Fprintf(w, "(as root; add --run to become the agent at once, or start the unit enclave-agent@%s after it)\n", name)
				return nil
			})
		},
	}
	fl := create.Flags()
	fl.StringVar(&name, "name", "", "the device's name")
	fl.StringVar(&role, "role", "", "server, client, gateway or monitor")
	fl.Var(&enclave, "enclave", "the device's enclave")
	fl.Var(&serverID, "server-id", "the server id (servers)")
	fl.StringVar(&overlay, "ip", "", "the device's overlay address and network, e.g. 100.64.3.3/16 (agents need one; default: the next free one of its enclave's block, if it has one)")
	fl.DurationVar(&ttl, "ttl", time.Hour, "how long the token may be used")
	cmd.AddCommand(create)
	return cmd
}

func newJoinCmd(streams IO) *cobra.Command {
	var addr, token, tokenFile, fingerprint, dir, serverName string
	var timeout time.Duration
	var run bool
	cmd := &cobra.Command{
		Use:   "join --keyserver ADDR --token-file FILE|- --ca-fingerprint sha256:HEX --dir DIR [--run]",
		Short: "Enroll this host with a join token: make its key here and get its certificate from the key service",
		Long: `Enroll this host as the device a join token was made for (enclave admin
token create). The key pair is made here and never leaves the host: the
key service gets a signing request, checks the token, registers the device
and answers with its certificate, issued by its issuing CA. The key server
is trusted only if its certificate chains to the CA whose fingerprint is
given (enclave ca show prints it), so nothing but the token and the
fingerprint travels to the host.

The token is read from a file or standard input (--token-file -), so that
it never shows in the process list; --token puts it on the command line,
where every local user can read it while join runs.

A key service that does not answer yet is waited for, up to --timeout; a
key server that does not serve the pinned CA is refused at once.

It writes DIR/ca.crt, DIR/NAME.crt and DIR/NAME.key (mode 0600) and, for
an agent, DIR/agent.yaml (the CA, this key service, a TUN device) unless
one is there, and prints how to run it: the systemd unit
enclave-agent@NAME, or the command. Existing files are never overwritten.`,
		Example: `  printf '%s\n' enclave-join-... | enclave join --keyserver 192.0.2.1:7443 --token-file - --ca-fingerprint sha256:0f1e... --dir /etc/enclave
  enclave join --keyserver 192.0.2.1:7443 --token-file /root/web2.token --ca-fingerprint sha256:0f1e... --dir /etc/enclave`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case token != "" && tokenFile != "":
				return usagef("give the token once: --token-file or --token")
			case tokenFile != "":
				t, err := readToken(tokenFile, streams.In, streams.Err)
				if err != nil {
					return err
				}
				token = t
			case token == "":
				return usagef("--token-file is required (the join token from enclave admin token create; - reads it from standard input)")
			}
			for n, v := range map[string]string{"keyserver": addr, "ca-fingerprint": fingerprint, "dir": dir} {
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
			// The key is kept beside the files until the join is
			// confirmed: a join tried again (its answer lost, or refused
			// here) sends the same request, which the token is bound to.
			keyPath := joinKeyPath(dir, token)
			priv, csr, err := joinKey(keyPath)
			if err != nil {
				return failed(err)
			}
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(pinnedTLS(fingerprint, serverName))))
			if err != nil {
				return usagef("--keyserver: %w", err)
			}
			defer conn.Close()
			r, err := joinWaiting(ctx, api.NewEnrollClient(conn), &api.JoinRequest{Token: token, Csr: csr}, addr, streams.Err)
			if err != nil {
				if strings.Contains(status.Convert(err).Message(), "does not serve the CA") {
					return failed(fmt.Errorf("the key server at %s does not serve the CA %s: a wrong --ca-fingerprint (enclave ca show on the CA's machine prints it), or not this org's key server", addr, fingerprint))
				}
				return rpcError(err)
			}
			chain, id, err := writeJoined(streams, dir, fingerprint, addr, r, priv)
			if err != nil {
				return err
			}
			if err := confirmJoin(ctx, addr, fingerprint, serverName, chain, priv); err != nil {
				return failed(fmt.Errorf("%s's files are written, but the key service did not hear that this host has them (%v): run the same join command again, with the same token, which confirms it", id.Name, err))
			}
			os.Remove(keyPath)
			if run {
				return runJoinedAgent(streams, dir, id)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&run, "run", false, "then run the agent with what join wrote (as enclave agent --config DIR/agent.yaml --cert DIR/NAME.crt --key DIR/NAME.key; as root, for its TUN device)")
	fl.StringVar(&addr, "keyserver", "", "the key service's address HOST:PORT")
	fl.StringVar(&tokenFile, "token-file", "", "a file holding the join token (enclave admin token create); - reads standard input")
	fl.StringVar(&token, "token", "", "the join token itself (shows in the process list while join runs: prefer --token-file)")
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
func writeJoined(streams IO, dir, fingerprint, keyserverAddr string, r *api.JoinReply, priv ed25519.PrivateKey) ([]*x509.Certificate, ca.Identity, error) {
	chain, err := ca.ParsePEMCerts(r.GetCertificatePem())
	if err != nil {
		return nil, ca.Identity{}, failed(fmt.Errorf("the key service's answer: %w", err))
	}
	roots, err := ca.ParsePEMCerts(r.GetCaPem())
	if err != nil {
		return nil, ca.Identity{}, failed(fmt.Errorf("the key service's answer: %w", err))
	}
	pinned := false
	for _, c := range roots {
		pinned = pinned || ca.Fingerprint(c) == fingerprint
	}
	rs, err := ca.NewRoots(roots...)
	if err != nil || !pinned || len(chain) == 0 {
		return nil, ca.Identity{}, failed(errors.New("the key service's answer does not hold the pinned CA and a certificate (the device stays pending and the token works again: tell an admin)"))
	}
	id, err := rs.VerifyChain(chain, time.Now())
	if err != nil {
		return nil, ca.Identity{}, failed(fmt.Errorf("the certificate the key service issued: %w (nothing is written; the device stays pending and this command works again with the same token once an admin mends the key server's issuing CA)", err))
	}
	if pub, ok := chain[0].PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(priv.Public()) {
		return nil, ca.Identity{}, failed(errors.New("the key service issued a certificate for another key"))
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, ca.Identity{}, failed(err)
	}
	defer clear(keyDER)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"ca.crt", r.GetCaPem(), 0o644},
		{id.Name + ".crt", r.GetCertificatePem(), 0o644},
		{id.Name + ".key", keyPEM, 0o600},
	}
	// A join tried again after its files were written (its confirmation
	// was lost) finds its own key there: it writes the answer again.
	again := false
	if k, err := ca.LoadKey(filepath.Join(dir, id.Name+".key")); err == nil && k.Equal(priv) {
		again = true
	}
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(dir, f.name)); err == nil && !again {
			return nil, ca.Identity{}, failed(fmt.Errorf("refusing to overwrite %s (another device's files, or an earlier join's: move them away; the device stays pending and this command works again with the same token)", filepath.Join(dir, f.name)))
		}
	}
	for _, f := range files {
		if err := ca.WriteFileAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return nil, ca.Identity{}, failed(err)
		}
	}
	fmt.Fprintf(streams.Out, "joined as %s; certificate until %s\n", id, chain[0].NotAfter.UTC().Format(time.RFC3339))
	c, k, cafile := filepath.Join(dir, id.Name+".crt"), filepath.Join(dir, id.Name+".key"), filepath.Join(dir, "ca.crt")
	if id.Role == ca.RoleGateway {
		fmt.Fprintf(streams.Out, "run it: write its settings to %s (deploy/examples/gateway.yaml in the source has them all; each is the flag of the same name, enclave gateway --help), then systemctl enable --now enclave-gateway@%s\n  or: enclave gateway --ca %s --cert %s --key %s --keyserver %s --nfqueue 0-1\n",
			filepath.Join(dir, "gateway.yaml"), id.Name, cafile, c, k, keyserverAddr)
		return chain, id, nil
	}
	cfg := filepath.Join(dir, "agent.yaml")
	if err := writeAgentConfig(cfg, id, cafile, keyserverAddr); err != nil && !again {
		fmt.Fprintf(streams.Err, "warning: %v\n", err)
	}
	fmt.Fprintf(streams.Out, "run it: systemctl enable --now enclave-agent@%s (deploy/systemd)\n  or (as root, for the TUN device): enclave agent --config %s --cert %s --key %s\n", id.Name, cfg, c, k)
	return chain, id, nil
}

// joinKeyPath is where a join keeps its key until the join is confirmed,
// named by the token (never holding it).
func joinKeyPath(dir, token string) string {
	h := sha256.Sum256([]byte(token))
	return filepath.Join(dir, ".join-"+hex.EncodeToString(h[:8])+".key")
}

// joinKey loads the key an earlier try of this join made, or makes one
// and keeps it (mode 0600), and returns it with a signing request.
func joinKey(path string) (ed25519.PrivateKey, []byte, error) {
	// The directory and the key file must be this user's alone: a key,
	// CA or settings file another user could have put there would be the
	// device's.
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	if st, err := os.Lstat(dir); err != nil {
		return nil, nil, err
	} else if own, ok := st.Sys().(*syscall.Stat_t); !st.IsDir() || st.Mode().Perm()&0o022 != 0 || !ok || (int(own.Uid) != os.Geteuid() && own.Uid != 0) {
		return nil, nil, fmt.Errorf("%s is not a directory of this user's (or root's) that only its owner may write: join writes the device's key and settings there; use one such as /etc/enclave", dir)
	}
	if st, err := os.Lstat(path); err == nil {
		own, ok := st.Sys().(*syscall.Stat_t)
		if !st.Mode().IsRegular() || st.Mode().Perm()&0o077 != 0 || !ok || int(own.Uid) != os.Geteuid() {
			return nil, nil, fmt.Errorf("%s is not a file of this user's with mode 0600 (a link, or another user's): remove it, and join again with a new token", path)
		}
	}
	if k, err := ca.LoadKey(path); err == nil {
		csr, err := ca.RequestFor(k)
		return k, csr, err
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("the key of an earlier try of this join: %w (remove it to start again with a new token)", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, err
	}
	priv, csr, err := ca.NewKeyRequest()
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	defer clear(der)
	if err := ca.WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, nil, err
	}
	return priv, csr, nil
}

// confirmJoin tells the key service, with the certificate it issued, that
// this host holds it: the device is enrolled and the token used up.
func confirmJoin(ctx context.Context, addr, fingerprint, serverName string, chain []*x509.Certificate, priv ed25519.PrivateKey) error {
	cfg := pinnedTLS(fingerprint, serverName)
	pair := tls.Certificate{PrivateKey: priv, Leaf: chain[0]}
	for _, c := range chain {
		pair.Certificate = append(pair.Certificate, c.Raw)
	}
	cfg.Certificates = []tls.Certificate{pair}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err = api.NewEnrollClient(conn).ConfirmJoin(ctx, &api.ConfirmJoinRequest{})
	return err
}

// writeAgentConfig writes the agent's settings for a joined host (the CA,
// the key service it joined, a TUN device) where none are: the systemd
// unit reads them and passes the certificate and key. An existing file
// is the operator's and stays as it is.
func writeAgentConfig(path string, id ca.Identity, cafile, keyserverAddr string) error {
	if abs, err := filepath.Abs(cafile); err == nil {
		cafile = abs
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s exists: left as it is (it should name ca %s and keyserver %s)", path, cafile, keyserverAddr)
	}
	text := fmt.Sprintf(`# Written by enclave join for %s on %s. Every setting is the flag of the
# same name (enclave agent --help); deploy/examples/agent.yaml has them all.
# The systemd unit enclave-agent@%s passes --cert and --key.
ca: %s
keyserver: %s
tun: enc0
`, id, time.Now().UTC().Format(time.DateOnly), id.Name, cafile, keyserverAddr)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// readToken reads a join token from a file, or from in for "-": the first
// line, without spaces around it.
func readToken(path string, in io.Reader, errw io.Writer) (string, error) {
	var r io.Reader = in
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return "", usagef("--token-file: %w", err)
		}
		defer f.Close()
		r = f
	} else if in == nil {
		return "", usagef("--token-file -: no standard input")
	}
	if f, ok := r.(*os.File); ok && path != "-" {
		if st, err := f.Stat(); err == nil && st.Mode().Perm()&0o077 != 0 && errw != nil {
			fmt.Fprintf(errw, "warning: %s is readable by others (mode %v): a join token is a secret until it is used; chmod 600 it, or pass it on standard input\n", path, st.Mode().Perm())
		}
	}
	b, err := io.ReadAll(io.LimitReader(r, 4096))
	if err != nil {
		return "", usagef("--token-file %s: %w", path, err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	if t := strings.TrimSpace(line); t != "" {
		return t, nil
	}
	return "", usagef("--token-file %s: no token in it (enclave admin token create prints one)", path)
}

// joinWaiting asks the key service to enroll this host, waiting (up to
// ctx's deadline) for one that cannot be reached yet, as --timeout
// promises: a host set up before its key server is up still joins. Only
// an unreachable service is waited for; a key server that fails the
// pinned CA's check is an answer, and is not tried again.
func joinWaiting(ctx context.Context, c api.EnrollClient, req *api.JoinRequest, addr string, errw io.Writer) (*api.JoinReply, error) {
	wait, told := 250*time.Millisecond, false
	for {
		r, err := c.Join(ctx, req)
		st := status.Convert(err)
		if err == nil || st.Code() != codes.Unavailable || strings.Contains(st.Message(), "authentication handshake failed") {
			return r, err
		}
		if !told && errw != nil {
			fmt.Fprintf(errw, "waiting for the key service at %s (%s)...\n", addr, st.Message())
			told = true
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// runJoinedAgent becomes the agent join set up (the process is replaced,
// so that it runs as a service's main process would).
func runJoinedAgent(streams IO, dir string, id ca.Identity) error {
	if id.Role != ca.RoleServer && id.Role != ca.RoleClient {
		return usagef("--run starts an agent; %s is a %s: write its settings (deploy/examples) and start it", id.Name, id.Role)
	}
	self, err := os.Executable()
	if err != nil {
		return failed(err)
	}
	args := []string{self, "agent", "--config", filepath.Join(dir, "agent.yaml"), "--cert", filepath.Join(dir, id.Name+".crt"), "--key", filepath.Join(dir, id.Name+".key")}
	fmt.Fprintf(streams.Out, "running: %s\n", strings.Join(args[1:], " "))
	if err := syscall.Exec(self, args, os.Environ()); err != nil {
		return failed(fmt.Errorf("--run: starting the agent: %w", err))
	}
	return nil
}
