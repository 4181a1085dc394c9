package visibility

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"math"
	"slices"
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
		label := fmt.Sprintf("%s %s", e.Display(), e.Name)
		if e.EnclaveKey {
			label += "\n(enclave key)"
		}
		fmt.Fprintf(&b, "  e%d [label=%q];\n", e.ID, label)
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
	// Title lists the pair's readers by right (the line's tooltip).
	Title string
}

// cell is one square of the matrix; Mirror marks the lower half, which
// would repeat the upper one (each pair is shown once). ByRight counts
// its readers by right.
type cell struct {
	Key     string
	Allowed bool
	Mirror  bool
	Readers int
	SAs     int
	ByRight []rightCount
	// Guarded is the sight assertions on the pair, one a line.
	Guarded string
}

// rightCount is how many of a pair's readers hold one right.
type rightCount struct {
	Right, Class string
	N            int
}

// rightGroup is one right of the legend and the readers panel: its
// colour's class and the devices that hold it on some pair.
type rightGroup struct {
	Right, Class string
	Readers      []chip
}

// chip is a device in the readers panel: how many pairs it reads by
// this right.
type chip struct {
	Device string
	Pairs  int
}

// geometry is the drawing's scale: a few enclaves get big nodes with
// their names; many get small ones on a wider ring, names in tooltips.
type geometry struct {
	NodeR, LoopR, LoopGap float64
	W, H, CX, CY, R       float64
	Names                 bool
}

// The drawing's sizes up to smallRing enclaves: a node's radius, a loop's
// and the gaps that keep loops and names clear of nodes.
const (
	nodeR     = 26.0
	loopR     = 14.0
	loopGap   = 6.0
	labelGap  = 14.0
	smallRing = 12
)

func geometryFor(n int) geometry {
	if n <= smallRing {
		return geometry{NodeR: nodeR, LoopR: loopR, LoopGap: loopGap, W: 520, H: 460, CX: 260, CY: 235, R: 150, Names: true}
	}
	g := geometry{NodeR: 11, LoopR: 6, LoopGap: 3}
	g.R = math.Max(150, math.Ceil(float64(n)*(2*g.NodeR+6)/(2*math.Pi)))
	g.W = math.Ceil(2 * (g.R + g.NodeR + g.LoopGap + 2*g.LoopR + 10))
	g.H, g.CX, g.CY = g.W, g.W/2, g.W/2
	return g
}

// Height is the drawing's height on the page, 520 wide.
func (g geometry) Height() float64 { return math.Round(520 * g.H / g.W) }

type page struct {
	Data   *Map
	Geo    geometry
	Nodes  []node
	Edges  []edge
	Matrix [][]cell
	Rights []rightGroup
	Unread []Access
	Window string
	// Classes maps each right to its colour's class, for the script.
	Classes map[string]string
}

// rights are the rights in the order the legend shows them, with the
// class of their colour.
var rights = []struct{ Right, Class, Short string }{
	{RightOrgKey, "r-org", "org key"},
	{RightMonitor, "r-monitor", "org-wide grant"},
	{RightEnclaveTier, "r-tier", "enclave key server"},
	{RightGrant, "r-grant", "gateway grant"},
	{RightMayExchange, "r-mayx", "grant, keys by exchange"},
	{RightServerKey, "r-server", "server key"},
	{RightParty, "r-party", "party to the SA"},
	{RightExchange, "r-exchange", "direct key exchange"},
}

