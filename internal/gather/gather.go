// Package gather reads Prometheus metrics back from a registry: the lab's
// report and the tests check what the components counted, by name and
// labels, as an operator's dashboard would.
package gather

import "github.com/prometheus/client_golang/prometheus"

// Sum adds up the values of metric name (counters and gauges) over the
// series whose labels include labels.
func Sum(g prometheus.Gatherer, name string, labels map[string]string) (float64, error) {
	fams, err := g.Gather()
	if err != nil {
		return 0, err
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue next
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum, nil
}
