package nfqueue

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/batch"
	"github.com/enclavekeys/enclave/internal/netnstest"
)

// iptables is the iptables that drives xt_NFQUEUE: the legacy one where
// both exist (an nf_tables kernel without nft_queue refuses the other's
// translation).
func iptables(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netfilter queue tests need root (CI runs as root)")
	}
	for _, name := range []string{"iptables-legacy", "iptables"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("iptables is not installed (.ci/run installs it)")
	return ""
}

// inNetns makes a network namespace for the test (removed at its end)
// with the iptables rules given, and runs f on a thread inside it:
// sockets f opens live there.
func inNetns(t *testing.T, ipt string, rules [][]string, f func()) string {
	t.Helper()
	name := netnstest.New(t, "encnfq")
	for _, r := range rules {
		if out, err := exec.Command("ip", append([]string{"netns", "exec", name, ipt, "-w"}, r...)...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v: %s", ipt, r, err, out)
		}
	}
	netnstest.Do(t, name, func() error { f(); return nil })
	return name
}

// TestQueue: datagrams on loopback pass through a queue; each gets the
// verdict the test gives it (accept in batches, drop, accept with a new
// payload) and the receiver sees exactly the accepted ones, in order,
// with the replaced payloads.
func TestQueue(t *testing.T) {
	ipt := iptables(t)
	const port, num, total = 45123, 7, 200
	var q *Queue
	var rx, tx *net.UDPConn
	var err, twice error
	inNetns(t, ipt, [][]string{{"-A", "OUTPUT", "-p", "udp", "--dport", fmt.Sprint(port), "-j", "NFQUEUE", "--queue-num", fmt.Sprint(num)}}, func() {
		if q, err = Open(Config{Num: num, Batch: 16}); err != nil {
			return
		}
		var q2 *Queue
		if q2, twice = Open(Config{Num: num}); twice == nil {
			q2.Close()
		}
		if rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}); err != nil {
			return
		}
		tx, err = net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	defer rx.Close()
	defer tx.Close()
	if twice == nil {
		t.Error("a queue bound twice")
	}

	var want []string
	for i := 0; i < total; i++ {
		switch i % 10 {
		case 3: // dropped
		case 5:
			want = append(want, fmt.Sprintf("REPLACED%03d", i))
		default:
			want = append(want, fmt.Sprintf("datagram%03d", i))
		}
	}
	go func() {
		for i := 0; i < total; i++ {
			tx.Write(fmt.Appendf(nil, "datagram%03d", i))
		}
	}()
	pkts := make([]Packet, 16)
	seen, ids := 0, map[uint32]bool{}
	for seen < total {
		n, err := q.Read(pkts)
		if err != nil {
			t.Fatal(err)
		}
		var run uint32 // the last packet of a run of plain accepts
		for _, p := range pkts[:n] {
			if ids[p.ID] {
				t.Fatalf("packet id %d twice", p.ID)
			}
			ids[p.ID] = true
			if p.Protocol != 0x0800 || len(p.Payload) < 28 || p.Length != len(p.Payload) {
				t.Fatalf("packet %+v", p)
			}
			body := p.Payload[28:]
			var i int
			if _, err := fmt.Sscanf(string(body), "datagram%03d", &i); err != nil {
				t.Fatalf("payload %q", body)
			}
			switch i % 10 {
			case 3, 5:
				if run != 0 {
					q.VerdictUpTo(run, Accept)
					run = 0
				}
				if i%10 == 3 {
					q.Verdict(p.ID, Drop, nil)
					break
				}
				np := bytes.Clone(p.Payload)
				copy(np[28:], "REPLACED")
				binary.BigEndian.PutUint16(np[26:], 0) // no UDP checksum (IPv4)
				q.Verdict(p.ID, Accept, np)
			default:
				run = p.ID
			}
			seen++
		}
		if run != 0 {
			q.VerdictUpTo(run, Accept)
		}
		if err := q.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 100)
	for k, w := range want {
		rx.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := rx.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d of %d: %v", k, len(want), err)
		}
		if string(buf[:n]) != w {
			t.Fatalf("datagram %d is %q, want %q", k, buf[:n], w)
		}
	}
	rx.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := rx.Read(buf); err == nil {
		t.Fatalf("one more datagram: %q", buf[:n])
	}
	if q.Malformed() != 0 {
		t.Errorf("%d malformed messages", q.Malformed())
	}
}

