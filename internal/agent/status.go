package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/enclavekeys/enclave/internal/keyclient"
	"github.com/enclavekeys/enclave/internal/keys"
)

// Status is what a running agent holds, for `enclave status`: who it is,
// its key service connection, the server keys it holds and its SAs by
// peer. It carries no key material.
type Status struct {
	Identity string         `json:"identity"`
	Name     string         `json:"name"`
	Role     string         `json:"role"`
	Enclave  keys.EnclaveID `json:"enclave,omitempty"`
	Overlay  netip.Addr     `json:"overlay"`
	Data     netip.AddrPort `json:"data"`
	Via      string         `json:"via,omitempty"`
	TUN      string         `json:"tun,omitempty"` // empty: the in-process network stack
	Started  time.Time      `json:"started"`
	// CertExpires is when this agent's certificate (or its issuing CA)
	// expires: every SA ends by then.
	CertExpires time.Time             `json:"certificate_expires"`
	KeyService  *keyclient.Connection `json:"key_service,omitempty"`
	// ServerKeys are the SKs a server holds, by peer enclave and
	// generation (their identifiers and validity, never the keys).
	ServerKeys []ServerKeyStatus `json:"server_keys,omitempty"`
	Peers      []PeerStatus      `json:"peers"`
	Handshakes int               `json:"handshakes_in_flight"`
}

// ServerKeyStatus names one SK(i,j,k,g) a server holds.
type ServerKeyStatus struct {
	Pair       string          `json:"pair"` // i-j
	Generation keys.Generation `json:"generation"`
	Current    bool            `json:"current"`
	Until      time.Time       `json:"until"`
}

// PeerStatus is one peer and its SAs (one, two while one replaces
// another).
type PeerStatus struct {
	Name          string     `json:"name"`
	Overlay       netip.Addr `json:"overlay"`
	Endpoint      string     `json:"endpoint"`
	LastHandshake time.Time  `json:"last_handshake"`
	SAs           []SAStatus `json:"sas"`
}

// SAStatus is one SA, both directions.
type SAStatus struct {
	Route      bool            `json:"route"` // the SA the agent sends on
	Server     bool            `json:"server"`
	VC         string          `json:"vc"` // i,j,k
	Generation keys.Generation `json:"generation"`
	SPIIn      string          `json:"spi_in"`
	SPIOut     string          `json:"spi_out"`
	Created    time.Time       `json:"created"`
	Expires    time.Time       `json:"expires"`
	TxPackets  uint64          `json:"tx_packets"`
	TxBytes    uint64          `json:"tx_bytes"`
	RxPackets  uint64          `json:"rx_packets"`
	RxBytes    uint64          `json:"rx_bytes"`
	LastSent   time.Time       `json:"last_sent,omitzero"`
	LastRecv   time.Time       `json:"last_received,omitzero"`
}

// Status reports what the agent holds now.
func (a *Agent) Status() Status {
	st := Status{Identity: a.id.String(), Name: a.id.Name, Role: string(a.id.Role), Enclave: a.id.Enclave,
		Overlay: a.self, Data: a.DataPort(), TUN: a.TUNName(), Started: a.started, Peers: []PeerStatus{}, CertExpires: a.creds.Load().Expires()}
	if a.cfg.Via.IsValid() {
		st.Via = a.cfg.Via.String()
	}
	if a.cfg.KeyService != nil {
		ks := a.ks.Get(a.cfg.KeyServiceAddr)
		st.KeyService = &ks
	}
	ms := func(v int64) time.Time {
		if v == 0 {
			return time.Time{}
		}
		return time.UnixMilli(v).UTC()
	}
	a.mu.RLock()
	for id, k := range a.sks {
		st.ServerKeys = append(st.ServerKeys, ServerKeyStatus{Pair: fmt.Sprintf("%d-%d", a.id.Enclave, id.peer), Generation: id.gen, Current: k.current, Until: k.until})
	}
	st.Handshakes = len(a.dials)
	for overlay, cs := range a.t.byPeer {
		p := PeerStatus{Overlay: overlay}
		for _, c := range cs {
			p.Name = c.peer.Name
			p.Endpoint = c.dataEndpoint().String()
			if c.created.After(p.LastHandshake) {
				p.LastHandshake = c.created
			}
			p.SAs = append(p.SAs, SAStatus{
				Route: a.t.route[overlay] == c, Server: c.server, VC: c.vc.String(), Generation: c.gen,
				SPIIn: c.recvSPI.String(), SPIOut: c.sendSPI.String(), Created: c.created, Expires: c.expires,
				TxPackets: c.txPackets.Load(), TxBytes: c.txBytes.Load(), RxPackets: c.rxPackets.Load(), RxBytes: c.rxBytes.Load(),
				LastSent: ms(c.lastSent.Load()), LastRecv: ms(c.lastSeen.Load()),
			})
		}
		slices.SortFunc(p.SAs, func(x, y SAStatus) int { return y.Created.Compare(x.Created) })
		st.Peers = append(st.Peers, p)
	}
	a.mu.RUnlock()
	slices.SortFunc(st.ServerKeys, func(x, y ServerKeyStatus) int {
		if x.Pair != y.Pair {
			return strings.Compare(x.Pair, y.Pair)
		}
		return int(x.Generation) - int(y.Generation)
	})
	slices.SortFunc(st.Peers, func(x, y PeerStatus) int { return x.Overlay.Compare(y.Overlay) })
	return st
}
