package cli

import (
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keys"
)

// enclave org init (issue 32): everything an organisation needs before its
// key server first starts, in one directory, and how to go on.

func newOrgCmd(streams IO) *cobra.Command {
	cmd := &cobra.Command{Use: "org", Short: "Start an organisation: its CA, key server and first admin"}
	var host, org, admin, ksName string
	var port int
	initCmd := &cobra.Command{
		Use:   "init DIR --keyserver-host HOST [--org NAME] [--admin NAME]",
		Short: "Make the CA, the issuing CA, the KEK, the key server's and the first admin's credentials, and the admin context",
		Example: `  enclave org init org --keyserver-host ks.example.org
  export ENCLAVE_CONTEXT=$PWD/org/admin.yaml
  enclave admin status`,
		Long: `Make, in DIR (new or empty): the org CA (ca/) and the CA bundle
devices and admins trust (bundle.crt: a CA rollover rewrites it), an issuing CA the key
server signs joining hosts' certificates with (issuer/NAME.*), the key
server's certificate for HOST (certs/NAME.*), the key-encryption key (kek),
the first admin's certificate (certs/ADMIN.*), and the admin context
(admin.yaml) enclave admin and enclave map read, also written to
~/.config/enclave/admin.yaml when there is none there. It prints the key
server's command and the CA's fingerprint hosts join with. Private keys
are mode 0600; keep ca/ca.key offline once the key server runs.

--org defaults to HOST's domain (ks.example.org: example.org).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := args[0]
			if host == "" {
				return usagef("--keyserver-host is required: the name or address devices reach the key server at")
			}
			if org == "" {
				if net.ParseIP(host) != nil || !strings.Contains(host, ".") {
					return usagef("--org is required when --keyserver-host is an address or a bare name (it is the org's DNS-like name, as example.org)")
				}
				_, org, _ = strings.Cut(host, ".")
			}
			if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
				return usagef("%s is not empty: org init makes a new organisation in a new directory", dir)
			}
			a, err := ca.Init(filepath.Join(dir, "ca"), org, now())
			if err != nil {
				return usageError(err)
			}
			certs := filepath.Join(dir, "certs")
			ks, err := a.Issue(ca.Identity{Name: ksName, Role: ca.RoleKeyserver}, []string{host}, ca.DefaultDays, now())
			if err != nil {
				return usageError(err)
			}
			if err := ks.WriteFiles(certs, ksName); err != nil {
				return failed(err)
			}
			is, err := a.IssueIssuer(ksName, ca.DefaultDays, now())
			if err != nil {
				return failed(err)
			}
			if err := is.WriteFiles(filepath.Join(dir, "issuer"), ksName); err != nil {
				return failed(err)
			}
			adm, err := a.Issue(ca.Identity{Name: admin, Role: ca.RoleAdmin}, nil, ca.DefaultDays, now())
			if err != nil {
				return usageError(err)
			}
			if err := adm.WriteFiles(certs, admin); err != nil {
				return failed(err)
			}
			var k keys.Key
			defer k.Zero()
			if _, err := rand.Read(k[:]); err != nil {
				return failed(err)
			}
			if err := ca.WriteFileAtomic(filepath.Join(dir, "kek"), []byte(k.Hex()+"\n"), 0o600); err != nil {
				return failed(err)
			}
			// The CA bundle the key server and admins trust: a file of its
			// own, which a CA rollover rewrites (ca/ca.crt stays the CA's).
			if err := ca.WriteFileAtomic(filepath.Join(dir, "bundle.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Cert.Raw}), 0o644); err != nil {
				return failed(err)
			}
			addr := net.JoinHostPort(host, fmt.Sprint(port))
			ctx := fmt.Sprintf("# enclave admin and enclave map read this (ENCLAVE_CONTEXT=%s); paths are from this file's directory.\nkeyserver: %s\nca: bundle.crt\ncert: certs/%s.crt\nkey: certs/%s.key\n",
				filepath.Join(dir, "admin.yaml"), addr, admin, admin)
			if err := ca.WriteFileAtomic(filepath.Join(dir, "admin.yaml"), []byte(ctx), 0o600); err != nil {
				return failed(err)
			}
			abs, _ := filepath.Abs(dir)
			w := streams.Out
			// The user's default context too, where there is none yet:
			// enclave admin then needs no flags and no ENCLAVE_CONTEXT.
			defaultCtx := ""
			if os.Getenv("ENCLAVE_CONTEXT") == "" {
				if p := adminContextPath(); p != "" {
					if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
						text := fmt.Sprintf("# written by enclave org init for %s\nkeyserver: %s\nca: %s\ncert: %s\nkey: %s\n", org, addr,
							filepath.Join(abs, "bundle.crt"), filepath.Join(abs, "certs", admin+".crt"), filepath.Join(abs, "certs", admin+".key"))
						if os.MkdirAll(filepath.Dir(p), 0o700) == nil && ca.WriteFileAtomic(p, []byte(text), 0o600) == nil {
							defaultCtx = p
						}
					}
				}
			}
			fmt.Fprintf(w, "organisation %s in %s (CA fingerprint %s)\n", org, dir, ca.Fingerprint(a.Cert))
			fmt.Fprintf(w, "the key server (on %s; keep the store and audit log where it runs):\n", host)
			fmt.Fprintf(w, "  enclave keyserver --ca %[1]s/bundle.crt --cert %[1]s/certs/%[2]s.crt --key %[1]s/certs/%[2]s.key --kek-file %[1]s/kek --issuer-cert %[1]s/issuer/%[2]s.crt --issuer-key %[1]s/issuer/%[2]s.key --store ks.db --audit audit.log --listen 0.0.0.0:%[3]d\n", abs, ksName, port)
			if defaultCtx != "" {
				fmt.Fprintf(w, "the admin context is %s: enclave admin status needs no flags\n", defaultCtx)
			} else {
				fmt.Fprintf(w, "the admin context (then: enclave admin status):\n  export ENCLAVE_CONTEXT=%s\n", filepath.Join(abs, "admin.yaml"))
			}
			fmt.Fprintf(w, "keep %s offline once the key server runs: renewals and joins use the issuing CA\n", filepath.Join(abs, "ca", "ca.key"))
			return nil
		},
	}
	fl := initCmd.Flags()
	fl.StringVar(&host, "keyserver-host", "", "the DNS name or IP address devices reach the key server at")
	fl.StringVar(&org, "org", "", "the organisation's name (default: the domain of --keyserver-host)")
	fl.StringVar(&admin, "admin", "admin", "the first admin's name")
	fl.StringVar(&ksName, "keyserver-name", "ks1", "the key server's name (its certificate and issuing CA)")
	fl.IntVar(&port, "port", 7443, "the key server's port")
	cmd.AddCommand(initCmd)
	return cmd
}