// HTML writes the map as one self-contained page: an enclave graph (inline
// SVG), a legend of rights with every reader beside the graph (pointing
// at one lights up the pairs it reads), a matrix of pairs with their
// readers counted by right, what readers did read (where the map was
// given it) and the readers that never did, the devices and the SAs, and
// a details pane that a click (or the page's #pair=A-B, #device=NAME,
// #sa=KEY) fills with who reads what and why. It fetches nothing from the
// network.
func (m *Map) HTML(w io.Writer) error {
	p := page{Data: m, Classes: map[string]string{}}
	for _, r := range rights {
		p.Classes[r.Right] = r.Class
	}
	p.Geo, p.Nodes, p.Edges = m.layout(m.Pairs)
	byKey := map[string]*Pair{}
	for i := range m.Pairs {
		byKey[m.Pairs[i].Key()] = &m.Pairs[i]
	}
	for i := range p.Edges {
		p.Edges[i].Title = edgeTitle(byKey[p.Edges[i].Key])
	}
	for _, ea := range m.Enclaves {
		var row []cell
		for _, eb := range m.Enclaves {
			x, y := order(ea.ID, eb.ID)
			c := cell{Key: fmt.Sprintf("%d-%d", x, y), Mirror: ea.ID > eb.ID}
			if i := m.pair(x, y); i >= 0 {
				c.Key = m.Pairs[i].Key()
			}
			if i := m.pair(x, y); i >= 0 && !c.Mirror {
				pr := &m.Pairs[i]
				c.Allowed, c.Readers, c.SAs = pr.Allowed, len(pr.Readers), pr.SAs
				c.Guarded = strings.Join(pr.Assertions, "\n")
				for _, r := range rights {
					if n := countRight(pr.Readers, r.Right); n > 0 {
						c.ByRight = append(c.ByRight, rightCount{r.Right, r.Class, n})
					}
				}
			}
			row = append(row, c)
		}
		p.Matrix = append(p.Matrix, row)
	}
	for _, r := range rights {
		g := rightGroup{Right: r.Right, Class: r.Class}
		held := map[string]int{}
		for _, pr := range m.Pairs {
			for _, rd := range pr.Readers {
				if rd.Right == r.Right {
					held[rd.Device]++
				}
			}
		}
		for _, s := range m.SAs { // parties and exchanges hold SAs, not pairs
			for _, rd := range s.Readers {
				if rd.Right == r.Right && (r.Right == RightParty || r.Right == RightExchange) {
					held[rd.Device]++
				}
			}
		}
		for d, n := range held {
			g.Readers = append(g.Readers, chip{d, n})
		}
		slices.SortFunc(g.Readers, func(a, b chip) int { return strings.Compare(a.Device, b.Device) })
		p.Rights = append(p.Rights, g)
	}
	p.Unread = m.Unread()
	if m.Window > 0 {
		p.Window = m.Window.String()
	}
	return pageTemplate.Execute(w, p)
}

func countRight(rs []Reader, right string) int {
	n := 0
	for _, r := range rs {
		if r.Right == right {
			n++
		}
	}
	return n
}

// edgeTitle is a pair's tooltip: its readers, grouped by right.
func edgeTitle(pr *Pair) string {
	var b strings.Builder
	fmt.Fprintf(&b, "pair %s: %d readers", pr.Key(), len(pr.Readers))
	for _, a := range pr.Assertions {
		fmt.Fprintf(&b, "\nguarded by %s", a)
	}
	for _, r := range rights {
		var names []string
		for _, rd := range pr.Readers {
			if rd.Right == r.Right {
				names = append(names, rd.Device)
			}
		}
		if len(names) > 0 {
			fmt.Fprintf(&b, "\n%s: %s", r.Short, strings.Join(names, ", "))
		}
	}
	return b.String()
}

