package visibility

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"slices"
)

// ReadMap reads a map written by Map.JSON (enclave map --format json).
func ReadMap(r io.Reader) (*Map, error) {
	var m Map
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("visibility: not a map (enclave map --format json): %w", err)
	}
	for _, p := range m.Pairs {
		if p.A > p.B {
			return nil, fmt.Errorf("visibility: not a map: pair %d-%d out of order", p.A, p.B)
		}
	}
	return &m, nil
}

// diffEdge is a pair's line in the drawing of a diff, classed by what
// changes on it.
type diffEdge struct {
	edge
	Class string
	Title string
}

type diffPage struct {
	Org    string
	Diff   *Diff
	Groups []Group
	Geo    geometry
	Nodes  []node
	Edges  []diffEdge
}

// DiffHTML writes the difference from map a to map b as one
// self-contained page: b's enclave graph with each pair classed by what
// changes on it (sight gained, lost, both; newly allowed or forbidden;
// rotated), and the changes listed by device.
func DiffHTML(w io.Writer, a, b *Map) error {
	d := Compare(a, b)
	p := diffPage{Org: b.Org, Diff: d, Groups: d.Groups()}
	pairs := slices.Clone(b.Pairs)
	for _, q := range a.Pairs {
		if slices.Contains(d.Forbidden, q.Key()) {
			pairs = append(pairs, q) // drawn where it was, dashed
		}
	}
	var edges []edge
	p.Geo, p.Nodes, edges = b.layout(pairs)
	count := func(as []Access, key string) int {
		n := 0
		for _, x := range as {
			if x.Pair == key {
				n++
			}
		}
		return n
	}
	for _, e := range edges {
		gained, lost := count(d.Gained, e.Key), count(d.Lost, e.Key)
		de := diffEdge{edge: e, Class: "same", Title: "pair " + e.Key + ": no change"}
		switch {
		case slices.Contains(d.Forbidden, e.Key):
			de.Class, de.Title = "forbidden", fmt.Sprintf("pair %s forbidden: %d readers lose sight, its SAs end", e.Key, lost)
		case slices.Contains(d.Allowed, e.Key):
			de.Class, de.Title = "allowed", fmt.Sprintf("pair %s allowed: %d readers", e.Key, gained)
		case gained > 0 && lost > 0:
			de.Class, de.Title = "both", fmt.Sprintf("pair %s: %d readers gain sight, %d lose it", e.Key, gained, lost)
		case gained > 0:
			de.Class, de.Title = "gained", fmt.Sprintf("pair %s: %d readers gain sight", e.Key, gained)
		case lost > 0:
			de.Class, de.Title = "lost", fmt.Sprintf("pair %s: %d readers lose sight", e.Key, lost)
		case count(d.Changed, e.Key) > 0:
			de.Class, de.Title = "changed", fmt.Sprintf("pair %s: a reader's right changes", e.Key)
		case slices.ContainsFunc(d.Rotated, func(r Rotation) bool { return r.Pair == e.Key }):
			de.Class, de.Title = "rotated", fmt.Sprintf("pair %s rotates: same readers, new keys", e.Key)
		}
		p.Edges = append(p.Edges, de)
	}
	return diffTemplate.Execute(w, p)
}

