// Package metrics defines the Prometheus series shimd exports on /metrics.
package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the Prometheus series shimd exports on /metrics.
type Metrics struct {
	reg             *prometheus.Registry
	ApplyLatency    prometheus.Histogram
	Placements      prometheus.Counter
	LeaseExpiries   prometheus.Counter
	ProcessStarts   prometheus.Counter
	ProcessFailures prometheus.Counter
	StartLatency    prometheus.Histogram
	RestartLatency  prometheus.Histogram
	Fenced          prometheus.Counter
	Heartbeats      prometheus.Counter
	BatchSize       prometheus.Histogram
	// Growth: on servers, the grant changes and moves to make room their
	// replica applied; on nodes, what their growth loop asked and how long
	// a growth took to come into force.
	Grants       *prometheus.CounterVec
	RoomMoves    prometheus.Counter
	GrowRequests *prometheus.CounterVec
	GrowLatency  prometheus.Histogram
}

// New registers shim's series on reg (a new registry if nil).
func New(reg *prometheus.Registry) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	buckets := prometheus.ExponentialBuckets(0.0005, 2, 16) // 0.5 ms .. 16 s
	m := &Metrics{
		reg: reg,
		ApplyLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shim_raft_apply_seconds",
			Help: "Time to commit and apply one command through Raft on the leader, waiting for its batch included.", Buckets: buckets}),
		Placements: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_placements_total",
			Help: "Processes placed by spawn requests."}),
		LeaseExpiries: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_lease_expirations_total",
			Help: "Nodes declared down because their lease expired."}),
		ProcessStarts: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_process_starts_total",
			Help: "Processes started by this node."}),
		ProcessFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_process_start_failures_total",
			Help: "Process starts that failed on this node."}),
		StartLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shim_process_start_seconds",
			Help: "Time for this node to start one process in its sandbox.", Buckets: buckets}),
		RestartLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shim_restart_seconds",
			Help: "Time from a node's lease expiry being declared to its processes being placed elsewhere.", Buckets: buckets}),
		Fenced: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_fenced_processes_total",
			Help: "Processes this node stopped because it lost its lease or the table moved them."}),
		Heartbeats: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_heartbeats_total",
			Help: "Lease renewals this server granted as leader."}),
		BatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shim_raft_batch_commands",
			Help: "Commands the leader committed together in one Raft entry.", Buckets: prometheus.ExponentialBuckets(1, 2, 11)}),
		Grants: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shim_grants_total",
			Help: "Grant changes this server's table applied, by change: grown, shrunk, waiting (for room), cancelled."}, []string{"change"}),
		RoomMoves: prometheus.NewCounter(prometheus.CounterOpts{Name: "shim_room_moves_total",
			Help: "Moves to make room for a growth that this server's table applied."}),
		GrowRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shim_grow_requests_total",
			Help: "Grant changes this node's growth loop asked for, by resource (cpu, memory) and action (grow, shrink)."}, []string{"resource", "action"}),
		GrowLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "shim_grow_seconds",
			Help: "Time from this node's decision to grow to the new limit being in force.", Buckets: buckets}),
	}
	reg.MustRegister(m.ApplyLatency, m.Placements, m.LeaseExpiries, m.ProcessStarts, m.ProcessFailures,
		m.StartLatency, m.RestartLatency, m.Fenced, m.Heartbeats, m.BatchSize, m.Grants, m.RoomMoves, m.GrowRequests, m.GrowLatency)
	return m
}

// TableStates exports shim_processes{state}: how many process records the
// table holds in each state, read from states at every scrape (a server's
// own replica). Calling it again replaces nothing: the first one stays.
func (m *Metrics) TableStates(states func() map[string]int) {
	_ = m.reg.Register(&stateCollector{states: states})
}

var processesDesc = prometheus.NewDesc("shim_processes", "Process records in the table, by state.", []string{"state"}, nil)

type stateCollector struct{ states func() map[string]int }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- processesDesc }

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	for st, n := range c.states() {
		ch <- prometheus.MustNewConstMetric(processesDesc, prometheus.GaugeValue, float64(n), st)
	}
}

// Handler serves the registry in Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
