package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// ---- JSON views. Field names are a contract for scripts: add, don't rename.

type resourcesJSON struct {
	CPUMin   float64 `json:"cpu_min"`   // cores
	CPUMax   float64 `json:"cpu_max"`   // cores
	CPUBurst float64 `json:"cpu_burst"` // cores
	MemMin   int64   `json:"mem_min"`   // bytes
	MemMax   int64   `json:"mem_max"`   // bytes
	Pids     int64   `json:"pids"`
}

type usageJSON struct {
	CPU        float64 `json:"cpu"`                 // recent rate, cores
	CPUSeconds float64 `json:"cpu_seconds"`         // total CPU time
	Mem        uint64  `json:"mem"`                 // bytes
	GuestMem   int64   `json:"guest_mem,omitempty"` // VMs: MemTotal inside, bytes
}

type incarnationJSON struct {
	Incarnation uint64  `json:"incarnation"`
	Node        string  `json:"node"`
	Pid         int64   `json:"pid"`
	State       string  `json:"state"`
	ExitCode    int32   `json:"exit_code"`
	Reason      string  `json:"reason"`
	Started     *string `json:"started"`
	Ended       *string `json:"ended"`
}

type processJSON struct {
	ID          string            `json:"id"`
	Name        string            `json:"name"`
	Node        string            `json:"node"`
	State       string            `json:"state"`
	Pid         int64             `json:"pid"`
	Incarnation uint64            `json:"incarnation"`
	Restarts    uint32            `json:"restarts"`
	ExitCode    int32             `json:"exit_code"`
	Reason      string            `json:"reason"`
	Command     []string          `json:"command"`
	Env         []string          `json:"env"`
	Dir         string            `json:"dir"`
	User        string            `json:"user"`
	Rootfs      string            `json:"rootfs"`
	Restart     string            `json:"restart"`
	Isolation   string            `json:"isolation"`
	Network     string            `json:"network"`
	Pinned      string            `json:"pinned_node"`
	Resources   resourcesJSON     `json:"resources"`
	Grow        string            `json:"grow"`
	Priority    int32             `json:"priority"`
	Grant       grantJSON         `json:"grant"`
	Want        *grantJSON        `json:"want"`
	WantReason  string            `json:"want_reason"`
	Usage       *usageJSON        `json:"usage"`
	Stop        bool              `json:"stop"`
	Created     *string           `json:"created"`
	Started     *string           `json:"started"`
	Finished    *string           `json:"finished"`
	Updated     *string           `json:"updated"`
	History     []incarnationJSON `json:"history"`
	CutOff      *incarnationJSON  `json:"cut_off"` // on-lost keep: a copy on a cut-off node, state unknown
	ModifyIndex uint64            `json:"modify_index"`
	// Services (services.go): set for replicas, or processes with ports
	// or a check, only.
	Service string            `json:"service,omitempty"`
	Replica *uint32           `json:"replica,omitempty"`
	Ports   map[string]uint32 `json:"ports,omitempty"`
	Health  string            `json:"health,omitempty"`
}

type amountJSON struct {
	CPU  float64 `json:"cpu"` // cores
	Mem  int64   `json:"mem"` // bytes
	Pids int64   `json:"pids,omitempty"`
}

type nodeUsageJSON struct {
	CPU float64 `json:"cpu"` // cores
	Mem uint64  `json:"mem"` // bytes
}

type nodeJSON struct {
	Name        string         `json:"name"`
	Role        string         `json:"role"`
	State       string         `json:"state"`
	Draining    bool           `json:"draining"`
	Leader      bool           `json:"leader"`
	Voter       bool           `json:"voter"`
	API         string         `json:"api"`
	Raft        string         `json:"raft"`
	Capacity    amountJSON     `json:"capacity"`
	Reserved    amountJSON     `json:"reserved"`
	Granted     amountJSON     `json:"granted"`
	Free        amountJSON     `json:"free"`
	Limit       amountJSON     `json:"limit"`
	Overcommit  uint32         `json:"overcommit_percent"`
	Processes   uint32         `json:"processes"`
	Usage       *nodeUsageJSON `json:"usage"`
	HostPaths   []string       `json:"host_paths"` // NAME, or NAME:ro
	VMs         string         `json:"vms"`        // "yes", or why not
	Joined      *string        `json:"joined"`
	Updated     *string        `json:"updated"`
	ModifyIndex uint64         `json:"modify_index"`
}

