// Command promql-names parses PromQL expressions with Prometheus' own parser and prints, for each, the metric names
// its selectors read, or the parse error. The chart's tests use it to check that every dashboard query and alert
// expression parses and reads only metrics the operator exports (promtool parses rule files, but it has no command
// that lists the metrics an expression reads).
//
// Input: a JSON array of strings on stdin. Output: a JSON array of {"expr", "metrics", "error"} in the same order.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics"`
	Error   string   `json:"error,omitempty"`
}

func names(expr string) ([]string, error) {
	node, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var failure error
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		selector, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		if selector.Name != "" {
			seen[selector.Name] = true
			return nil
		}
		for _, m := range selector.LabelMatchers {
			if m.Name == labels.MetricName {
				if m.Type != labels.MatchEqual {
					failure = fmt.Errorf("selector %s matches metric names by pattern; name them", selector)
				}
				seen[m.Value] = true
			}
		}
		return nil
	})
	if failure != nil {
		return nil, failure
	}
	out := make([]string, 0, len(seen))
	for name := range seen {
		out = append(out, name)
	}
	sort.Strings(out)
	return out, nil
}

func main() {
	var exprs []string
	if err := json.NewDecoder(os.Stdin).Decode(&exprs); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names: stdin is not a JSON array of strings:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(exprs))
	for _, expr := range exprs {
		metrics, err := names(expr)
		r := result{Expr: expr, Metrics: metrics}
		if r.Metrics == nil {
			r.Metrics = []string{}
		}
		if err != nil {
			r.Error = err.Error()
		}
		results = append(results, r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names:", err)
		os.Exit(1)
	}
}
