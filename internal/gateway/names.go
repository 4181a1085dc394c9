package gateway

import (
	"sync/atomic"

	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// pairNames writes pairs as operators write them: dotted under the org's
// sub-enclave layout (3.1-7.2), which the gateway learns with its keys;
// plain numbers until then, and in the default layout. Flow logs,
// metrics and status use it, so that each names a pair as enclave admin
// status does.
type pairNames struct{ layout atomic.Pointer[keys.Layout] }

// set records the org's layout.
func (n *pairNames) set(l keys.Layout) { n.layout.Store(&l) }

// of is pair p's name.
func (n *pairNames) of(p registry.Pair) string {
	if n == nil {
		return p.String()
	}
	if l := n.layout.Load(); l != nil {
		return registry.PairName(*l, p)
	}
	return p.String()
}