func cores(milli int64) float64 { return float64(milli) / 1000 }

// stamp is an RFC 3339 UTC time, or nil for "never".
func stamp(unixNano int64) *string {
	if unixNano == 0 {
		return nil
	}
	s := time.Unix(0, unixNano).UTC().Format(time.RFC3339Nano)
	return &s
}

func resourcesView(r *pb.Resources) resourcesJSON {
	return resourcesJSON{
		CPUMin: cores(r.GetCpuMinMilli()), CPUMax: cores(r.GetCpuMaxMilli()), CPUBurst: cores(r.GetCpuBurstMilli()),
		MemMin: r.GetMemMinBytes(), MemMax: r.GetMemMaxBytes(), Pids: r.GetPidsMax(),
	}
}

func restartName(p pb.RestartPolicy) string {
	switch p {
	case pb.RestartPolicy_RESTART_POLICY_ALWAYS:
		return "always"
	case pb.RestartPolicy_RESTART_POLICY_NEVER:
		return "never"
	}
	return "on-failure"
}

func isolationName(i pb.Isolation) string {
	switch i {
	case pb.Isolation_ISOLATION_PROCESS:
		return "process"
	case pb.Isolation_ISOLATION_CONTAINER:
		return "container"
	case pb.Isolation_ISOLATION_VM:
		return "vm"
	case pb.Isolation_ISOLATION_HOST:
		return "host"
	}
	return "default"
}

func networkName(n pb.Network) string {
	if n == pb.Network_NETWORK_NONE {
		return "none"
	}
	return "host"
}

// processView is the JSON object for one process record.
func processView(r *pb.ProcessRecord) processJSON {
	s := r.GetSpec()
	v := processJSON{
		ID: r.GetId(), Name: s.GetName(), Node: r.GetNode(), State: table.StateName(r.GetState()),
		Pid: r.GetPid(), Incarnation: r.GetIncarnation(), Restarts: r.GetRestarts(),
		ExitCode: r.GetExitCode(), Reason: r.GetReason(),
		Command: append([]string{}, s.GetCommand()...), Env: append([]string{}, s.GetEnv()...),
		Dir: s.GetDir(), User: s.GetUser(), Rootfs: s.GetRootfs(),
		Restart: restartName(s.GetRestart()), Isolation: isolationName(s.GetIsolation()),
		Network: networkName(s.GetNetwork()), Pinned: s.GetNode(),
		Resources: resourcesView(s.GetResources()), Stop: r.GetStop(),
		Created: stamp(r.GetCreatedUnixNano()), Started: stamp(r.GetStartedUnixNano()),
		Finished: stamp(r.GetFinishedUnixNano()), Updated: stamp(r.GetUpdatedUnixNano()),
		History: []incarnationJSON{}, ModifyIndex: r.GetModifyIndex(),
		Grow: growName(s.GetGrow()), Priority: table.Priority(s), Grant: grantView(table.GrantOf(r)),
		WantReason: r.GetWantReason(),
	}
	if w := r.GetWant(); w != nil {
		g := grantView(w)
		v.Want = &g
	}
	serviceView(r, &v) // services.go
	if u := r.GetUsage(); u != nil {
		v.Usage = &usageJSON{CPU: cores(u.GetCpuMilli()), CPUSeconds: float64(u.GetCpuUsageNanos()) / 1e9, Mem: u.GetMemoryBytes(),
			GuestMem: u.GetGuestMemTotalBytes()}
	}
	for _, h := range r.GetHistory() {
		v.History = append(v.History, incarnationJSON{
			Incarnation: h.GetIncarnation(), Node: h.GetNode(), Pid: h.GetPid(),
			State: table.StateName(h.GetState()), ExitCode: h.GetExitCode(), Reason: h.GetReason(),
			Started: stamp(h.GetStartedUnixNano()), Ended: stamp(h.GetEndedUnixNano()),
		})
	}
	if c := r.GetCutOff(); c != nil {
		v.CutOff = &incarnationJSON{Incarnation: c.GetIncarnation(), Node: c.GetNode(), Pid: c.GetPid(),
			State: "unknown", Reason: c.GetReason(), Started: stamp(c.GetStartedUnixNano())}
	}
	return v
}

func roleName(r pb.NodeRole) string {
	switch r {
	case pb.NodeRole_NODE_ROLE_SERVER:
		return "server"
	case pb.NodeRole_NODE_ROLE_WORKER:
		return "worker"
	}
	return "unknown"
}