// layout places the enclaves on a ring and draws the allowed ones of
// pairs as lines between them (loops for an enclave with itself).
func (m *Map) layout(pairs []Pair) (geometry, []node, []edge) {
	var nodes []node
	var edges []edge
	n := len(m.Enclaves)
	g := geometryFor(n)
	cx, cy, r := g.CX, g.CY, g.R
	pos := map[uint32]node{}
	for i, e := range m.Enclaves {
		a := 2*math.Pi*float64(i)/float64(max(n, 1)) - math.Pi/2
		nd := node{Enclave: e, X: math.Round(cx + r*math.Cos(a)), Y: math.Round(cy + r*math.Sin(a))}
		nd.LX, nd.LY = math.Round(cx+(r-g.NodeR-labelGap)*math.Cos(a)), math.Round(cy+(r-g.NodeR-labelGap)*math.Sin(a))
		if n == 1 {
			nd.LX, nd.LY = nd.X, nd.Y+g.NodeR+labelGap
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
		if !g.Names {
			e.Width = 1 + math.Min(float64(len(pr.Readers)), 8)/4
		}
		if e.Loop { // a ring outside the node, away from the centre, clear of it and of its name
			dx, dy := a.X-cx, a.Y-cy
			l := math.Hypot(dx, dy)
			if l < 1 {
				dx, dy, l = 0, -1, 1
			}
			d := g.NodeR + g.LoopGap + g.LoopR + e.Width/2
			e.X2, e.Y2 = math.Round(a.X+dx/l*d), math.Round(a.Y+dy/l*d)
		}
		edges = append(edges, e)
	}
	return g, nodes, edges
}

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
main > div { min-width: 0; }
svg .edge { stroke: #3b6fd8; stroke-opacity: .45; cursor: pointer; fill: none; }
svg .edge:hover, svg .edge.sel { stroke: #e0572b; stroke-opacity: 1; }
svg .edge.lit { stroke: #e0572b; stroke-opacity: 1; }
svg.lighting .edge:not(.lit) { stroke-opacity: .08; }
svg .node circle { fill: #fff; stroke: #1d2330; stroke-width: 2; }
svg .node text { font-size: 13px; text-anchor: middle; dominant-baseline: middle; }
svg.many .node text { font-size: 9px; }
.scroll { overflow: auto; max-height: 640px; }
table { border-collapse: collapse; }
td, th { border: 1px solid #dde1e8; padding: 3px 6px; text-align: center; white-space: nowrap; }
th.level2, th.level3, th.level4 { font-weight: normal; color: #4a5568; } /* sub-enclaves, after their enclave */
td.pair { cursor: pointer; background: #f3f6fc; }
td.pair:hover, td.pair.sel { background: #ffd9c9; }
td.pair.lit { background: #ffb99c; }
td.forbidden { background: #f3f3f3; color: #999; }
td.mirror { border: none; }
svg .node text.name { font-size: 12px; fill: #444; }
.device, .sa { cursor: pointer; color: #2451b8; text-decoration: underline; }
.sa.lit { background: #ffb99c; }
#details ul { padding-left: 18px; }
#details .right { color: #555; }
.empty { color: #888; }
.r-org { --c: #7b3fb5; } .r-monitor { --c: #c2185b; } .r-tier { --c: #e07b00; } .r-grant { --c: #1f6fd1; }
.r-mayx { --c: #5fa8e8; } .r-server { --c: #2e8b57; } .r-party { --c: #777; } .r-exchange { --c: #0f9c9c; } .r-other { --c: #444; }
.n { color: #fff; background: var(--c); border-radius: 8px; padding: 0 5px; margin: 0 1px; font-size: 12px; }
table.many td { padding: 1px 2px; } table.many .n { padding: 0 2px; margin: 0; border-radius: 3px; font-size: 10px; }
.legend { list-style: none; padding: 0; margin: 0; }
.legend > li { margin: 6px 0; }
.key { display: inline-block; width: 12px; height: 12px; border-radius: 3px; background: var(--c); vertical-align: middle; margin-right: 6px; }
.chip { display: inline-block; border: 1px solid var(--c); color: var(--c); border-radius: 10px; padding: 0 7px; margin: 2px; font-size: 12px; cursor: pointer; }
.chip:hover, .chip.lit { background: var(--c); color: #fff; }
.read { color: #1f7a43; } .unread { color: #b02a1e; }
</style>
</head>
<body>
<header><h1>Who can read what: {{.Data.Org}}</h1>
<p>Enclaves: {{len .Data.Enclaves}}; devices: {{len .Data.Devices}}; SAs observed: {{len .Data.SAs}}{{if .Window}}; reads over the {{.Window}} before {{.Data.At.Format "2006-01-02 15:04:05 MST"}}, from {{len .Data.Reported}} devices reported{{end}}. Point at a reader to light up what it reads; click a pair, a device or an SA.</p></header>
<main>
<div>
<section><h2>Enclaves and allowed pairs</h2>
<svg id="graph" class="{{if not .Geo.Names}}many{{end}}" width="520" height="{{.Geo.Height}}" viewBox="0 0 {{.Geo.W}} {{.Geo.H}}" role="img" aria-label="enclave graph">
{{range .Edges}}{{if .Loop}}<circle class="edge loop" data-pair="{{.Key}}" cx="{{.X2}}" cy="{{.Y2}}" r="{{$.Geo.LoopR}}" stroke-width="{{.Width}}"><title>{{.Title}}</title></circle>{{else}}<line class="edge" data-pair="{{.Key}}" x1="{{.X1}}" y1="{{.Y1}}" x2="{{.X2}}" y2="{{.Y2}}" stroke-width="{{.Width}}"><title>{{.Title}}</title></line>{{end}}
{{end}}{{range .Nodes}}<g class="node"><circle cx="{{.X}}" cy="{{.Y}}" r="{{$.Geo.NodeR}}"></circle><text x="{{.X}}" y="{{.Y}}">{{.Display}}</text>{{if $.Geo.Names}}<text class="name" x="{{.LX}}" y="{{.LY}}">{{.Name}}{{if .EnclaveKey}} (enclave key){{end}}</text>{{else}}<title>{{.Display}} {{.Name}}{{if .EnclaveKey}} (enclave key){{end}}</title>{{end}}</g>
{{end}}</svg>
<p class="empty">A line is an allowed pair of enclaves, thicker the more devices can read its traffic; a ring beside an enclave is the pair of the enclave with itself. Its tooltip lists the readers by right. Click one.</p>
</section>
<section id="readers"><h2>Readers, by right</h2>
<ul class="legend">{{range $g := .Rights}}<li class="{{.Class}}" data-right="{{.Right}}"><span class="key"></span><strong>{{.Right}}</strong> <span class="empty">({{len .Readers}})</span><br>{{range .Readers}}<span class="chip {{$g.Class}}" data-reader="{{.Device}}" title="{{.Device}}: {{.Pairs}} {{if or (eq $g.Class "r-party") (eq $g.Class "r-exchange")}}SAs{{else}}pairs{{end}}">{{.Device}}</span>{{else}}<span class="empty">nobody</span>{{end}}</li>
{{end}}</ul>
<p class="empty">Point at a reader: the pairs it can read light up in the graph and the matrix.</p>
</section>
</div>
<div>
<section id="details"><h2>Details</h2><p class="empty">Nothing selected.</p></section>
<section><h2>Pairs</h2><div class="scroll">
<table id="matrix"{{if not .Geo.Names}} class="many"{{end}}><tr><th></th>{{range .Data.Enclaves}}<th class="level{{.Level}}">{{.Display}}</th>{{end}}</tr>
{{range $i, $row := .Matrix}}<tr><th class="level{{(index $.Data.Enclaves $i).Level}}">{{(index $.Data.Enclaves $i).Display}}</th>{{range $row}}{{if .Mirror}}<td class="mirror"></td>{{else if .Allowed}}<td class="pair" data-pair="{{.Key}}" title="pair {{.Key}}: {{.Readers}} readers{{if .Guarded}}&#10;guarded by: {{.Guarded}}{{end}}">{{range .ByRight}}<span class="n {{.Class}}" title="{{.Right}}">{{.N}}</span>{{else}}0{{end}}{{if .SAs}} · {{.SAs}} SA{{end}}{{if .Guarded}} <span class="guard" title="guarded by: {{.Guarded}}">&#9873;</span>{{end}}</td>{{else}}<td class="forbidden" title="pair {{.Key}}: forbidden by policy">–</td>{{end}}{{end}}</tr>
{{end}}</table></div>
<p class="empty">A cell counts the pair's readers by right, in the legend's colours (and the SAs observed); – is a pair policy forbids; &#9873; marks a pair sight assertions guard (the key service refuses any change that breaks one).</p>
</section>
{{if .Window}}<section id="unread"><h2>Can read, never did ({{len .Unread}})</h2>
{{if .Unread}}<p>Granted these pairs, reported, and seen reading none of their traffic in the {{.Window}} before the map: candidates to take the grant from.</p><ul>{{range .Unread}}<li data-unread="{{.Device}} {{.Pair}}"><span class="device" data-device="{{.Device}}">{{.Device}}</span> ({{.Role}}): pair <span data-pair="{{.Pair}}">{{.Pair}}</span> — {{.Right}}</li>{{end}}</ul>{{else}}<p class="empty">Every reported reader by grant read each pair it may read.</p>{{end}}
<p class="empty">Reported: {{range .Data.Reported}}{{.}} {{else}}nobody{{end}}. Readers not reported are not judged.</p>
{{if .Data.Reads}}<h3>Seen reading</h3><ul>{{range .Data.Reads}}<li><span class="device" data-device="{{.Device}}">{{.Device}}</span>: pair <span data-pair="{{.Pair}}">{{.Pair}}</span>, {{.Bytes}} bytes, last {{.Last.Format "2006-01-02 15:04:05Z07:00"}} (reported by {{.Source}})</li>{{end}}</ul>{{end}}
{{if .Data.Unexplained}}<h3>Reported reading without a right ({{len .Data.Unexplained}})</h3><p>Not counted as reads: the device has no right to these pairs. A source that lies, or a key that leaked.</p><ul>{{range .Data.Unexplained}}<li><span class="device" data-device="{{.Device}}">{{.Device}}</span>: pair {{.Pair}} (reported by {{.Source}})</li>{{end}}</ul>{{end}}</section>{{end}}
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
const graph = document.getElementById("graph");
const reads = new Map((data.reads || []).map(r => [r.device + " " + r.pair, r]));
const reported = new Set(data.reported || []);
const classes = {{.Classes}};
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function size(n) { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return (i ? n.toFixed(1) : n) + " " + u[i]; }
function didRead(device, pair) {
  if (!data.window || !pair) return null;
  const r = reads.get(device + " " + pair);
  if (r) return el("span", " — read " + size(r.bytes) + ", last at " + r.last.replace("T", " ").replace(/\..*|Z$/, "") + " UTC", "read");
  if (reported.has(device)) return el("span", " — read nothing in the window", "unread");
  return el("span", " — not reported", "empty");
}
function readers(list, pair) {
  const ul = el("ul");
  if (!list || list.length === 0) { ul.appendChild(el("li", "nobody", "empty")); return ul; }
  for (const r of list) {
    const li = el("li"); li.dataset.reader = r.device;
    li.appendChild(el("span", "", "key " + (classes[r.right] || "r-other")));
    li.appendChild(el("strong", r.device));
    li.appendChild(el("span", " (" + r.role + "): " + r.right + (r.scope ? " — " + r.scope : ""), "right"));
    if (r.unsure) li.appendChild(el("span", " — maybe: " + r.unsure, "unsure"));
    const dr = didRead(r.device, pair);
    if (dr) li.appendChild(dr);
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
function pairsOf(name) {
  const d = data.devices.find(d => d.name === name);
  return d ? d.reads.filter(r => r.startsWith("pair ")).map(r => r.slice(5)) : [];
}
// light marks the pairs a reader can read (and the reader's chips); null
// puts the page back.
function light(name) {
  document.querySelectorAll(".lit").forEach(e => e.classList.remove("lit"));
  graph.classList.toggle("lighting", !!name);
  delete document.documentElement.dataset.lit;
  if (!name) return;
  const pairs = pairsOf(name);
  for (const p of pairs) document.querySelectorAll('[data-pair="' + p + '"]').forEach(e => e.classList.add("lit"));
  const d = data.devices.find(d => d.name === name);
  for (const r of (d ? d.reads : []).filter(r => r.startsWith("SA "))) document.querySelectorAll('[data-sa="' + r.slice(3) + '"]').forEach(e => e.classList.add("lit"));
  document.querySelectorAll('.chip[data-reader="' + CSS.escape(name) + '"]').forEach(e => e.classList.add("lit"));
  document.documentElement.dataset.lit = name + ":" + pairs.join(",");
}
function showPair(key) {
  const p = data.pairs.find(p => p.a + "-" + p.b === key);
  if (!p) return show("Pair " + key, [el("p", "no such pair", "empty")]);
  select('[data-pair="' + key + '"]');
  if (!p.allowed) return show("Pair " + key, [el("p", "Forbidden by policy: no SA can form between these enclaves, so there is nothing to read.")]);
  const body = [el("p", "Generation " + p.generation + "; SAs observed: " + p.sas + ". Who can read its traffic:"), readers(p.readers, key)];
  if (p.assertions) {
    // The sight assertions the key service holds every change to.
    const ul = el("ul");
    for (const a of p.assertions) ul.appendChild(el("li", a, "assertion"));
    body.push(el("p", "Guarded by these sight assertions (the key service refuses any change that breaks one):"), ul);
  }
  show("Pair " + key, body);
}
function showDevice(name) {
  const d = data.devices.find(d => d.name === name);
  if (!d) return show("Device " + name, [el("p", "no such device", "empty")]);
  select('[data-device="' + CSS.escape(name) + '"]');
  const ul = el("ul");
  for (const r of d.reads) {
    const li = el("li", r);
    const dr = r.startsWith("pair ") ? didRead(name, r.slice(5)) : null;
    if (dr) li.appendChild(dr);
    ul.appendChild(li);
  }
  if (d.reads.length === 0) ul.appendChild(el("li", "nothing beyond its own SAs", "empty"));
  show("Device " + name, [el("p", d.role + (d.enclave ? " in enclave " + d.enclave : "") + (d.revoked ? ", revoked" : "") + ". It can read:"), ul]);
}
function showSA(key) {
  const s = data.sas.find(s => s.enclave + "," + s.peer + "," + s.server + "/" + s.spi.toString(16).padStart(8, "0") === key);
  if (!s) return show("SA " + key, [el("p", "no such SA", "empty")]);
  select('[data-sa="' + key + '"]');
  show("SA " + key, [el("p", "VC (" + s.enclave + "," + s.peer + "," + s.server + ")" + (s.client ? ", client " + s.client : "") + ". Who can read it:"), readers(s.readers, null)]);
}
function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  const i = h.indexOf("=");
  const kind = h.slice(0, i), value = h.slice(i + 1);
  if (kind === "pair") showPair(value); else if (kind === "device") showDevice(value); else if (kind === "sa") showSA(value);
  else if (kind === "point") { // point at a reader, as a mouse does
    const chip = document.querySelector('.chip[data-reader="' + CSS.escape(value) + '"]');
    if (chip) chip.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  }
}
document.addEventListener("mouseover", ev => {
  const t = ev.target.closest && ev.target.closest(".chip[data-reader]");
  if (t) light(t.dataset.reader);
});
document.addEventListener("mouseout", ev => {
  const t = ev.target.closest && ev.target.closest(".chip[data-reader]");
  if (t && !(ev.relatedTarget && t.contains(ev.relatedTarget))) light(null);
});
document.addEventListener("click", ev => {
  const t = ev.target.closest("[data-pair],[data-device],[data-sa],.chip[data-reader]");
  if (!t) return;
  if (t.dataset.pair) location.hash = "pair=" + t.dataset.pair;
  else if (t.dataset.device) location.hash = "device=" + encodeURIComponent(t.dataset.device);
  else if (t.dataset.reader) location.hash = "device=" + encodeURIComponent(t.dataset.reader);
  else location.hash = "sa=" + t.dataset.sa;
});
window.addEventListener("hashchange", route);
route();
void document.body.offsetHeight; // style and layout now, so the time below includes them
document.documentElement.dataset.rendered = String(Math.round(performance.now()));
</script>
</body>
</html>
`))
