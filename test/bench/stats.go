package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Result is one line of the printed table.
type Result struct {
	Row    string    // "1a", "2", ...
	What   string    // what was measured
	Unit   string    // ms, /s, MiB, KiB, s, count
	Sample []float64 // the measurements (in Unit)
	Goal   string    // human-readable goal, e.g. "p50 ≤ 10, p99 ≤ 50"
	// Check tells whether the goal is met; nil means no goal.
	Check func(s Stats) bool
	Note  string
	Err   error // the row could not be measured
}

// Stats summarises a sample.
type Stats struct {
	N                           int
	Min, Median, P99, Max, Mean float64
}

func summarize(xs []float64) Stats {
	if len(xs) == 0 {
		return Stats{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	return Stats{N: len(s), Min: s[0], Median: quantile(s, 0.5), P99: quantile(s, 0.99), Max: s[len(s)-1],
		Mean: sum / float64(len(s))}
}

// quantile is the nearest-rank quantile of a sorted sample.
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	if q == 0.5 && len(sorted)%2 == 0 {
		n := len(sorted)
		return (sorted[n/2-1] + sorted[n/2]) / 2
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(min(i, len(sorted)-1), 0)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func durationsMS(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = ms(d)
	}
	return out
}

// fmtNum prints a number with sensible precision.
func fmtNum(x float64) string {
	switch {
	case math.IsNaN(x):
		return "-"
	case x == 0:
		return "0"
	case math.Abs(x) >= 1000:
		return fmt.Sprintf("%.0f", x)
	case math.Abs(x) >= 100:
		return fmt.Sprintf("%.1f", x)
	case math.Abs(x) >= 10:
		return fmt.Sprintf("%.2f", x)
	}
	return fmt.Sprintf("%.3g", x)
}

// printTable renders results as a Markdown table.
func printTable(w *strings.Builder, rs []Result) {
	fmt.Fprintln(w, "| row | measurement | unit | n | median | p99 | max | goal | met | notes |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---:|---|---|---|")
	for _, r := range rs {
		if r.Err != nil {
			fmt.Fprintf(w, "| %s | %s | %s | - | - | - | - | %s | ERROR | %s |\n", r.Row, r.What, r.Unit, r.Goal,
				oneLine(r.Err.Error()))
			continue
		}
		s := summarize(r.Sample)
		met := ""
		if r.Check != nil && s.N > 0 {
			met = "no"
			if r.Check(s) {
				met = "yes"
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %d | %s | %s | %s | %s | %s | %s |\n", r.Row, r.What, r.Unit, s.N,
			fmtNum(s.Median), fmtNum(s.P99), fmtNum(s.Max), r.Goal, met, oneLine(r.Note))
	}
}

// oneLine makes text safe for one Markdown table cell.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "|", "/")), " ")
}
