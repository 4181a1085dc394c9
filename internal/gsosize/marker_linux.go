package gsosize

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"runtime"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config sets up a Marker.
type Config struct {
	// Port is the data port whose runs are marked.
	Port uint16
	// Logger gets a line per interface the program could not join.
	Logger *slog.Logger
}

// Marker keeps the program at the ingress of every interface of the
// network namespace it started in but loopback, interfaces that appear
// later included, until Close. Its links are file descriptors of this
// process: when the process ends, however it ends, the kernel removes the
// program.
type Marker struct {
	prog *ebpf.Program
	log  *slog.Logger

	mu     sync.Mutex
	links  map[int]link.Link
	names  map[int]string
	failed map[string]string

	// netns is the network namespace Start ran in: interfaces that
	// appear later are joined from a thread in it.
	netns int

	done   chan struct{}
	closed sync.Once
	wg     sync.WaitGroup
}

// Start loads the program and attaches it to every interface there is,
// then follows new ones. An error wraps ErrUnsupported when this kernel
// or this process cannot do it.
func Start(cfg Config) (*Marker, error) {
	lg := cfg.Logger
	if lg == nil {
		lg = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	prog, err := ebpf.NewProgramWithOptions(&ebpf.ProgramSpec{
		Name:         "enclave_gsosize",
		Type:         ebpf.SchedCLS,
		Instructions: instructions(cfg.Port),
		License:      "Apache-2.0",
	}, ebpf.ProgramOptions{})
	if err != nil {
		return nil, fmt.Errorf("%w: loading the program: %w", ErrUnsupported, err)
	}
	runtime.LockOSThread() // one namespace for all that follows
	defer runtime.UnlockOSThread()
	ns, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		prog.Close()
		return nil, fmt.Errorf("gsosize: this thread's network namespace: %w", err)
	}
	m := &Marker{prog: prog, log: lg, links: map[int]link.Link{}, names: map[int]string{}, netns: ns, done: make(chan struct{})}
	// Follow first, then list: an interface made in between is seen twice
	// and joined once.
	updates := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(updates, m.done, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case <-m.done: // the subscription ends with Close
			default:
				lg.Warn("following interfaces for the run-size program", "err", err)
			}
		},
	}); err != nil {
		m.Close()
		return nil, fmt.Errorf("%w: following interfaces: %w", ErrUnsupported, err)
	}
	ifs, err := net.Interfaces()
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("gsosize: listing interfaces: %w", err)
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		if err := m.attach(ifc.Index, ifc.Name); err != nil {
			m.Close()
			return nil, err
		}
	}
	m.wg.Add(1)
	go m.follow(updates)
	return m, nil
}

// attach puts the program on interface index, once.
func (m *Marker) attach(index int, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.links[index]; ok || m.links == nil {
		return nil
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: index, Program: m.prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EPERM) {
			return fmt.Errorf("%w: attaching at %s: %w", ErrUnsupported, name, err)
		}
		return fmt.Errorf("gsosize: attaching at %s: %w", name, err)
	}
	m.links[index], m.names[index] = l, name
	return nil
}

// follow joins interfaces as they appear and forgets those removed.
func (m *Marker) follow(updates <-chan netlink.LinkUpdate) {
	defer m.wg.Done()
	// The thread stays locked, so it ends with this goroutine and never
	// serves another in the wrong namespace.
	runtime.LockOSThread()
	if !sameNetns(m.netns) {
		// Only a process whose threads live in several namespaces (a
		// test) comes here: entering one needs CAP_SYS_ADMIN.
		if err := unix.Setns(m.netns, unix.CLONE_NEWNET); err != nil {
			m.fail("", fmt.Errorf("entering the network namespace to follow its interfaces: %w", err))
			m.log.Warn("runs arriving on interfaces made from now on have no known segment size and are dropped: restart the gateway after adding interfaces", "err", err)
			return
		}
	}
	for {
		select {
		case <-m.done:
			return
		case u, ok := <-updates:
			if !ok {
				return
			}
			index, name := int(u.Index), ""
			if u.Link != nil {
				name = u.Link.Attrs().Name
			}
			switch {
			case u.Header.Type == unix.RTM_DELLINK:
				m.mu.Lock()
				if l, ok := m.links[index]; ok {
					l.Close()
					delete(m.links, index)
					delete(m.names, index)
				}
				m.mu.Unlock()
			case u.Flags&unix.IFF_LOOPBACK != 0:
			default:
				if err := m.attach(index, name); err != nil {
					m.fail(name, err)
					m.log.Warn("runs arriving on this interface have no known segment size and are dropped: restart the gateway, or run it with --runs-by-datagram", "interface", name, "err", err)
				}
			}
		}
	}
}

// sameNetns reports whether the calling thread is in the network
// namespace fd names.
func sameNetns(fd int) bool {
	var a, b unix.Stat_t
	if unix.Fstat(fd, &a) != nil || unix.Stat("/proc/thread-self/ns/net", &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// fail records an interface the program could not join (name empty:
// every interface made from now on).
func (m *Marker) fail(name string, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if name == "" {
		name = "interfaces made after start"
	}
	if m.failed == nil {
		m.failed = map[string]string{}
	}
	m.failed[name] = err.Error()
}

// Failed names the interfaces the program could not join, with why.
func (m *Marker) Failed() map[string]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.failed)
}

// Interfaces names the interfaces the program is on, sorted.
func (m *Marker) Interfaces() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]string, 0, len(m.names))
	for _, n := range m.names {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Close removes the program from every interface.
func (m *Marker) Close() error {
	m.closed.Do(func() {
		close(m.done)
		m.wg.Wait()
		m.mu.Lock()
		for _, l := range m.links {
			l.Close()
		}
		m.links, m.names = nil, nil
		m.mu.Unlock()
		m.prog.Close()
		unix.Close(m.netns)
	})
	return nil
}