// nodeView is the JSON object for one node.
func nodeView(s *pb.NodeStatus) nodeJSON {
	n := s.GetNode()
	c, res, lim := n.GetCapacity(), s.GetReserved(), s.GetLimit()
	v := nodeJSON{
		Name: n.GetName(), Role: roleName(n.GetRole()), State: table.NodeStateName(n.GetState()),
		Draining: n.GetDraining(), Leader: s.GetLeader(), Voter: s.GetVoter(),
		API: n.GetApiAddr(), Raft: n.GetRaftAddr(),
		Capacity: amountJSON{CPU: cores(capCPU(c)), Mem: capMem(c), Pids: c.GetPidsMax()},
		Reserved: amountJSON{CPU: cores(res.GetCpuMinMilli()), Mem: res.GetMemMinBytes()},
		Granted:  amountJSON{CPU: cores(s.GetGranted().GetCpuMilli()), Mem: s.GetGranted().GetMemBytes()},
		Free: amountJSON{CPU: cores(max(capCPU(c)-s.GetGranted().GetCpuMilli(), 0)),
			Mem: max(capMem(c)-s.GetGranted().GetMemBytes(), 0)},
		Limit:      amountJSON{CPU: cores(lim.GetCpuMaxMilli()), Mem: lim.GetMemMaxBytes()},
		Overcommit: n.GetOvercommitPercent(), Processes: s.GetProcesses(),
		Joined: stamp(n.GetJoinedUnixNano()), Updated: stamp(n.GetUpdatedUnixNano()),
		ModifyIndex: n.GetModifyIndex(),
	}
	if u := s.GetUsage(); u != nil {
		v.Usage = &nodeUsageJSON{CPU: cores(u.GetCpuMilli()), Mem: u.GetMemoryBytes()}
	}
	v.HostPaths, v.VMs = hostPathsText(n), vmsText(n)
	return v
}

// hostPathsText lists the host paths a node offers: NAME, or NAME:ro.
func hostPathsText(n *pb.NodeRecord) []string {
	out := []string{}
	for _, h := range n.GetHostPaths() {
		if h.GetReadOnly() {
			out = append(out, h.GetName()+":ro")
		} else {
			out = append(out, h.GetName())
		}
	}
	return out
}

// vmsText says whether a node runs VMs: "yes", or why not.
func vmsText(n *pb.NodeRecord) string {
	if w := n.GetVmUnavailable(); w != "" {
		return "no: " + w
	}
	return "yes"
}

// writeJSON prints v indented, without HTML escaping.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeProcessesJSON prints recs as writeJSON prints a []processJSON, one
// record at a time through jsonWriter: `ps -o json` of 100,000 processes
// would otherwise build (and then indent) one 80 MB buffer by reflection.
func writeProcessesJSON(w io.Writer, recs []*pb.ProcessRecord) error {
	if len(recs) == 0 {
		_, err := io.WriteString(w, "[]\n")
		return err
	}
	bw := bufio.NewWriterSize(w, 256<<10)
	var b []byte
	bw.WriteString("[\n")
	for i, r := range recs {
		v := processView(r)
		b = append(b[:0], ' ', ' ')
		b = appendProcessJSON(b, &v)
		if i < len(recs)-1 {
			b = append(b, ',')
		}
		bw.Write(append(b, '\n'))
	}
	bw.WriteString("]\n")
	return bw.Flush()
}

// writeProcessesJSONPage writes one page of a JSON array of processes:
// the opening bracket with the first page, the closing one with the last.
func writeProcessesJSONPage(w io.Writer, recs []*pb.ProcessRecord, first, last bool) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	var b []byte
	if first {
		bw.WriteString("[")
	}
	for i, r := range recs {
		if !first || i > 0 {
			bw.WriteString(",")
		}
		v := processView(r)
		b = append(b[:0], '\n', ' ', ' ')
		b = appendProcessJSON(b, &v)
		bw.Write(b)
	}
	if last {
		if first && len(recs) == 0 {
			bw.WriteString("]\n")
		} else {
			bw.WriteString("\n]\n")
		}
	}
	return bw.Flush()
}

// ---- Tables.

