package visibility

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/enclavekeys/enclave/internal/api"
)

func u32(v uint32) *uint32 { return &v }

// fig1A is an organisation like the seed's Fig 1A: four enclaves, an org
// key server and an enclave key server, servers, clients, gateways on the
// boundaries with grants, a legacy gateway, an org-wide monitor, a
// revoked server. Pairs 1-2, 1-3, 2-3, 2-4 and 4-4 are allowed; 1-4 and
// 3-4 are not.
func fig1A() *api.StatusReply {
	pair := func(a, b uint32) *api.Pair { return &api.Pair{A: a, B: b} }
	return &api.StatusReply{
		Enclaves: []*api.Enclave{{Id: 1, Name: "web"}, {Id: 2, Name: "app"}, {Id: 3, Name: "db"}, {Id: 4, Name: "ops"}},
		Devices: []*api.Device{
			{Name: "ks-org", Role: "keyserver"},
			{Name: "ks-2", Role: "keyserver", Enclave: 2},
			{Name: "web1", Role: "server", Enclave: 1, ServerId: u32(10)},
			{Name: "app1", Role: "server", Enclave: 2, ServerId: u32(20)},
			{Name: "db1", Role: "server", Enclave: 3, ServerId: u32(30)},
			{Name: "old", Role: "server", Enclave: 3, ServerId: u32(31), Revoked: true},
			{Name: "laptop", Role: "client", Enclave: 1},
			{Name: "gw12", Role: "gateway", Enclave: 1},
			{Name: "legacy", Role: "gateway", Enclave: 2},
			{Name: "soc", Role: "monitor"},
		},
		Pairs: []*api.PairStatus{
			{Pair: pair(1, 2), Generation: 3}, {Pair: pair(1, 3), Generation: 1}, {Pair: pair(2, 3), Generation: 1},
			{Pair: pair(2, 4), Generation: 1}, {Pair: pair(4, 4), Generation: 2},
		},
		Grants: []*api.Grant{
			{Device: "gw12", Pairs: []*api.Pair{pair(2, 1)}},
			{Device: "legacy", Pairs: []*api.Pair{pair(2, 3)}},
			{Device: "soc", All: true},
		},
	}
}

func names(rs []Reader) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Device+"="+r.Right)
	}
	return out
}

func TestBuild(t *testing.T) {
	m := Build("example.org", fig1A(), []Observed{
		{Enclave: 2, Peer: 1, Server: 20, SPI: 0x80001234, Client: "laptop"},
		{Enclave: 3, Peer: 2, Server: 30, SPI: 0x00000077, Client: "app1", Delivered: []string{"legacy"}},
	})
	if len(m.Pairs) != 10 {
		t.Fatalf("%d pairs of 4 enclaves, want 10", len(m.Pairs))
	}
	want := []string{
		"ks-org=" + RightOrgKey, "soc=" + RightMonitor, "ks-2=" + RightEnclaveTier, "gw12=" + RightGrant,
		"app1=" + RightServerKey, "web1=" + RightServerKey,
	}
	if got := names(m.Readers(2, 1)); !slices.Equal(got, want) {
		t.Fatalf("readers of 1-2:\n got %q\nwant %q", got, want)
	}
	// A revoked server reads nothing; a forbidden pair has no readers.
	if got := names(m.Readers(3, 2)); slices.ContainsFunc(got, func(s string) bool { return strings.HasPrefix(s, "old=") }) {
		t.Errorf("a revoked server reads 2-3: %q", got)
	}
	for _, p := range m.Pairs {
		if p.Key() == "1-4" && (p.Allowed || len(p.Readers) != 0) {
			t.Errorf("forbidden pair 1-4: %+v", p)
		}
	}
	// The SA of app1 (server 20 in 2) with laptop: the pair's holders
	// above server level, its own server (not web1), its client.
	sa := m.SAs[0]
	if got := names(sa.Readers); !slices.Equal(got, []string{
		"ks-org=" + RightOrgKey, "soc=" + RightMonitor, "ks-2=" + RightEnclaveTier, "gw12=" + RightGrant,
		"app1=" + RightServerKey, "laptop=" + RightParty,
	}) {
		t.Fatalf("readers of the SA: %q", got)
	}
	if got := names(m.SAs[1].Readers); !slices.Contains(got, "legacy="+RightExchange) || !slices.Contains(got, "legacy="+RightGrant) {
		t.Fatalf("the legacy gateway's SA: %q", got)
	}
	// Told that legacy cannot derive: its grant is a right to ask, and it
	// reads only the SA whose keys it was given.
	nd := Build("example.org", fig1A(), []Observed{
		{Enclave: 3, Peer: 2, Server: 30, SPI: 1, Client: "app1", Delivered: []string{"legacy"}},
		{Enclave: 3, Peer: 2, Server: 30, SPI: 2, Client: "app1"},
	}, Options{NoDerive: []string{"legacy"}})
	if got := names(nd.Readers(2, 3)); !slices.Contains(got, "legacy="+RightMayExchange) {
		t.Fatalf("readers of 2-3 with a gateway that cannot derive: %q", got)
	}
	if !slices.Contains(names(nd.SAs[0].Readers), "legacy="+RightExchange) || slices.ContainsFunc(names(nd.SAs[1].Readers), func(s string) bool { return strings.HasPrefix(s, "legacy=") }) {
		t.Fatalf("SA readers: %q / %q", names(nd.SAs[0].Readers), names(nd.SAs[1].Readers))
	}
	for _, d := range m.Devices {
		switch d.Name {
		case "laptop":
			if !slices.Equal(d.Reads, []string{"SA 2,1,20/80001234"}) {
				t.Errorf("laptop reads %q", d.Reads)
			}
		case "gw12":
			if !slices.Equal(d.Reads, []string{"pair 1-2", "SA 2,1,20/80001234"}) {
				t.Errorf("gw12 reads %q", d.Reads)
			}
		}
	}
	var js bytes.Buffer
	if err := m.JSON(&js); err != nil || !json.Valid(js.Bytes()) {
		t.Fatalf("JSON: %v", err)
	}
	var dot bytes.Buffer
	if err := m.DOT(&dot); err != nil || !strings.Contains(dot.String(), "e1 -- e2") || strings.Contains(dot.String(), "e1 -- e4") {
		t.Fatalf("DOT: %v\n%s", err, dot.String())
	}
}

