package lab

import (
	"bufio"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
)

// metricsAddr is where a process of a bench (a server agent, a key
// server) serves its metrics and, with --pprof, its profiles.
type metricsAddr string

// collect has the process collect its garbage (its pprof heap endpoint
// with gc=1), so that the memory read next is what it keeps.
func (m metricsAddr) collect() {
	if resp, err := http.Get("http://" + string(m) + "/debug/pprof/heap?gc=1"); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// saveProfile writes one of the process's pprof profiles to path (for a
// reader's `go tool pprof`; no figure depends on it).
func (m metricsAddr) saveProfile(endpoint, path string) error {
	resp, err := http.Get("http://" + string(m) + endpoint)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, resp.Body)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// value reads one series of the process's metrics (-1 if it cannot).
func (m metricsAddr) value(series string) float64 {
	all, err := m.series(series + " ")
	if v, ok := all[series]; err == nil && ok {
		return v
	}
	return -1
}

// series reads the process's series whose line starts with prefix.
func (m metricsAddr) series(prefix string) (map[string]float64, error) {
	resp, err := http.Get("http://" + string(m) + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out, sc.Err()
}
