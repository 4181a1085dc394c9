package gsosize

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf/btf"

	"github.com/enclavekeys/enclave/internal/netnstest"
	"github.com/enclavekeys/enclave/internal/orgtest"
)

// TestSkBuffOffsets: the offsets the program reads and writes are those of
// the running kernel's struct __sk_buff.
func TestSkBuffOffsets(t *testing.T) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Skipf("the kernel gives no BTF: %v", err)
	}
	var st *btf.Struct
	if err := spec.TypeByName("__sk_buff", &st); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"mark": skbMark, "gso_size": skbGSOSize}
	for _, m := range st.Members {
		if off, ok := want[m.Name]; ok {
			if got := int(m.Offset.Bytes()); got != off {
				t.Errorf("__sk_buff.%s at %d, the program uses %d", m.Name, got, off)
			}
			delete(want, m.Name)
		}
	}
	if len(want) > 0 {
		t.Errorf("__sk_buff has no %v", want)
	}
}

func TestMarkLayout(t *testing.T) {
	for _, size := range []int{1, 230, 1400, 65535} {
		if got, ok := Size(Mark(size)); !ok || got != size {
			t.Errorf("Size(Mark(%d)) = %d, %v", size, got, ok)
		}
	}
	for _, mark := range []uint32{0, 1, 0xE5C00000, 0xE5C10100, 0x000100E6} {
		if got, ok := Size(mark); ok {
			t.Errorf("Size(%#x) = %d: not a mark of ours", mark, got)
		}
	}
}

