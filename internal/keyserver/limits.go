package keyserver

import (
	"fmt"
	"regexp"
	"unicode/utf8"

	"github.com/enclavekeys/enclave/internal/api"
	"github.com/enclavekeys/enclave/internal/audit"
	"github.com/enclavekeys/enclave/internal/ca"
	"github.com/enclavekeys/enclave/internal/echo"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Bounds on what one request may ask, so that no request can make the
// service write more than a bounded amount (to the audit log above all: a
// line it cannot read back would stop the next start).
const (
	// MaxRequestBytes is the largest request message the server reads. The
	// largest legitimate one, a PairExchange offer (an ML-KEM-768+X25519
	// key and a signature), is under 2 KiB.
	MaxRequestBytes = 64 << 10
	// MaxPairsPerRequest bounds the pair lists of GetPairKeys, AddGrant and
	// RevokeGrant.
	MaxPairsPerRequest = 256
	// maxReason is how much of a free-text reason goes into the audit log.
	maxReason = 1024
)

// fingerprintRE is ca.Fingerprint's form.
var fingerprintRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// invalid is an error for a bad request field: registry.ErrInvalid, which
// admin calls and refusals turn into InvalidArgument.
func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", registry.ErrInvalid, fmt.Sprintf(format, a...))
}

// checkName checks a device name field as `cert issue` checks names.
func checkName(field, name string) error {
	if err := ca.CheckName(name); err != nil {
		return invalid("%s: %v", field, err)
	}
	return nil
}

// checkFingerprint accepts an empty pin or ca.Fingerprint's form.
func checkFingerprint(fp string) error {
	if fp != "" && !fingerprintRE.MatchString(fp) {
		return invalid("fingerprint %q: want sha256: and 64 lowercase hex digits", echo.Cut(fp))
	}
	return nil
}

// checkPairs validates a request's pair list: at most MaxPairsPerRequest
// entries, enclave ids 1 to 65535; duplicates (in either order) are
// dropped, the first occurrence kept.
func checkPairs(ps []*api.Pair) ([]registry.Pair, error) {
	if len(ps) > MaxPairsPerRequest {
		return nil, invalid("%d pairs in one request, at most %d", len(ps), MaxPairsPerRequest)
	}
	out := make([]registry.Pair, 0, len(ps))
	seen := make(map[registry.Pair]bool, len(ps))
	for _, p := range ps {
		a, b := p.GetA(), p.GetB()
		if a == 0 || b == 0 || a > 0xffff || b > 0xffff {
			return nil, invalid("pair %d-%d: enclave ids are 1 to 65535", a, b)
		}
		rp := registry.NewPair(keys.EnclaveID(a), keys.EnclaveID(b))
		if !seen[rp] {
			seen[rp] = true
			out = append(out, rp)
		}
	}
	return out, nil
}

// boundEntry cuts the free-form fields of an audit entry, whatever a
// request put there, so that an entry always fits audit.MaxLine.
func boundEntry(e audit.Entry) audit.Entry {
	if len(e.Reason) > maxReason {
		cut := maxReason
		for cut > 0 && !utf8.RuneStart(e.Reason[cut]) {
			cut--
		}
		e.Reason = e.Reason[:cut] + fmt.Sprintf("…(%d bytes)", len(e.Reason))
	}
	if e.IDs != nil {
		ids := *e.IDs
		ids.Device = echo.Cut(ids.Device)
		if len(ids.Pairs) > MaxPairsPerRequest {
			ids.Pairs = append(ids.Pairs[:MaxPairsPerRequest:MaxPairsPerRequest], fmt.Sprintf("…(%d pairs)", len(ids.Pairs)))
		}
		e.IDs = &ids
	}
	return e
}
