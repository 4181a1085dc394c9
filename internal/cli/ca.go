package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keyserver"
)

// now is the clock of the certificate commands; tests may replace it.
var now = time.Now

func newCACmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Manage the org's certificate authority"}
	var dir, org string
	initCmd := &cobra.Command{
		Use:   "init --dir DIR --org ORG",
		Short: "Create the org's Ed25519 root (ca.crt, and ca.key with mode 0600)",
		Long: `Create a new certificate authority for ORG in DIR: ca.crt, the root certificate
every device trusts, and ca.key (mode 0600), the signing key, which belongs
offline. ORG is the SPIFFE trust domain in every identity (lowercase letters,
digits, '.', '-', '_'). Existing files are never overwritten.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || org == "" {
				return usagef("--dir and --org are required")
			}
			a, err := ca.Init(dir, org, now())
			if errors.Is(err, ca.ErrOrg) {
				return usageError(err)
			}
			if err != nil {
				return failed(err)
			}
			fmt.Fprintf(streams.Out, "created CA for %s in %s (expires %s), fingerprint %s\n", a.Org, dir, a.Cert.NotAfter.UTC().Format(time.RFC3339), ca.Fingerprint(a.Cert))
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "", "directory for ca.crt and ca.key")
	initCmd.Flags().StringVar(&org, "org", "", "the organisation's trust domain, e.g. example.org")

	var showDir string
	show := &cobra.Command{
		Use:   "show --ca DIR",
		Short: "Print the CA's org, validity and fingerprint (what enclave join --ca-fingerprint takes)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if showDir == "" {
				return usagef("--ca is required")
			}
			cert, err := ca.LoadCert(filepath.Join(showDir, ca.CertFile))
			if err != nil {
				return fileError(fmt.Errorf("--ca %s: %w", showDir, err))
			}
			org, err := ca.OrgOf(cert)
			if err != nil {
				return usageError(err)
			}
			fmt.Fprintf(streams.Out, "org:         %s\nexpires:     %s\nfingerprint: %s\n", org, cert.NotAfter.UTC().Format(time.RFC3339), ca.Fingerprint(cert))
			return nil
		},
	}
	show.Flags().StringVar(&showDir, "ca", "", "the CA directory (ca.crt)")

	var issCA, issName, issOut string
	var issDays int
	issuer := &cobra.Command{
		Use:   "issuer --ca DIR --name NAME --out DIR [--days N]",
		Short: "Make an issuing CA for a key service, so that hosts can join (enclave join) while the org CA's key stays offline",
		Long: `Sign an issuing CA with the org CA: a certificate and key (NAME.crt, NAME.key
with mode 0600 in --out) that may sign device certificates and nothing else.
Give them to a key server (enclave keyserver --issuer-cert NAME.crt
--issuer-key NAME.key): it then issues the certificates of hosts that join
with a token (enclave admin token create, enclave join), and the org CA's
key goes back offline. Certificates it issues carry it as their chain; every
device verifies them with the org CA alone.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if issCA == "" || issName == "" || issOut == "" {
				return usagef("--ca, --name and --out are required")
			}
			a, err := ca.Load(issCA)
			if err != nil {
				return fileError(fmt.Errorf("--ca %s: %w", issCA, err))
			}
			is, err := a.IssueIssuer(issName, issDays, now())
			if err != nil {
				return usageError(err)
			}
			if err := is.WriteFiles(issOut, issName); err != nil {
				return failed(err)
			}
			fmt.Fprintf(streams.Out, "issuing CA %s for %s in %s (expires %s)\n", issName, a.Org, issOut, is.Cert.NotAfter.UTC().Format(time.RFC3339))
			return nil
		},
	}
	issuer.Flags().StringVar(&issCA, "ca", "", "the org CA directory (ca.crt, ca.key)")
	issuer.Flags().StringVar(&issName, "name", "", "the issuing CA's name (the key server's, say)")
	issuer.Flags().StringVar(&issOut, "out", "", "directory for NAME.crt and NAME.key")
	issuer.Flags().IntVar(&issDays, "days", 365, "validity in days")
	cmd.AddCommand(initCmd, show, issuer)
	return cmd
}

func newCertCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "cert", Short: "Issue and inspect device certificates"}
	cmd.AddCommand(newCertIssueCmd(streams), newCertShowCmd(streams), newCertRenewCmd(streams), newCertRequestCmd(streams), newCertSignCmd(streams))
	return cmd
}