// capCPU and capMem read a node's capacity from a node's capacity: the detected
// allocatable amount is stored as the max (falling back to the min).
func capCPU(r *pb.Resources) int64 { return max(r.GetCpuMaxMilli(), r.GetCpuMinMilli()) }
func capMem(r *pb.Resources) int64 { return max(r.GetMemMaxBytes(), r.GetMemMinBytes()) }

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func orDash[T int64 | int32 | uint32 | uint64](n T, f func(T) string) string {
	if n == 0 {
		return "-"
	}
	return f(n)
}

func itoa[T int64 | int32 | uint32 | uint64](n T) string { return strconv.FormatInt(int64(n), 10) }

// cell makes free text safe for a tabwriter cell.
func cell(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// age renders a duration like `docker ps`: 45s, 12m, 3h, 5d.
func age(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
}

// commandLine joins argv, quoting arguments that need it.
func commandLine(argv []string) string {
	parts := make([]string, len(argv))
	for i, a := range argv {
		if a == "" || strings.ContainsFunc(a, func(c rune) bool {
			return c <= ' ' || c == '"' || c == '\'' || c == '\\' || c == '$' || c == '`' || c == 0x7f
		}) {
			a = strconv.Quote(a)
		}
		parts[i] = a
	}
	return strings.Join(parts, " ")
}

func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-3]) + "..."
}

// cpuBounds renders min/max/burst in cores, "-" for unset.
func cpuBounds(r *pb.Resources) string {
	c := func(m int64) string { return orDash(m, table.Cores) }
	return c(r.GetCpuMinMilli()) + "/" + c(r.GetCpuMaxMilli()) + "/" + c(r.GetCpuBurstMilli())
}

// memBounds renders min/max with binary units, "-" for unset.
func memBounds(r *pb.Resources) string {
	b := func(n int64) string { return orDash(n, table.Bytes) }
	return b(r.GetMemMinBytes()) + "/" + b(r.GetMemMaxBytes())
}

// exitText is the exit code of a process that has exited, else "-".
func exitText(r *pb.ProcessRecord) string {
	switch r.GetState() {
	case pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED,
		pb.ProcessState_PROCESS_STATE_KILLED, pb.ProcessState_PROCESS_STATE_BACKOFF:
		return itoa(r.GetExitCode())
	}
	return "-"
}

// usageText renders the recent CPU rate (percent of one core) and memory.
func usageText(r *pb.ProcessRecord) (cpu, mem string) {
	u := r.GetUsage()
	if u == nil || r.GetState() != pb.ProcessState_PROCESS_STATE_RUNNING {
		return "-", "-"
	}
	return fmt.Sprintf("%.0f%%", float64(u.GetCpuMilli())/10), table.Bytes(int64(u.GetMemoryBytes()))
}

// guestMemText is a running VM's memory as its guest sees it (MemTotal).
func guestMemText(r *pb.ProcessRecord) string {
	if m := r.GetUsage().GetGuestMemTotalBytes(); m > 0 && r.GetState() == pb.ProcessState_PROCESS_STATE_RUNNING {
		return table.Bytes(m)
	}
	return "-"
}

// writeProcessTable prints the `shim ps` table; wide adds bounds, usage and
// the reason; history adds a row under each process for every earlier
// incarnation (moved off a lost node, fenced, or moved by a drain), with why
// it ended in place of the command.
func writeProcessTable(w io.Writer, recs []*pb.ProcessRecord, wide, history bool, now time.Time) error {
	return writeProcessTablePage(w, recs, wide, history, now, true)
}