var diffTemplate = template.Must(template.Must(template.New("diff").Parse(baseCSS)).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Enclave visibility diff: {{.Org}}</title>
<style>
{{template "base.css"}}
svg .edge { fill: none; stroke-opacity: .8; }
svg .same { stroke: #b8c0d0; }
svg .gained, svg .allowed { stroke: #1f9d55; }
svg .lost { stroke: #d33a2c; }
svg .forbidden { stroke: #d33a2c; stroke-dasharray: 6 4; }
svg .both, svg .changed { stroke: #e08a00; }
svg .rotated { stroke: #3b6fd8; stroke-dasharray: 2 3; }
svg .node circle { fill: #fff; stroke: #1d2330; stroke-width: 2; }
svg .node text { font-size: 13px; text-anchor: middle; dominant-baseline: middle; }
svg .node text.name { font-size: 12px; fill: #444; }
.legend span { display: inline-block; margin-right: 12px; }
.sw { display: inline-block; width: 18px; height: 4px; vertical-align: middle; margin-right: 4px; }
li.gains { color: #1f7a43; } li.loses { color: #b02a1e; } li.changes { color: #9a5f00; }
.empty { color: #888; }
</style>
</head>
<body>
<header><h1>What changes in who can read what: {{.Org}}</h1>
<p>{{len .Diff.Gained}} sights gained, {{len .Diff.Lost}} lost, {{len .Diff.Changed}} rights changed; {{len .Diff.Allowed}} pairs allowed, {{len .Diff.Forbidden}} forbidden, {{len .Diff.Rotated}} rotated.</p></header>
<main>
<section><h2>Enclaves and pairs</h2>
<svg id="graph" width="520" height="460" viewBox="0 0 520 460" role="img" aria-label="enclave graph of the change">
{{range .Edges}}{{if .Loop}}<circle class="edge {{.Class}}" data-pair="{{.Key}}" cx="{{.X2}}" cy="{{.Y2}}" r="14" stroke-width="{{.Width}}"><title>{{.Title}}</title></circle>{{else}}<line class="edge {{.Class}}" data-pair="{{.Key}}" x1="{{.X1}}" y1="{{.Y1}}" x2="{{.X2}}" y2="{{.Y2}}" stroke-width="{{.Width}}"><title>{{.Title}}</title></line>{{end}}
{{end}}{{range .Nodes}}<g class="node"><circle cx="{{.X}}" cy="{{.Y}}" r="26"></circle><text x="{{.X}}" y="{{.Y}}">{{.Display}}</text><text class="name" x="{{.LX}}" y="{{.LY}}">{{.Name}}</text></g>
{{end}}</svg>
<p class="legend"><span><i class="sw" style="background:#1f9d55"></i>sight gained or pair allowed</span><span><i class="sw" style="background:#d33a2c"></i>sight lost (dashed: pair forbidden)</span><span><i class="sw" style="background:#e08a00"></i>both, or a right changed</span><span><i class="sw" style="background:#3b6fd8"></i>rotated only</span><span><i class="sw" style="background:#b8c0d0"></i>no change</span></p>
</section>
<section id="changes"><h2>Who gains and who loses sight</h2>
{{if .Groups}}<ul>{{range .Groups}}<li class="{{.Change}}" data-device="{{.Device}}"><strong>{{.Device}}</strong> ({{.Role}}) {{.Change}} {{if eq .Change "changes"}}its right to {{.Right}} (from {{.From}}) on{{else}}sight of{{end}} {{len .Pairs}} pair(s): {{range .Pairs}}<span data-pair="{{.}}">{{.}}</span> {{end}}{{if ne .Change "changes"}}<span class="empty">— {{.Right}}</span>{{end}}</li>
{{end}}</ul>{{else}}<p class="empty">Nobody gains or loses sight.</p>{{end}}
{{if .Diff.Allowed}}<p>Pairs allowed: {{range .Diff.Allowed}}{{.}} {{end}}</p>{{end}}
{{if .Diff.Forbidden}}<p>Pairs forbidden (their SAs end): {{range .Diff.Forbidden}}{{.}} {{end}}</p>{{end}}
{{if .Diff.Rotated}}<p>Pairs that rotate (their SAs re-establish): {{range .Diff.Rotated}}{{.Pair}} ({{.From}} → {{.To}}) {{end}}</p>{{end}}
{{if .Diff.EnclavesAdded}}<p>Enclaves added: {{range .Diff.EnclavesAdded}}{{.}} {{end}}</p>{{end}}
{{if .Diff.DevicesAdded}}<p>Devices added: {{range .Diff.DevicesAdded}}{{.}} {{end}}</p>{{end}}
{{if .Diff.DevicesRevoked}}<p>Devices revoked: {{range .Diff.DevicesRevoked}}{{.}} {{end}}</p>{{end}}
</section>
</main>
</body>
</html>
`))