func newCertIssueCmd(streams IO) *cobra.Command {
	var caDir, name, role, out, hosts, overlay string
	var enclave enclaveFlag
	var serverID serverIDFlag
	var days int
	cmd := &cobra.Command{
		Use:   "issue --ca DIR --name NAME --role ROLE [--enclave I] [--server-id K] [--days N] --out DIR",
		Short: "Issue a device certificate (NAME.crt, NAME.key)",
		Long: `Issue a certificate and Ed25519 key for a device and write NAME.crt and
NAME.key (mode 0600) into --out. ROLE is server, client, gateway, keyserver,
monitor or admin. A server needs --enclave and --server-id; monitors and
admins belong to no enclave. The identity is carried as the URI SAN
spiffe://ORG/enclave/I/ROLE/NAME (spiffe://ORG/ROLE/NAME without an enclave).
--host adds DNS names or IP addresses, for a key server's TLS address.
--ip ADDR/PREFIX records the device's overlay address: an agent accepts
inner packets from the device's SAs only with this source address.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, f := range []string{"ca", "name", "role", "out"} {
				if !cmd.Flags().Changed(f) {
					return usagef("--%s is required", f)
				}
			}
			id, err := identityFromFlags(name, role, enclave, serverID, overlay)
			if err != nil {
				return err
			}
			a, err := ca.Load(caDir)
			if err != nil {
				return fileError(fmt.Errorf("--ca %s: %w", caDir, err))
			}
			var hostList []string
			if hosts != "" {
				hostList = strings.Split(hosts, ",")
			}
			is, err := a.Issue(id, hostList, days, now())
			if err != nil {
				return usageError(err)
			}
			if err := is.WriteFiles(out, name); err != nil {
				return failed(err)
			}
			got, _ := ca.IdentityOf(is.Cert)
			fmt.Fprintf(streams.Out, "issued %s (%s), expires %s\n", got, ca.Fingerprint(is.Cert), is.Cert.NotAfter.UTC().Format(time.RFC3339))
			return nil
		},
	}
	identityFlags(cmd.Flags(), &caDir, &name, &role, &enclave, &serverID, &days, &out, &hosts, &overlay, "directory for NAME.crt and NAME.key")
	return cmd
}

// identityFlags registers the flags cert issue and cert sign share.
func identityFlags(fl *pflag.FlagSet, caDir, name, role *string, enclave *enclaveFlag, serverID *serverIDFlag, days *int, out, hosts, overlay *string, outHelp string) {
	fl.StringVar(caDir, "ca", "", "the CA directory (ca.crt, ca.key)")
	fl.StringVar(name, "name", "", "the device name")
	fl.StringVar(role, "role", "", "server, client, gateway, keyserver, monitor or admin")
	fl.Var(enclave, "enclave", "the device's enclave id (3), or sub-enclave's dotted (3.2, with --layout)")
	enclave.layout = new(layoutFlag)
	fl.Var(enclave.layout, "layout", "the org's enclave layout (enclave keyserver --enclave-layout): in such an org give it with every --enclave, since 3 means 3.0 there and, without it, the 16-bit id 3")
	fl.Var(serverID, "server-id", "the server id (servers only)")
	fl.IntVar(days, "days", ca.DefaultDays, "validity in days")
	fl.StringVar(out, "out", "", outHelp)
	fl.StringVar(hosts, "host", "", "DNS names or IP addresses for TLS, comma-separated (key servers only)")
	fl.StringVar(overlay, "ip", "", "the device's overlay address and network, e.g. 100.64.1.10/16 (agents accept only this source from it)")
}

func newCertRenewCmd(streams IO) *cobra.Command {
	var caPath, certPath, keyPath, addr, serverName string
	var days int
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "renew (--keyserver ADDR --ca CA.crt --cert FILE --key FILE | --ca DIR --cert FILE [--days N])",
		Short: "Get a new certificate and key for the same identity, in place of the old ones",
		Example: `  enclave cert renew --keyserver 192.0.2.10:7443 --ca /etc/enclave/ca.crt --cert /etc/enclave/web2.crt --key /etc/enclave/web2.key
  enclave cert renew --ca ca --cert certs/web1.crt      # with the CA's key, on the CA's machine
  systemctl reload enclave-agent@web2                   # or kill -HUP PID: the process using the pair takes it`,
		Long: `Renew a certificate before it expires: a new Ed25519 key and a
certificate for the identity of --cert (name, role, enclave, server id,
overlay address, host names), written in place of the old pair (the
previous files are kept as .old). A running agent, gateway or key server
takes the new pair on SIGHUP, without dropping its SAs; agents and
gateways with --keyserver renew themselves (--renew-before).

With --keyserver (a joined host; servers, clients, gateways, monitors):
the key is made here and never leaves the host; the key service, called
with the current certificate, issues the new one from its issuing CA. --ca
is the CA bundle file.

With --ca DIR (the CA's directory, its key): on the CA's machine. It may
be another CA of the same org than the one that signed --cert: that is how
devices move to a new CA (docs/OPERATIONS.md, CA rollover). A device
registered with a pinned fingerprint must be registered with the new one
(renewing with the key service moves the pin itself).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caPath == "" || certPath == "" {
				return usagef("--ca and --cert are required")
			}
			if addr != "" {
				if keyPath == "" {
					return usagef("--key is required with --keyserver (the current key, for the call)")
				}
				return renewWithKeyService(cmd.Context(), streams, addr, serverName, caPath, certPath, keyPath, timeout)
			}
			a, err := ca.Load(caPath)
			if err != nil {
				return fileError(fmt.Errorf("--ca %s: %w", caPath, err))
			}
			old, err := ca.LoadCert(certPath)
			if err != nil {
				return fileError(fmt.Errorf("--cert: %w", err))
			}
			is, err := a.Renew(old, days, now())
			if err != nil {
				return usageError(err)
			}
			dir, name := filepath.Dir(certPath), strings.TrimSuffix(filepath.Base(certPath), ".crt")
			if err := is.ReplaceFiles(dir, name); err != nil {
				return failed(err)
			}
			got, _ := ca.IdentityOf(is.Cert)
			fmt.Fprintf(streams.Out, "renewed %s (%s), expires %s (was %s); the old pair is %s.old and %s.old%s\n",
				got, ca.Fingerprint(is.Cert), is.Cert.NotAfter.UTC().Format(time.RFC3339), old.NotAfter.UTC().Format(time.RFC3339),
				filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"), reloadHint(got.Role))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&caPath, "ca", "", "with --keyserver: the CA bundle file; else the CA directory (ca.crt, ca.key) to sign with")
	fl.StringVar(&certPath, "cert", "", "the certificate to renew (NAME.crt; without --key, NAME.key beside it is replaced too)")
	fl.StringVar(&keyPath, "key", "", "its private key (with --keyserver)")
	fl.StringVar(&addr, "keyserver", "", "renew with the key service at HOST:PORT (its issuing CA): no CA key needed")
	fl.StringVar(&serverName, "server-name", "", "the name in the key server's certificate (default: the host of --keyserver)")
	fl.IntVar(&days, "days", ca.DefaultDays, "validity in days (with --ca DIR; the key service sets its own)")
	fl.DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the key service")
	return cmd
}

// renewWithKeyService renews the pair at certPath and keyPath with the
// key service and writes the new one in its place.
func renewWithKeyService(ctx context.Context, streams IO, addr, serverName, caPath, certPath, keyPath string, timeout time.Duration) error {
	creds, err := keyserver.LoadCredentials(caPath, certPath, keyPath)
	if err != nil {
		return fileError(err)
	}
	id, err := creds.Identity(now())
	if err != nil {
		return failed(fmt.Errorf("--cert: %w (an expired certificate cannot renew itself: join again with a new token)", err))
	}
	if serverName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return usagef("--keyserver %q: want HOST:PORT", echo.Cut(addr))
		}
		serverName = host
	}
	conn, err := keyserver.Dial(addr, serverName, creds)
	if err != nil {
		return usagef("--keyserver: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r, err := keyclient.Renew(ctx, api.NewEnrollClient(conn), creds.Roots, id, now())
	if err != nil {
		return rpcError(err)
	}
	if err := ca.ReplacePair(certPath, keyPath, r.CertPEM, r.KeyPEM); err != nil {
		return failed(err)
	}
	fmt.Fprintf(streams.Out, "renewed %s (%s), expires %s (was %s); the old pair is %s.old and %s.old%s\n",
		r.ID, ca.Fingerprint(r.Cert), r.Cert.NotAfter.UTC().Format(time.RFC3339), creds.Cert.Leaf.NotAfter.UTC().Format(time.RFC3339), certPath, keyPath, reloadHint(r.ID.Role))
	return nil
}

// identityFromFlags makes the identity of cert issue and cert sign.
func identityFromFlags(name, role string, enclave enclaveFlag, serverID serverIDFlag, overlay string) (ca.Identity, error) {
	id := ca.Identity{Name: name}
	var err error
	if id.Role, err = ca.ParseRole(role); err != nil {
		return id, usageError(err)
	}
	if id.Enclave, err = enclave.local(); err != nil {
		return id, usageError(err)
	}
	id.ServerID, id.HasServerID = serverID.id, serverID.set
	if overlay != "" {
		p, err := netip.ParsePrefix(overlay)
		if err != nil {
			return id, usagef("--ip %q: want the device's overlay address with its network's prefix length, such as 100.64.1.10/16", echo.Cut(overlay))
		}
		id.Overlay = p
	}
	return id, nil
}

func newCertRequestCmd(streams IO) *cobra.Command {
	var name, out string
	cmd := &cobra.Command{
		Use:   "request --name NAME --out DIR",
		Short: "Make this host's key and a signing request for it (NAME.key, NAME.csr), for a CA kept offline",
		Long: `Make an Ed25519 key on this host (NAME.key, mode 0600) and a signing request
for it (NAME.csr) in --out. Take the request (not the key) to the CA's
machine: enclave cert sign issues the certificate for it, with the identity
the CA's operator gives. The key never leaves the host.`,
		Example: `  enclave cert request --name web2 --out certs
  # on the CA's machine:
  enclave cert sign --ca ca --csr web2.csr --name web2 --role server --enclave 3 --server-id 302 --ip 100.64.3.3/16 --out certs`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" || out == "" {
				return usagef("--name and --out are required")
			}
			keyPEM, csrPEM, err := ca.NewRequest()
			if err != nil {
				return failed(err)
			}
			if err := ca.WriteNew(out, name+".key", keyPEM, 0o600); err != nil {
				return failed(err)
			}
			if err := ca.WriteNew(out, name+".csr", csrPEM, 0o644); err != nil {
				return failed(err)
			}
			fmt.Fprintf(streams.Out, "made %s and %s: take %s to the CA (enclave cert sign)\n",
				filepath.Join(out, name+".key"), filepath.Join(out, name+".csr"), filepath.Join(out, name+".csr"))
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the device name")
	cmd.Flags().StringVar(&out, "out", "", "directory for NAME.key and NAME.csr")
	return cmd
}

