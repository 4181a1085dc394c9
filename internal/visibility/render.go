package visibility

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"math"
	"strings"
)

// JSON writes the map as indented JSON.
func (m *Map) JSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(m)
}

// DOT writes the map as a Graphviz graph: enclaves are nodes, allowed
// pairs edges labelled with their readers (a pair of an enclave with
// itself is a loop); devices that read a pair hang off its enclaves.
func (m *Map) DOT(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "graph %q {\n  label=%q;\n  node [shape=circle];\n", m.Org, "who can read what: "+m.Org)
	for _, e := range m.Enclaves {
		fmt.Fprintf(&b, "  e%d [label=%q];\n", e.ID, fmt.Sprintf("%d %s", e.ID, e.Name))
	}
	for _, p := range m.Pairs {
		if !p.Allowed {
			continue
		}
		var names []string
		for _, r := range p.Readers {
			names = append(names, r.Device)
		}
		fmt.Fprintf(&b, "  e%d -- e%d [label=%q];\n", p.A, p.B, strings.Join(names, "\n"))
	}
	b.WriteString("}\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// node is an enclave's place in the drawing, and its name's (on the side
// towards the centre: the outer side is where its loop goes).
type node struct {
	Enclave
	X, Y   float64
	LX, LY float64
}

// edge is an allowed pair's line (or loop) in the drawing.
type edge struct {
	Key            string
	X1, Y1, X2, Y2 float64
	Loop           bool
	Width          float64
	Readers        int
}

// cell is one square of the matrix; Mirror marks the lower half, which
// would repeat the upper one (each pair is shown once).
type cell struct {
	Key     string
	Allowed bool
	Mirror  bool
	Readers int
	SAs     int
}

type page struct {
	Data   *Map
	Nodes  []node
	Edges  []edge
	Matrix [][]cell
}

// HTML writes the map as one self-contained page: an enclave graph (inline
// SVG), a matrix of pairs, the devices and the SAs, and a details pane
// that a click (or the page's #pair=A-B, #device=NAME, #sa=KEY) fills with
// who reads what and why. It fetches nothing from the network.
func (m *Map) HTML(w io.Writer) error {
	p := page{Data: m}
	p.Nodes, p.Edges = m.layout(m.Pairs)
	for _, ea := range m.Enclaves {
		var row []cell
		for _, eb := range m.Enclaves {
			x, y := order(ea.ID, eb.ID)
			c := cell{Key: fmt.Sprintf("%d-%d", x, y), Mirror: ea.ID > eb.ID}
			if i := m.pair(x, y); i >= 0 {
				c.Allowed, c.Readers, c.SAs = m.Pairs[i].Allowed, len(m.Pairs[i].Readers), m.Pairs[i].SAs
			}
			row = append(row, c)
		}
		p.Matrix = append(p.Matrix, row)
	}
	return pageTemplate.Execute(w, p)
}

// layout places the enclaves on a ring and draws the allowed ones of
// pairs as lines between them (loops for an enclave with itself).
func (m *Map) layout(pairs []Pair) ([]node, []edge) {
	var nodes []node
	var edges []edge
	n := len(m.Enclaves)
	const cx, cy, r = 260.0, 235.0, 150.0 // room around the ring for loops (nodeR+loopGap+2*loopR+a line)
	pos := map[uint32]node{}
	for i, e := range m.Enclaves {
		a := 2*math.Pi*float64(i)/float64(max(n, 1)) - math.Pi/2
		nd := node{Enclave: e, X: math.Round(cx + r*math.Cos(a)), Y: math.Round(cy + r*math.Sin(a))}
		nd.LX, nd.LY = math.Round(cx+(r-nodeR-labelGap)*math.Cos(a)), math.Round(cy+(r-nodeR-labelGap)*math.Sin(a))
		if n == 1 {
			nd.LX, nd.LY = nd.X, nd.Y+nodeR+labelGap
		}
		nodes = append(nodes, nd)
		pos[e.ID] = nd
	}
	for _, pr := range pairs {
		a, okA := pos[pr.A]
		b, okB := pos[pr.B]
		if !pr.Allowed || !okA || !okB {
			continue
		}
		e := edge{Key: pr.Key(), X1: a.X, Y1: a.Y, X2: b.X, Y2: b.Y, Loop: pr.A == pr.B, Readers: len(pr.Readers)}
		e.Width = 2 + math.Min(float64(len(pr.Readers)), 8)
		if e.Loop { // a ring outside the node, away from the centre, clear of it and of its name
			dx, dy := a.X-cx, a.Y-cy
			l := math.Hypot(dx, dy)
			if l < 1 {
				dx, dy, l = 0, -1, 1
			}
			d := nodeR + loopGap + loopR + e.Width/2
			e.X2, e.Y2 = math.Round(a.X+dx/l*d), math.Round(a.Y+dy/l*d)
		}
		edges = append(edges, e)
	}
	return nodes, edges
}

// The drawing's sizes: a node's radius, a loop's and the gaps that keep
// loops and names clear of nodes.
const (
	nodeR    = 26.0
	loopR    = 14.0
	loopGap  = 6.0
	labelGap = 14.0
)

// baseCSS is the look the map and the diff page share.
const baseCSS = `{{define "base.css"}}` + `body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { padding: 12px 20px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
header p { margin: 4px 0 0; color: #b8c0d0; }
main { display: grid; grid-template-columns: 540px 1fr; gap: 16px; padding: 16px 20px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 12px; }
h2 { font-size: 15px; margin: 0 0 8px; }` + `{{end}}`

var pageTemplate = template.Must(template.Must(template.New("map").Parse(baseCSS)).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Enclave visibility map: {{.Data.Org}}</title>
<style>
{{template "base.css"}}
svg .edge { stroke: #3b6fd8; stroke-opacity: .55; cursor: pointer; fill: none; }
svg .edge:hover, svg .edge.sel { stroke: #e0572b; stroke-opacity: 1; }
svg .node circle { fill: #fff; stroke: #1d2330; stroke-width: 2; }
svg .node text { font-size: 13px; text-anchor: middle; dominant-baseline: middle; }
table { border-collapse: collapse; }
td, th { border: 1px solid #dde1e8; padding: 4px 8px; text-align: center; }
td.pair { cursor: pointer; background: #e8f0ff; }
td.pair:hover, td.pair.sel { background: #ffd9c9; }
td.forbidden { background: #f3f3f3; color: #999; }
td.mirror { border: none; }
svg .node text.name { font-size: 12px; fill: #444; }
.device, .sa { cursor: pointer; color: #2451b8; text-decoration: underline; }
#details ul { padding-left: 18px; }
#details .right { color: #555; }
.empty { color: #888; }
</style>
</head>
<body>
<header><h1>Who can read what: {{.Data.Org}}</h1>
<p>Enclaves: {{len .Data.Enclaves}}; devices: {{len .Data.Devices}}; SAs observed: {{len .Data.SAs}}. Click a pair, a device or an SA.</p></header>
<main>
<div>
<section><h2>Enclaves and allowed pairs</h2>
<svg id="graph" width="520" height="460" viewBox="0 0 520 460" role="img" aria-label="enclave graph">
{{range .Edges}}{{if .Loop}}<circle class="edge loop" data-pair="{{.Key}}" cx="{{.X2}}" cy="{{.Y2}}" r="14" stroke-width="{{.Width}}"><title>pair {{.Key}}: {{.Readers}} readers</title></circle>{{else}}<line class="edge" data-pair="{{.Key}}" x1="{{.X1}}" y1="{{.Y1}}" x2="{{.X2}}" y2="{{.Y2}}" stroke-width="{{.Width}}"><title>pair {{.Key}}: {{.Readers}} readers</title></line>{{end}}
{{end}}{{range .Nodes}}<g class="node"><circle cx="{{.X}}" cy="{{.Y}}" r="26"></circle><text x="{{.X}}" y="{{.Y}}">{{.ID}}</text><text class="name" x="{{.LX}}" y="{{.LY}}">{{.Name}}</text></g>
{{end}}</svg>
<p class="empty">A line is an allowed pair of enclaves, thicker the more devices can read its traffic; a ring beside an enclave is the pair of the enclave with itself. Click one.</p>
</section>
<section><h2>Pairs</h2>
<table id="matrix"><tr><th></th>{{range .Data.Enclaves}}<th>{{.ID}}</th>{{end}}</tr>
{{range $i, $row := .Matrix}}<tr><th>{{(index $.Data.Enclaves $i).ID}}</th>{{range $row}}{{if .Mirror}}<td class="mirror"></td>{{else if .Allowed}}<td class="pair" data-pair="{{.Key}}" title="pair {{.Key}}">{{.Readers}}{{if .SAs}} · {{.SAs}} SA{{end}}</td>{{else}}<td class="forbidden" title="pair {{.Key}}: forbidden by policy">forbidden</td>{{end}}{{end}}</tr>
{{end}}</table>
<p class="empty">A cell counts the devices that can read the pair's traffic (and the SAs observed).</p>
</section>
</div>
<div>
<section id="details"><h2>Details</h2><p class="empty">Nothing selected.</p></section>
<section><h2>Devices</h2><p>{{range .Data.Devices}}<span class="device" data-device="{{.Name}}">{{.Name}}</span> ({{.Role}}{{if .Enclave}}, enclave {{.Enclave}}{{end}}{{if .Revoked}}, revoked{{end}}) &nbsp; {{end}}</p></section>
<section><h2>SAs observed</h2><p class="empty">An SA is named i,j,k/SPI: its VC (the server's enclave i, the client's enclave j, the server id k) and the SPI of its client-to-server direction, in hex.</p>{{if .Data.SAs}}<ul>{{range .Data.SAs}}<li><span class="sa" data-sa="{{.Key}}">{{.Key}}</span>{{if .Client}} ({{.Client}}){{end}}</li>{{end}}</ul>{{else}}<p class="empty">None.</p>{{end}}</section>
</div>
</main>
<script>
"use strict";
const data = {{.Data}};
let errors = 0;
window.addEventListener("error", () => { errors++; document.documentElement.dataset.errors = String(errors); });
document.documentElement.dataset.errors = "0";
const details = document.getElementById("details");
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function readers(list) {
  const ul = el("ul");
  if (!list || list.length === 0) { ul.appendChild(el("li", "nobody", "empty")); return ul; }
  for (const r of list) {
    const li = el("li"); li.dataset.reader = r.device;
    li.appendChild(el("strong", r.device));
    li.appendChild(el("span", " (" + r.role + "): " + r.right + (r.scope ? " — " + r.scope : ""), "right"));
    ul.appendChild(li);
  }
  return ul;
}
function select(sel) {
  document.querySelectorAll(".sel").forEach(e => e.classList.remove("sel"));
  if (sel) document.querySelectorAll(sel).forEach(e => e.classList.add("sel"));
}
function show(title, body) {
  details.replaceChildren(el("h2", title));
  for (const b of body) details.appendChild(b);
  details.dataset.shown = title;
}
function showPair(key) {
  const p = data.pairs.find(p => p.a + "-" + p.b === key);
  if (!p) return show("Pair " + key, [el("p", "no such pair", "empty")]);
  select('[data-pair="' + key + '"]');
  if (!p.allowed) return show("Pair " + key, [el("p", "Forbidden by policy: no SA can form between these enclaves, so there is nothing to read.")]);
  show("Pair " + key, [el("p", "Generation " + p.generation + "; SAs observed: " + p.sas + ". Who can read its traffic:"), readers(p.readers)]);
}
function showDevice(name) {
  const d = data.devices.find(d => d.name === name);
  if (!d) return show("Device " + name, [el("p", "no such device", "empty")]);
  select('[data-device="' + name + '"]');
  const ul = el("ul");
  for (const r of d.reads) ul.appendChild(el("li", r));
  if (d.reads.length === 0) ul.appendChild(el("li", "nothing beyond its own SAs", "empty"));
  show("Device " + name, [el("p", d.role + (d.enclave ? " in enclave " + d.enclave : "") + (d.revoked ? ", revoked" : "") + ". It can read:"), ul]);
}
function showSA(key) {
  const s = data.sas.find(s => s.enclave + "," + s.peer + "," + s.server + "/" + s.spi.toString(16).padStart(8, "0") === key);
  if (!s) return show("SA " + key, [el("p", "no such SA", "empty")]);
  select('[data-sa="' + key + '"]');
  show("SA " + key, [el("p", "VC (" + s.enclave + "," + s.peer + "," + s.server + ")" + (s.client ? ", client " + s.client : "") + ". Who can read it:"), readers(s.readers)]);
}
function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  const [kind, value] = h.split("=");
  if (kind === "pair") showPair(value); else if (kind === "device") showDevice(value); else if (kind === "sa") showSA(value);
}
document.addEventListener("click", ev => {
  const t = ev.target.closest("[data-pair],[data-device],[data-sa]");
  if (!t) return;
  if (t.dataset.pair) location.hash = "pair=" + t.dataset.pair;
  else if (t.dataset.device) location.hash = "device=" + encodeURIComponent(t.dataset.device);
  else location.hash = "sa=" + t.dataset.sa;
});
window.addEventListener("hashchange", route);
route();
</script>
</body>
</html>
`))
