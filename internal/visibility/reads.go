package visibility

import (
	"cmp"
	"slices"
	"strings"
	"time"
)

// "Did read" beside "can read": a reader that can read a pair but was
// never seen reading it is a candidate to take the right from. What a
// device read comes from where it is reported: a gateway's flow log (its
// flows, each with its pair, bytes and last packet) and the status of
// running agents (their SAs' bytes received and last packet) and gateways
// (their live flows by pair).

// Read is what one device was seen reading of one pair.
type Read struct {
	Device string    `json:"device"`
	Pair   string    `json:"pair"`
	Bytes  uint64    `json:"bytes"`
	Last   time.Time `json:"last"`
	// Source is where the read was reported (a flow log file, a status
	// socket), shown with it: a read is only as good as its source.
	Source string `json:"source,omitempty"`
}

// AddReads records what the devices in reported were seen reading (reads,
// in any order, several per device and pair) in the window before at:
// reads whose last packet is older are left out, the others summed by
// device and pair.
func (m *Map) AddReads(at time.Time, window time.Duration, reported []string, reads []Read) {
	m.At, m.Window = at.UTC(), window
	for _, d := range reported {
		if !slices.Contains(m.Reported, d) {
			m.Reported = append(m.Reported, d)
		}
	}
	slices.Sort(m.Reported)
	index := map[[2]string]int{}
	for i, r := range m.Reads {
		index[[2]string{r.Device, r.Pair}] = i
	}
	for _, r := range reads {
		if r.Last.Before(at.Add(-window)) || r.Bytes == 0 {
			continue
		}
		if !m.canRead(r.Device, r.Pair) {
			// Reported reading a pair it has no right to: no read of the
			// map's (a bad source, or a key that leaked), shown apart.
			m.Unexplained = append(m.Unexplained, r)
			continue
		}
		k := [2]string{r.Device, r.Pair}
		i, ok := index[k]
		if !ok {
			r.Last = r.Last.UTC()
			index[k] = len(m.Reads)
			m.Reads = append(m.Reads, r)
			continue
		}
		m.Reads[i].Bytes += r.Bytes
		if r.Last.After(m.Reads[i].Last) {
			m.Reads[i].Last = r.Last.UTC()
		}
		if !strings.Contains(m.Reads[i].Source, r.Source) {
			m.Reads[i].Source += ", " + r.Source
		}
	}
	slices.SortFunc(m.Reads, func(a, b Read) int {
		return cmp.Or(strings.Compare(a.Device, b.Device), comparePairKeys(a.Pair, b.Pair))
	})
}

// canRead reports whether device may read pair: a reader of it by any
// right, or a device of one of its enclaves (a client reads its own SAs,
// which no registry right names).
func (m *Map) canRead(device, pair string) bool {
	for _, p := range m.Pairs {
		if p.Key() != pair {
			continue
		}
		if slices.ContainsFunc(p.Readers, func(r Reader) bool { return r.Device == device }) {
			return true
		}
		return slices.ContainsFunc(m.Devices, func(d Device) bool {
			return d.Name == device && !d.Revoked && d.Enclave != 0 && (d.Enclave == p.A || d.Enclave == p.B)
		})
	}
	return false
}

// grantRights are the rights an admin gives and takes by a grant: the
// ones a reader that never reads should be asked to give back.
var grantRights = []string{RightMonitor, RightGrant, RightMayExchange}

// Unread lists the readers by grant of each pair that are reported but
// read none of it in the window: candidates to take the right from.
// Readers that are not reported are not judged (nothing says they did
// not read).
func (m *Map) Unread() []Access {
	var out []Access
	for _, p := range m.Pairs {
		for _, r := range p.Readers {
			if !slices.Contains(grantRights, r.Right) || !slices.Contains(m.Reported, r.Device) {
				continue
			}
			if !slices.ContainsFunc(m.Reads, func(x Read) bool { return x.Device == r.Device && x.Pair == p.Key() }) {
				out = append(out, Access{Pair: p.Key(), Device: r.Device, Role: r.Role, Right: r.Right})
			}
		}
	}
	slices.SortFunc(out, func(a, b Access) int {
		return cmp.Or(strings.Compare(a.Device, b.Device), comparePairKeys(a.Pair, b.Pair))
	})
	return out
}