// TestBypass: with no process on the queue, the kernel drops the rule's
// packets, or with --queue-bypass passes them.
func TestBypass(t *testing.T) {
	ipt := iptables(t)
	for _, bypass := range []bool{false, true} {
		t.Run(fmt.Sprintf("bypass=%v", bypass), func(t *testing.T) {
			rule := []string{"-A", "OUTPUT", "-p", "udp", "--dport", "45124", "-j", "NFQUEUE", "--queue-num", "9"}
			if bypass {
				rule = append(rule, "--queue-bypass")
			}
			var rx, tx *net.UDPConn
			var err error
			inNetns(t, ipt, [][]string{rule}, func() {
				if rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 45124}); err != nil {
					return
				}
				tx, err = net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
			})
			if err != nil {
				t.Fatal(err)
			}
			defer rx.Close()
			defer tx.Close()
			tx.Write([]byte("hello"))
			rx.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			_, err = rx.Read(make([]byte, 10))
			if got := err == nil; got != bypass {
				t.Fatalf("datagram arrived: %v, want %v", got, bypass)
			}
		})
	}
}

// TestQueueGSO: a run of datagrams sent with UDP segmentation offload
// comes up whole on a queue opened with GSO (one packet, marked, its
// UDP payload the segments back to back), and its one verdict decides
// every datagram of it: an accepted run arrives as its datagrams, a
// dropped one not at all. Without GSO the kernel queues the datagrams one
// by one.
func TestQueueGSO(t *testing.T) {
	ipt := iptables(t)
	const port, num, seg, segs = 45125, 11, 100, 5
	for _, c := range []struct{ open, set, gso bool }{{true, true, true}, {false, false, false}, {true, false, false}} {
		gso := c.gso
		t.Run(fmt.Sprintf("open-gso=%v,set-gso=%v", c.open, c.set), func(t *testing.T) {
			var q *Queue
			var rx, tx *net.UDPConn
			var err error
			inNetns(t, ipt, [][]string{{"-A", "OUTPUT", "-p", "udp", "--dport", fmt.Sprint(port), "-j", "NFQUEUE", "--queue-num", fmt.Sprint(num)}}, func() {
				if q, err = Open(Config{Num: num, GSO: c.open}); err != nil {
					return
				}
				if c.set != c.open {
					if err = q.SetGSO(c.set); err != nil {
						return
					}
				}
				if rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}); err != nil {
					return
				}
				tx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			})
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			defer rx.Close()
			defer tx.Close()
			gsoOut, err := batch.New(tx, segs)
			if err != nil {
				t.Fatal(err)
			}
			if gso, _ := gsoOut.Offloads(); !gso {
				t.Skip("the kernel has no UDP segmentation offload")
			}
			to := []netip.AddrPort{rx.LocalAddr().(*net.UDPAddr).AddrPort()}
			run := func(tag byte) {
				// One run of segs datagrams (batch.Conn sends datagrams of
				// one size to one place as one offloaded message).
				b, dsts := make([][]byte, segs), make([]netip.AddrPort, segs)
				for i := range b {
					b[i], dsts[i] = bytes.Repeat([]byte{tag}, seg), to[0]
				}
				if n, err := gsoOut.Write(b, dsts); n != segs || err != nil {
					t.Fatalf("sending a run: %d of %d, %v", n, segs, err)
				}
			}
			run('A')
			run('D')
			pkts := make([]Packet, 16)
			var got []Packet
			for len(got) < 2 && (gso || len(got) < 2*segs) {
				n, err := q.Read(pkts)
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range pkts[:n] {
					got = append(got, p)
					v := Accept
					if p.Payload[28] == 'D' {
						v = Drop
					}
					if p.GSO != gso {
						t.Errorf("packet GSO %v, want %v", p.GSO, gso)
					}
					want := 28 + seg
					if gso {
						want = 28 + seg*segs
					}
					if len(p.Payload) != want {
						t.Errorf("packet of %d bytes, want %d", len(p.Payload), want)
					}
					q.Verdict(p.ID, v, nil)
				}
				if err := q.Flush(); err != nil {
					t.Fatal(err)
				}
				if !gso && len(got) == 2*segs {
					break
				}
			}
			buf := make([]byte, 2000)
			for i := 0; i < segs; i++ {
				rx.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := rx.Read(buf)
				if err != nil {
					t.Fatalf("datagram %d of the accepted run: %v", i, err)
				}
				if n != seg || buf[0] != 'A' {
					t.Fatalf("datagram %d: %d bytes of %q", i, n, buf[0])
				}
			}
			rx.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if n, err := rx.Read(buf); err == nil {
				t.Fatalf("a datagram of the dropped run arrived: %d bytes of %q", n, buf[0])
			}
		})
	}
}