func newCertSignCmd(streams IO) *cobra.Command {
	var caDir, csrPath, name, role, out, hosts, overlay string
	var enclave enclaveFlag
	var serverID serverIDFlag
	var days int
	cmd := &cobra.Command{
		Use:   "sign --ca DIR --csr FILE --name NAME --role ROLE [--enclave I] [--server-id K] [--ip ADDR/PREFIX] --out DIR",
		Short: "Issue a certificate for a signing request (enclave cert request), with the identity given here",
		Long: `Issue a certificate (NAME.crt in --out) for the key of a signing request
made on the device (enclave cert request). The request proves the device
holds the key; the identity (name, role, enclave, server id, overlay
address) is the CA operator's to give, as with cert issue.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, f := range []string{"ca", "csr", "name", "role", "out"} {
				if !cmd.Flags().Changed(f) {
					return usagef("--%s is required", f)
				}
			}
			id, err := identityFromFlags(name, role, enclave, serverID, overlay)
			if err != nil {
				return err
			}
			a, err := ca.Load(caDir)
			if err != nil {
				return fileError(fmt.Errorf("--ca %s: %w", caDir, err))
			}
			pub, err := ca.LoadRequest(csrPath)
			if err != nil {
				return fileError(fmt.Errorf("--csr: %w", err))
			}
			var hostList []string
			if hosts != "" {
				hostList = strings.Split(hosts, ",")
			}
			is, err := a.IssueFor(id, hostList, pub, days, now())
			if err != nil {
				return usageError(err)
			}
			if err := ca.WriteNew(out, name+".crt", is.CertPEM, 0o644); err != nil {
				return failed(err)
			}
			got, _ := ca.IdentityOf(is.Cert)
			fmt.Fprintf(streams.Out, "issued %s (%s), expires %s, for the request's key\n", got, ca.Fingerprint(is.Cert), is.Cert.NotAfter.UTC().Format(time.RFC3339))
			return nil
		},
	}
	identityFlags(cmd.Flags(), &caDir, &name, &role, &enclave, &serverID, &days, &out, &hosts, &overlay, "directory for NAME.crt")
	cmd.Flags().StringVar(&csrPath, "csr", "", "the signing request (NAME.csr)")
	return cmd
}

// certView is what cert show prints.
type certView struct {
	Identity    string   `json:"identity"`
	Org         string   `json:"org"`
	Name        string   `json:"name"`
	Role        string   `json:"role"`
	Enclave     int      `json:"enclave,omitempty"`
	ServerID    *int64   `json:"server_id,omitempty"`
	NotBefore   string   `json:"not_before"`
	NotAfter    string   `json:"not_after"`
	Expired     bool     `json:"expired"`
	NotYetValid bool     `json:"not_yet_valid"`
	Issuer      string   `json:"issuer"`
	Fingerprint string   `json:"fingerprint"`
	Hosts       []string `json:"hosts,omitempty"`
	Overlay     string   `json:"overlay,omitempty"`
}

func newCertShowCmd(streams IO) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "show FILE",
		Short: "Print a certificate's identity, role, enclave, server id and expiry",
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("give exactly one certificate FILE")
			}
			cert, err := ca.LoadCert(args[0])
			if err != nil {
				return usageError(err)
			}
			if org, err := ca.OrgOf(cert); err == nil {
				// The org CA's own certificate: its trust domain and life.
				v := certView{Identity: "spiffe://" + org, Org: org, Role: "ca",
					NotBefore: cert.NotBefore.UTC().Format(time.RFC3339), NotAfter: cert.NotAfter.UTC().Format(time.RFC3339),
					Expired: now().After(cert.NotAfter), NotYetValid: now().Before(cert.NotBefore),
					Issuer: cert.Issuer.CommonName, Fingerprint: ca.Fingerprint(cert)}
				return showCert(streams, v, asJSON)
			}
			id, err := ca.IdentityOf(cert)
			if err != nil {
				return usageError(err)
			}
			v := certView{
				Identity: id.String(), Org: id.Org, Name: id.Name, Role: string(id.Role), Enclave: int(id.Enclave),
				NotBefore: cert.NotBefore.UTC().Format(time.RFC3339), NotAfter: cert.NotAfter.UTC().Format(time.RFC3339),
				Expired: now().After(cert.NotAfter), NotYetValid: now().Before(cert.NotBefore),
				Issuer: cert.Issuer.CommonName, Fingerprint: ca.Fingerprint(cert),
			}
			if id.HasServerID {
				k := int64(id.ServerID)
				v.ServerID = &k
			}
			if id.Overlay.IsValid() {
				v.Overlay = id.Overlay.String()
			}
			v.Hosts = append(v.Hosts, cert.DNSNames...)
			for _, ip := range cert.IPAddresses {
				v.Hosts = append(v.Hosts, ip.String())
			}
			return showCert(streams, v, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// showCert prints a certificate's view, as text or JSON.
func showCert(streams IO, v certView, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(streams.Out).Encode(v)
	}
	w := streams.Out
	fmt.Fprintf(w, "identity:    %s\n", v.Identity)
	if v.Role == "ca" {
		fmt.Fprintf(w, "org:         %s (the org CA: it signs every device certificate)\n", v.Org)
	} else {
		fmt.Fprintf(w, "name:        %s\n", v.Name)
	}
	fmt.Fprintf(w, "role:        %s\n", v.Role)
	switch {
	case v.Role == "ca":
	case v.Enclave != 0:
		fmt.Fprintf(w, "enclave:     %d\n", v.Enclave)
	default:
		fmt.Fprintf(w, "enclave:     (none)\n")
	}
	if v.ServerID != nil {
		fmt.Fprintf(w, "server id:   %d\n", *v.ServerID)
	}
	if v.Overlay != "" {
		fmt.Fprintf(w, "overlay:     %s\n", v.Overlay)
	}
	status := "valid"
	switch {
	case v.Expired:
		status = "EXPIRED"
	case v.NotYetValid:
		status = "NOT YET VALID: valid from " + v.NotBefore
	}
	fmt.Fprintf(w, "expires:     %s (%s)\n", v.NotAfter, status)
	fmt.Fprintf(w, "issuer:      %s\n", v.Issuer)
	fmt.Fprintf(w, "fingerprint: %s\n", v.Fingerprint)
	if len(v.Hosts) > 0 {
		fmt.Fprintf(w, "hosts:       %s\n", strings.Join(v.Hosts, ", "))
	}
	return nil
}

// reloadHint says who must take a renewed pair: the process that runs
// with it (an admin's is read at each command).
func reloadHint(role ca.Role) string {
	if role == ca.RoleAdmin {
		return "; enclave admin reads it at its next command"
	}
	return "; send the process that uses it SIGHUP (under systemd: systemctl restart, as its key is a copy made at start)"
}
