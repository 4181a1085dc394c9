package gateway

import (
	"slices"
	"time"

	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
	"github.com/enclavekeys/enclave/internal/registry"
)

// Status is what a running gateway holds and has done, for `enclave
// status`: its mode, the pairs it reads and how, the pairs it passes
// unread, flows and packets by outcome. It carries no key material.
type Status struct {
	Identity string         `json:"identity"`
	Name     string         `json:"name"`
	Enclave  keys.EnclaveID `json:"enclave,omitempty"`
	Mode     string         `json:"mode"` // inline or relay
	Queues   []uint16       `json:"queues,omitempty"`
	Relay    string         `json:"relay,omitempty"`
	RelayTo  []string       `json:"relay_to,omitempty"` // empty on a relay: open (--open-relay)
	NoDerive bool           `json:"no_derive"`
	FailOpen bool           `json:"fail_open"`
	Started  time.Time      `json:"started"`
	// CertExpires is when the gateway's certificate (or its issuing CA)
	// expires.
	CertExpires time.Time            `json:"certificate_expires"`
	KeyService  keyclient.Connection `json:"key_service"`
	// Granted are the pairs the key service lets the gateway read;
	// PairKeys those it holds pair keys for (it derives their SA keys);
	// Delivered the SA keys direct key exchange gave it, by pair.
	Granted   []string       `json:"granted"`
	PairKeys  []string       `json:"pair_keys"`
	Delivered map[string]int `json:"delivered_sas,omitempty"`
	// Pairs are the packets of each pair by outcome (read, opaque, ...):
	// a pair with only opaque packets is one the gateway passes unread.
	Pairs map[string]map[string]uint64 `json:"pairs,omitempty"`
	Flows int                          `json:"flows_live"`
	// Reads are the live flows' bytes and last packet by pair (the flows
	// that ended are in the flow log): what enclave map shows as read.
	Reads map[string]PairRead `json:"reads,omitempty"`
	// Packets are the datagrams by kind (data, control) and outcome; the
	// drops among them say why.
	Packets map[string]map[string]uint64 `json:"packets"`
	// Runs are the segmentation-offloaded runs taken whole, by outcome
	// (passed, dropped, ...), and "datagrams" the datagrams in them.
	Runs map[string]uint64 `json:"runs,omitempty"`
	// Blind are the granted pairs whose packets the gateway held unread
	// (it could not read them yet): the window open now, and the last.
	Blind map[string]BlindWindow `json:"blind,omitempty"`
	// TellsClients: the gateway tells the clients of SAs it holds to make
	// new ones (an inline gateway needs a raw socket, CAP_NET_RAW).
	TellsClients bool `json:"tells_clients"`
	// RunSizes says how the inline gateway takes runs: whole, cut at the
	// segment size the kernel gives, or datagram by datagram and why.
	RunSizes string `json:"run_sizes,omitempty"`
	// RunsWhole: runs are taken whole (false: datagram by datagram, or a
	// relay, which cuts by its socket's receive coalescing).
	RunsWhole bool `json:"runs_whole"`
	Sessions  int  `json:"server_sessions"`
}

// Status reports what the gateway holds now.
func (g *Gateway) Status() Status {
	st := Status{Identity: g.id.String(), Name: g.id.Name, Enclave: g.id.Enclave, NoDerive: g.cfg.NoDerive, FailOpen: g.cfg.FailOpen,
		Started: g.started, KeyService: g.ks.Get(g.cfg.KeyServiceAddr), Granted: []string{}, PairKeys: []string{}, CertExpires: g.creds.Load().Expires()}
	if g.relay != nil {
		st.Mode, st.Relay = "relay", g.relay.addr().String()
		for _, p := range g.cfg.RelayTo {
			st.RelayTo = append(st.RelayTo, p.String())
		}
	} else {
		st.Mode, st.Queues = "inline", g.cfg.Queues
		st.RunSizes, st.RunsWhole = g.runSizes.describe()
	}
	g.keys.mu.RLock()
	for p := range g.keys.granted {
		st.Granted = append(st.Granted, g.names.of(p))
	}
	for p := range g.keys.held {
		st.PairKeys = append(st.PairKeys, g.names.of(p))
	}
	g.keys.mu.RUnlock()
	slices.Sort(st.Granted)
	slices.Sort(st.PairKeys)
	g.dkx.mu.RLock()
	for k := range g.dkx.m {
		if st.Delivered == nil {
			st.Delivered = map[string]int{}
		}
		st.Delivered[registry.NewPair(k.vc.Enclave, k.vc.Peer).String()]++
	}
	g.dkx.mu.RUnlock()
	st.TellsClients = g.nudge != nil
	if b := g.blind.windows(&g.names); len(b) > 0 {
		st.Blind = b
	}
	st.Flows = g.flows.len()
	st.Reads = g.flows.reads()
	g.servers.mu.Lock()
	for _, ss := range g.servers.byEP {
		if ss.session != nil {
			st.Sessions++
		}
	}
	g.servers.mu.Unlock()
	st.Packets = counts(g.metrics, "enclave_gateway_packets_total", "kind", "outcome")
	st.Pairs = counts(g.metrics, "enclave_gateway_pair_packets_total", "pair", "outcome")
	if runs := counts(g.metrics, "enclave_gateway_runs_total", "", "outcome")[""]; len(runs) > 0 {
		st.Runs = runs
		st.Runs["datagrams"] = counts(g.metrics, "enclave_gateway_run_datagrams_total", "", "")[""][""]
	}
	return st
}

// counts reads a counter family of the gateway's metrics as nested maps
// by two of its labels.
func counts(m *Metrics, name, outer, inner string) map[string]map[string]uint64 {
	out := map[string]map[string]uint64{}
	fams, err := m.registry.Gather()
	if err != nil {
		return out
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, mt := range f.GetMetric() {
			var o, i string
			for _, l := range mt.GetLabel() {
				switch l.GetName() {
				case outer:
					o = l.GetValue()
				case inner:
					i = l.GetValue()
				}
			}
			v := uint64(mt.GetCounter().GetValue())
			if v == 0 {
				continue
			}
			if out[o] == nil {
				out[o] = map[string]uint64{}
			}
			out[o][i] += v
		}
	}
	return out
}