// TestMarksRuns: on a real kernel, between two network namespaces joined
// by veth, the program marks exactly the runs of the data port (IPv4 and
// IPv6, either direction of the port) with their real segment size, and
// nothing else: a datagram sent alone, a run of another port. It follows
// an interface made after it started, and leaves nothing behind when
// closed. The marks are read by iptables rules in the receiving
// namespace, which count packets by mark.
func TestMarksRuns(t *testing.T) {
	ipt := iptablesPath(t)
	tx, rx := netnstest.New(t, "gstx"), netnstest.New(t, "gsrx")
	veth := func(a, b, net4, net6 string) {
		t.Helper()
		for _, c := range [][]string{
			{"ip", "link", "add", a, "netns", tx, "type", "veth", "peer", "name", b, "netns", rx},
			{"ip", "-n", tx, "addr", "add", net4 + ".1/24", "dev", a},
			{"ip", "-n", rx, "addr", "add", net4 + ".2/24", "dev", b},
			{"ip", "-n", tx, "addr", "add", net6 + "::1/64", "dev", a, "nodad"},
			{"ip", "-n", rx, "addr", "add", net6 + "::2/64", "dev", b, "nodad"},
			{"ip", "-n", tx, "link", "set", a, "up"},
			{"ip", "-n", rx, "link", "set", b, "up"},
		} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v: %s", c, err, out)
			}
		}
	}
	veth("gsa", "gsb", "10.77.1", "fd77:1")
	const port = 1000
	for _, c := range [][]string{
		{"-A", "INPUT", "-p", "udp", "-m", "mark", "--mark", fmt.Sprintf("%#x", Mark(230)), "-j", "ACCEPT"},
		{"-A", "INPUT", "-p", "udp", "-j", "ACCEPT"},
	} {
		for _, bin := range []string{ipt, ip6tables(ipt)} {
			if out, err := exec.Command("ip", append([]string{"netns", "exec", rx, bin, "-w"}, c...)...).CombinedOutput(); err != nil {
				t.Fatalf("%s %v: %v: %s", bin, c, err, out)
			}
		}
	}
	var m *Marker
	var startErr error
	netnstest.Do(t, rx, func() error {
		m, startErr = Start(Config{Port: port})
		return nil
	})
	if errors.Is(startErr, ErrUnsupported) {
		t.Skipf("this kernel cannot run the program: %v", startErr)
	}
	if startErr != nil {
		t.Fatal(startErr)
	}
	defer m.Close()
	if got := m.Interfaces(); len(got) != 1 || got[0] != "gsb" {
		t.Fatalf("the program is on %v, want [gsb]", got)
	}

	var v4, v6 *net.UDPConn
	netnstest.Do(t, tx, func() (err error) {
		if v4, err = net.ListenUDP("udp4", &net.UDPAddr{Port: port}); err != nil {
			return err
		}
		v6, err = net.ListenUDP("udp6", &net.UDPAddr{Port: 2000})
		return err
	})
	defer v4.Close()
	defer v6.Close()
	run := bytes.Repeat([]byte{0x5a}, 3*230)
	counts := func() (marked, all int) {
		t.Helper()
		for _, bin := range []string{ipt, ip6tables(ipt)} {
			out, err := exec.Command("ip", "netns", "exec", rx, bin, "-w", "-nvxL", "INPUT").CombinedOutput()
			if err != nil {
				t.Fatalf("%s: %v: %s", bin, err, out)
			}
			lines := regexp.MustCompile(`(?m)^\s*(\d+)\s+\d+\s+ACCEPT`).FindAllStringSubmatch(string(out), -1)
			if len(lines) != 2 {
				t.Fatalf("iptables counters:\n%s", out)
			}
			a, _ := strconv.Atoi(lines[0][1])
			b, _ := strconv.Atoi(lines[1][1])
			marked, all = marked+a, all+a+b
		}
		return marked, all
	}
	send := func(c *net.UDPConn, dst string, size int) {
		t.Helper()
		if err := orgtest.SendSegmented(c, netip.MustParseAddrPort(dst), run[:size*3], size); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	step := func(name string, f func(), wantMarked int) {
		t.Helper()
		m0, a0 := counts()
		f()
		m1, a1 := counts()
		if a1-a0 != 1 {
			t.Fatalf("%s: %d packets came up, want one run", name, a1-a0)
		}
		if m1-m0 != wantMarked {
			t.Errorf("%s: %d marked with its segment size, want %d", name, m1-m0, wantMarked)
		}
	}
	// Neighbour discovery first: a datagram alone, again until one
	// arrives (a run is never sent twice).
	warm := func(c *net.UDPConn, dst string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			_, a0 := counts()
			c.WriteToUDPAddrPort([]byte("hello"), netip.MustParseAddrPort(dst))
			time.Sleep(50 * time.Millisecond)
			if _, a1 := counts(); a1 > a0 {
				return
			}
		}
		t.Fatalf("nothing reaches %s", dst)
	}
	warm(v4, "10.77.1.2:1000")
	warm(v6, "[fd77:1::2]:1000")
	step("a run to the data port", func() { send(v4, "10.77.1.2:1000", 230) }, 1)
	step("a run from the data port", func() { send(v4, "10.77.1.2:4000", 230) }, 1)
	step("an IPv6 run from port 2000 to the data port", func() { send(v6, "[fd77:1::2]:1000", 230) }, 1)
	step("a run of another size", func() { send(v4, "10.77.1.2:1000", 229) }, 0) // marked 229, not 230
	step("a run of other ports", func() { send(v6, "[fd77:1::2]:3000", 230) }, 0)
	step("a datagram alone", func() {
		if _, err := v4.WriteToUDPAddrPort(run[:230], netip.MustParseAddrPort("10.77.1.2:1000")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}, 0)

	// An interface made later is followed.
	veth("gsc", "gsd", "10.77.2", "fd77:2")
	deadline := time.Now().Add(5 * time.Second)
	for len(m.Interfaces()) != 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := m.Interfaces(); len(got) != 2 || got[1] != "gsd" {
		t.Fatalf("the program is on %v, want [gsb gsd]", got)
	}
	warm(v4, "10.77.2.2:1000")
	step("a run on the new interface", func() { send(v4, "10.77.2.2:1000", 230) }, 1)

	m.Close()
	step("a run after Close", func() { send(v4, "10.77.1.2:1000", 230) }, 0)
}

func iptablesPath(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and BPF (CI runs as root)")
	}
	p, err := exec.LookPath("iptables-legacy")
	if err != nil {
		t.Skip("iptables-legacy is not installed (.ci/run installs it)")
	}
	return p
}

func ip6tables(ipt string) string { return ipt[:len(ipt)-len("iptables-legacy")] + "ip6tables-legacy" }
