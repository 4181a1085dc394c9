package cli

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/keyclient"
)

// Self-renewal (issue 32): an agent or gateway with --keyserver renews its
// certificate with the key service before it expires (by default when a
// third of its life is left), with a key it makes, and puts the new pair
// in force as SIGHUP does: no restart, SAs carry on. A renewal that fails
// is tried again, a minute later and then less and less often (at most
// hourly), and logged each time with why.

// deviceFiles are the files a device runs with. A renewal moves the pair
// (to --renew-dir, where the process may write); SIGHUP reads whatever
// the pair is then.
type deviceFiles struct {
	mu             sync.Mutex
	ca, cert, key  string
	given          [2]string // --cert and --key as given
	renewedInto    string    // --renew-dir, "" for in place
	renewedAtStart bool      // the pair in --renew-dir was taken at start
}

func (f *deviceFiles) paths() (caPath, certPath, keyPath string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ca, f.cert, f.key
}

func (f *deviceFiles) setPair(certPath, keyPath string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cert, f.key = certPath, keyPath
}

// newDeviceFiles starts from --ca, --cert and --key, or from the pair an
// earlier renewal left in dir (choose).
func newDeviceFiles(caPath, certPath, keyPath, dir string) *deviceFiles {
	f := &deviceFiles{ca: caPath, cert: certPath, key: keyPath, given: [2]string{certPath, keyPath}, renewedInto: dir}
	f.renewedAtStart = f.choose()
	return f
}

// choose puts in force --cert and --key, or the pair a renewal left in
// --renew-dir when that one is valid for the same device under the CA
// bundle and was issued no earlier than --cert (or --cert no longer
// verifies: expired, or of a CA rolled away). It runs at start and at
// each SIGHUP, so that a pair renewed by hand in place of --cert is taken
// over an older renewed one. It reports whether the renewed pair won.
func (f *deviceFiles) choose() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cert, f.key = f.given[0], f.given[1]
	if f.renewedInto == "" {
		return false
	}
	roots, err := ca.LoadRoots(f.ca)
	if err != nil {
		return false
	}
	given, err := ca.LoadChain(f.given[0])
	if err != nil {
		return false
	}
	// The name from --cert even when it no longer verifies: that is when
	// the renewed pair is needed most.
	id, err := ca.IdentityOf(given[0])
	if err != nil {
		return false
	}
	_, givenErr := roots.VerifyChain(given, time.Now())
	c, k := filepath.Join(f.renewedInto, id.Name+".crt"), filepath.Join(f.renewedInto, id.Name+".key")
	renewed, err := ca.LoadChain(c)
	if err != nil {
		return false
	}
	// Newer is issued later: a renewal may be shorter-lived than a
	// certificate from the CA.
	rid, err := roots.VerifyChain(renewed, time.Now())
	if err != nil || rid.Name != id.Name || rid.Role != id.Role || (givenErr == nil && (rid != id || renewed[0].NotBefore.Before(given[0].NotBefore))) {
		return false
	}
	// The key must be the certificate's: a crash between the two renames
	// of a renewal can leave them apart, and --cert is better than a pair
	// that cannot load.
	key, err := ca.LoadKey(k)
	if err != nil {
		return false
	}
	if pub, ok := renewed[0].PublicKey.(ed25519.PublicKey); !ok || !pub.Equal(key.Public()) {
		return false
	}
	f.cert, f.key = c, k
	return true
}

// renewBefore is --renew-before: "auto" (a third of the certificate's
// life), "off", or a duration.
type renewBefore struct {
	off bool
	d   time.Duration // 0: auto
}

func parseRenewBefore(s string) (renewBefore, error) {
	switch s {
	case "", "auto":
		return renewBefore{}, nil
	case "off":
		return renewBefore{off: true}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return renewBefore{}, usagef("--renew-before %q: want auto (a third of the certificate's life), off, or a duration such as 720h", s)
	}
	return renewBefore{d: d}, nil
}

// due is when a certificate valid from nb to na is renewed.
func (r renewBefore) due(nb, na time.Time) time.Time {
	before := r.d
	if before == 0 {
		before = na.Sub(nb) / 3
	}
	return na.Add(-before)
}

// RenewalStatus is what enclave status shows of self-renewal.
type RenewalStatus struct {
	// State: off (and why), waiting, retrying.
	State     string    `json:"state"`
	Next      time.Time `json:"next,omitzero"`
	Last      time.Time `json:"last,omitzero"` // the last renewal that succeeded
	LastError string    `json:"last_error,omitempty"`
	Files     string    `json:"files,omitempty"` // the certificate in force
}

// renewal keeps a device's certificate renewed.
type renewal struct {
	log    *slog.Logger
	files  *deviceFiles
	before renewBefore
	// obtain gets a new certificate and key for id (nil: no renewal).
	obtain func(ctx context.Context, roots *ca.Roots, id ca.Identity) (*keyclient.Renewed, error)
	// reload puts the files in force (the SIGHUP reload).
	reload func() error

	mu sync.Mutex
	st RenewalStatus
}

func (r *renewal) status() *RenewalStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.st
	_, st.Files, _ = r.files.paths()
	return &st
}

func (r *renewal) set(f func(*RenewalStatus)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(&r.st)
}

// Backoff of a renewal that failed.
const (
	renewRetryFirst = time.Minute
	renewRetryMax   = time.Hour
)