// TestHTMLSelfContained: the page fetches nothing: no external URL in a
// src or href, no stylesheet or script from elsewhere.
func TestHTMLSelfContained(t *testing.T) {
	var b bytes.Buffer
	if err := Build("example.org", fig1A(), nil).HTML(&b); err != nil {
		t.Fatal(err)
	}
	if re := regexp.MustCompile(`(?i)(src|href)\s*=|@import|url\(|fetch\(|XMLHttpRequest`); re.Match(b.Bytes()) {
		t.Fatalf("the page refers elsewhere: %s", re.Find(b.Bytes()))
	}
	if !strings.Contains(b.String(), `data-pair="1-2"`) || !strings.Contains(b.String(), "forbidden") {
		t.Fatal("the page lacks its pairs")
	}
}

// TestBrowser loads the page in headless Chromium (where it is installed;
// .ci/run installs it): it renders without errors, and the pair 1-2
// selected by the page's address shows its readers. The screenshot is
// kept in the test's output directory; ENCLAVE_MAP_SCREENSHOT=PATH also
// writes it there (the README's picture is made so).
func TestBrowser(t *testing.T) {
	browser := ""
	for _, b := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(b); err == nil {
			browser = p
			break
		}
	}
	if browser == "" {
		t.Skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")
	}
	dir := t.TempDir()
	page := filepath.Join(dir, "map.html")
	f, err := os.Create(page)
	if err != nil {
		t.Fatal(err)
	}
	m := Build("example.org", fig1A(), []Observed{{Enclave: 2, Peer: 1, Server: 20, SPI: 0x80001234, Client: "laptop"}})
	if err := m.HTML(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	run := func(args ...string) (string, string) {
		t.Helper()
		base := []string{"--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
			"--user-data-dir=" + filepath.Join(dir, "profile"), "--enable-logging=stderr", "--v=0", "--virtual-time-budget=2000"}
		cmd := exec.Command(browser, append(base, args...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v\n%s", browser, err, errb.String())
			}
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("%s did not finish in 60 s", browser)
		}
		return out.String(), errb.String()
	}
	dom, logs := run("--dump-dom", "file://"+page+"#pair=1-2")
	if strings.Contains(logs, "Uncaught") || strings.Contains(logs, "CONSOLE") && strings.Contains(logs, "rror") {
		t.Fatalf("console errors:\n%s", logs)
	}
	if !strings.Contains(dom, `data-errors="0"`) {
		t.Fatalf("the page's script did not run cleanly:\n%.2000s", dom)
	}
	details := dom[strings.Index(dom, `id="details"`):]
	details = details[:strings.Index(details, "</section>")]
	for _, who := range []string{"ks-org", "soc", "ks-2", "gw12", "web1", "app1"} {
		if !strings.Contains(details, `data-reader="`+who+`"`) {
			t.Errorf("the details of pair 1-2 lack %s:\n%s", who, details)
		}
	}
	if strings.Contains(details, `data-reader="db1"`) || strings.Contains(details, `data-reader="laptop"`) {
		t.Errorf("the details of pair 1-2 name a device that cannot read it:\n%s", details)
	}
	shot := filepath.Join(dir, "map.png")
	run("--window-size=1100,700", "--hide-scrollbars", "--screenshot="+shot, "file://"+page+"#pair=1-2")
	png, err := os.ReadFile(shot)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Fatalf("screenshot: %v", err)
	}
	t.Logf("screenshot: %s (%d bytes)", shot, len(png))
	if out := os.Getenv("ENCLAVE_MAP_SCREENSHOT"); out != "" {
		if err := os.WriteFile(out, png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDrawing: each loop (a pair of an enclave with itself) is drawn
// clear of every node and every enclave's name; the matrix shows each
// allowed pair once; the SA labels have their legend.
func TestDrawing(t *testing.T) {
	st := fig1A()
	for i := uint32(1); i <= 4; i++ { // a loop on every node, wherever it stands
		if i != 4 {
			st.Pairs = append(st.Pairs, &api.PairStatus{Pair: &api.Pair{A: i, B: i}, Generation: 1})
		}
	}
	var b bytes.Buffer
	if err := Build("example.org", st, nil).HTML(&b); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	num := func(s string) float64 {
		var f float64
		if _, err := fmt.Sscan(s, &f); err != nil {
			t.Fatal(err)
		}
		return f
	}
	type pt struct{ x, y float64 }
	var nodes, labels, loops []pt
	for _, m := range regexp.MustCompile(`<g class="node"><circle cx="([-\d.]+)" cy="([-\d.]+)" r="26"></circle><text[^>]*>\d+</text><text class="name" x="([-\d.]+)" y="([-\d.]+)">`).FindAllStringSubmatch(page, -1) {
		nodes = append(nodes, pt{num(m[1]), num(m[2])})
		labels = append(labels, pt{num(m[3]), num(m[4])})
	}
	for _, m := range regexp.MustCompile(`<circle class="edge loop" data-pair="\d+-\d+" cx="([-\d.]+)" cy="([-\d.]+)" r="14" stroke-width="([\d.]+)"`).FindAllStringSubmatch(page, -1) {
		loops = append(loops, pt{num(m[1]), num(m[2])})
	}
	if len(nodes) != 4 || len(loops) != 4 {
		t.Fatalf("%d nodes, %d loops drawn", len(nodes), len(loops))
	}
	dist := func(a, b pt) float64 { return math.Hypot(a.x-b.x, a.y-b.y) }
	for _, l := range loops { // inside the 520×460 drawing, stroke and all
		if l.x-loopR-6 < 0 || l.y-loopR-6 < 0 || l.x+loopR+6 > 520 || l.y+loopR+6 > 460 {
			t.Errorf("a loop at %v leaves the drawing", l)
		}
	}
	for _, l := range loops {
		for i, n := range nodes {
			if d := dist(l, n); d < nodeR+loopR+2 {
				t.Errorf("a loop at %v overlaps node %v (%.0f apart)", l, n, d)
			}
			if d := dist(l, labels[i]); d < loopR+12 {
				t.Errorf("a loop at %v covers a name at %v (%.0f apart)", l, labels[i], d)
			}
		}
	}
	for _, p := range []string{"1-2", "1-3", "2-3", "2-4", "4-4", "1-1"} {
		if n := strings.Count(page, `<td class="pair" data-pair="`+p+`"`); n != 1 {
			t.Errorf("pair %s is in the matrix %d times", p, n)
		}
	}
	if !strings.Contains(page, "An SA is named i,j,k/SPI") {
		t.Error("no legend for the SA labels")
	}
}