// writeProcessTablePage writes one page of the process table, with the
// header if first.
func writeProcessTablePage(w io.Writer, recs []*pb.ProcessRecord, wide, history bool, now time.Time, first bool) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	head := "ID\tNAME\tNODE\tSTATE\tPID\tINC\tRESTARTS\tEXIT\tAGE"
	if wide {
		head += "\tISOLATION\tCPU(MIN/MAX/BURST)\tMEM(MIN/MAX)\tPIDS\tGRANT(CPU/MEM)\tCPU%\tMEMUSED\tGUESTMEM\tREASON"
	} else {
		head += "\tCPU%\tMEM"
	}
	if first {
		fmt.Fprintln(tw, head+"\tCOMMAND")
	}
	for _, r := range recs {
		s := r.GetSpec()
		row := []string{
			r.GetId(), nameText(r), dash(r.GetNode()), stateText(r),
			orDash(r.GetPid(), itoa), itoa(r.GetIncarnation()), itoa(r.GetRestarts()), exitText(r),
			orDash(r.GetCreatedUnixNano(), func(n int64) string { return age(now.Sub(time.Unix(0, n))) }),
		}
		cmd := cell(commandLine(s.GetCommand()))
		if wide {
			cpu, mem := usageText(r)
			reason := r.GetReason()
			if w := r.GetWantReason(); w != "" {
				reason = "growth waits: " + w
			}
			row = append(row, isolationName(s.GetIsolation()), cpuBounds(s.GetResources()), memBounds(s.GetResources()),
				orDash(s.GetResources().GetPidsMax(), itoa), grantText(r), cpu, mem, guestMemText(r), dash(cell(reason)), cmd)
		} else {
			cpu, mem := usageText(r)
			row = append(row, cpu, mem, truncate(cmd, 40))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
		if c := r.GetCutOff(); c != nil {
			// A copy that may still run on a cut-off node (on-lost keep):
			// shown always, not only with -a.
			fmt.Fprintln(tw, strings.Join(cutOffRow(c, wide), "\t"))
		}
		if history {
			for _, h := range slices.Backward(r.GetHistory()) {
				fmt.Fprintln(tw, strings.Join(historyRow(h, wide, now), "\t"))
			}
		}
	}
	return tw.Flush()
}

// cutOffRow renders the copy of a process kept on a cut-off node (on-lost
// keep) under its row: its state is unknown until the node comes back.
func cutOffRow(c *pb.Incarnation, wide bool) []string {
	row := []string{"  └─", "", dash(c.GetNode()), "unknown", orDash(c.GetPid(), itoa), itoa(c.GetIncarnation()), "", "-", "-"}
	why := "(" + dash(cell(c.GetReason())) + ")"
	if wide {
		return append(row, "", "", "", "", "", "", "", "", why, "")
	}
	return append(row, "", "", why)
}

// historyRow renders an earlier incarnation under its process's row.
func historyRow(h *pb.Incarnation, wide bool, now time.Time) []string {
	exit := "-"
	if h.GetState() != pb.ProcessState_PROCESS_STATE_KILLED || h.GetExitCode() != 0 {
		exit = itoa(h.GetExitCode())
	}
	row := []string{
		"  └─", "", dash(h.GetNode()), table.StateName(h.GetState()), orDash(h.GetPid(), itoa), itoa(h.GetIncarnation()), "", exit,
		orDash(h.GetEndedUnixNano(), func(n int64) string { return "ended " + age(now.Sub(time.Unix(0, n))) + " ago" }),
	}
	why := "(" + dash(cell(h.GetReason())) + ")"
	if wide {
		return append(row, "", "", "", "", "", "", "", "", why, "")
	}
	return append(row, "", "", why)
}

// nodeStateText is the node state, with ",draining" appended when draining.
func nodeStateText(n *pb.NodeRecord) string {
	s := table.NodeStateName(n.GetState())
	if n.GetDraining() {
		s += ",draining"
	}
	return s
}

// writeNodeTable prints the `shim nodes` table.
func writeNodeTable(w io.Writer, nodes []*pb.NodeStatus) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tSTATE\tLEADER\tAPI\tCPU(used/granted/free/cap)\tMEM(used/granted/free/cap)\tPROCS\tVMS\tHOSTPATHS")
	for _, s := range nodes {
		n, c, g, u := s.GetNode(), s.GetNode().GetCapacity(), s.GetGranted(), s.GetUsage()
		cpuUsed, memUsed := "-", "-"
		if u != nil {
			cpuUsed, memUsed = table.Cores(u.GetCpuMilli()), table.Bytes(int64(u.GetMemoryBytes()))
		}
		vms := "yes"
		if n.GetVmUnavailable() != "" {
			vms = "no" // why: shim nodes -o json
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%t\t%s\t%s/%s/%s/%s\t%s/%s/%s/%s\t%d\t%s\t%s\n",
			n.GetName(), roleName(n.GetRole()), nodeStateText(n), s.GetLeader(), dash(n.GetApiAddr()),
			cpuUsed, table.Cores(g.GetCpuMilli()), table.Cores(max(capCPU(c)-g.GetCpuMilli(), 0)), table.Cores(capCPU(c)),
			memUsed, table.Bytes(g.GetMemBytes()), table.Bytes(max(capMem(c)-g.GetMemBytes(), 0)), table.Bytes(capMem(c)),
			s.GetProcesses(), vms, dash(strings.Join(hostPathsText(n), ",")))
	}
	return tw.Flush()
}