// newRenewal is the renewal of the device whose files are files, over
// the key service connection conn (nil: none, so no renewal).
func newRenewal(log *slog.Logger, files *deviceFiles, before renewBefore, conn *grpc.ClientConn, reload func() error) *renewal {
	r := &renewal{log: log, files: files, before: before, reload: reload}
	switch {
	case conn == nil:
		r.st.State = "off (no --keyserver)"
	case before.off:
		r.st.State = "off (--renew-before off)"
	default:
		r.st.State = "waiting"
		enroll := api.NewEnrollClient(conn)
		r.obtain = func(ctx context.Context, roots *ca.Roots, id ca.Identity) (*keyclient.Renewed, error) {
			return keyclient.Renew(ctx, enroll, roots, id, time.Now())
		}
	}
	return r
}

// run renews whenever the certificate in force is due, until ctx ends.
func (r *renewal) run(ctx context.Context) {
	if r.obtain == nil {
		return
	}
	backoff := renewRetryFirst
	var lastRenewed time.Time
	warned := false
	for ctx.Err() == nil {
		caPath, certPath, _ := r.files.paths()
		chain, err := ca.LoadChain(certPath)
		if err != nil {
			r.set(func(s *RenewalStatus) { s.State, s.LastError = "waiting", err.Error() })
			sleepCtx(ctx, renewRetryMax)
			continue
		}
		due := r.before.due(chain[0].NotBefore, chain[0].NotAfter)
		if life := chain[0].NotAfter.Sub(chain[0].NotBefore); !due.After(chain[0].NotBefore) {
			// --renew-before is longer than the certificates are: each
			// new one would be due at once. Once per gap, then, and said.
			gap := min(max(life/10, time.Minute), 24*time.Hour)
			if !lastRenewed.IsZero() {
				due = lastRenewed.Add(gap)
			}
			if !warned {
				warned = true
				r.log.Warn("--renew-before is longer than this certificate's life: renewing at most once every "+gap.String(), "life", life.String())
			}
		}
		r.set(func(s *RenewalStatus) {
			if s.State != "retrying" {
				s.State = "waiting"
			}
			s.Next = due
		})
		if wait := time.Until(due); wait > 0 {
			// Looked at again at least hourly: a SIGHUP may have put
			// another certificate in force meanwhile.
			sleepCtx(ctx, min(wait, time.Hour))
			continue
		}
		if err := r.renew(ctx, caPath, certPath); err != nil {
			if ctx.Err() != nil {
				return
			}
			next := time.Now().Add(backoff)
			left := time.Until(chain[0].NotAfter).Round(time.Minute)
			r.set(func(s *RenewalStatus) { s.State, s.Next, s.LastError = "retrying", next, err.Error() })
			what := "it is tried again; meanwhile the certificate in force serves"
			if left <= 0 {
				what = "the certificate has expired, so the key service no longer knows this device by it: join again with a new token (enclave admin token create; enclave join)"
			}
			r.log.Warn("certificate renewal failed", "err", err, "retry_in", backoff.String(), "expires_in", left.String(), "what to do", what)
			sleepCtx(ctx, backoff)
			backoff = min(2*backoff, renewRetryMax)
			continue
		}
		backoff, lastRenewed = renewRetryFirst, time.Now()
	}
}

// renew gets a new pair, writes it and puts it in force.
func (r *renewal) renew(ctx context.Context, caPath, certPath string) error {
	roots, err := ca.LoadRoots(caPath)
	if err != nil {
		return err
	}
	chain, err := ca.LoadChain(certPath)
	if err != nil {
		return err
	}
	id, err := roots.VerifyChain(chain, time.Now())
	if err != nil {
		return fmt.Errorf("the certificate in force: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := r.obtain(cctx, roots, id)
	if err != nil {
		return err
	}
	_, curCert, curKey := r.files.paths()
	newCert, newKey := curCert, curKey
	if dir := r.files.renewedInto; dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		newCert, newKey = filepath.Join(dir, id.Name+".crt"), filepath.Join(dir, id.Name+".key")
	}
	if err := ca.ReplacePair(newCert, newKey, res.CertPEM, res.KeyPEM); err != nil {
		return fmt.Errorf("writing the renewed pair (where it may write: --renew-dir): %w", err)
	}
	r.files.setPair(newCert, newKey)
	if err := r.reload(); err != nil {
		return fmt.Errorf("the renewed pair is written to %s but not in force: %w", newCert, err)
	}
	r.set(func(s *RenewalStatus) { s.State, s.Last, s.LastError = "waiting", time.Now(), "" })
	r.log.Info("certificate renewed", "identity", id.String(), "fingerprint", ca.Fingerprint(res.Cert),
		"expires", res.Cert.NotAfter.UTC().Format(time.RFC3339), "cert", newCert)
	return nil
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// renewalLine is status's line for self-renewal.
func renewalLine(s *RenewalStatus) string {
	if s == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "renewal: %s", s.State)
	if !s.Next.IsZero() {
		fmt.Fprintf(&b, ", next %s (in %s)", s.Next.UTC().Format(time.RFC3339), short(time.Until(s.Next)))
	}
	if !s.Last.IsZero() {
		fmt.Fprintf(&b, ", last renewed %s ago", short(time.Since(s.Last)))
	}
	if s.LastError != "" {
		fmt.Fprintf(&b, ", last error: %s", s.LastError)
	}
	if s.Files != "" {
		fmt.Fprintf(&b, "; certificate in force: %s", s.Files)
	}
	return b.String()
}
