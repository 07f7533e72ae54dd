package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// Growth on the command line: spawn's --grow and --priority, `shim grant`
// and `shim events`.

// growFlags are spawn's flags for elastic processes.
type growFlags struct {
	grow, priority string
}

func (o *growFlags) add(f *pflag.FlagSet) {
	f.StringVar(&o.grow, "grow", "", "let the grant follow the load within MIN:MAX: on, or move (it may also move itself to grow); off by default")
	f.Lookup("grow").NoOptDefVal = "on"
	f.StringVar(&o.priority, "priority", "", fmt.Sprintf("`N` 0-%d (default %d): lower moves first to make room for another's growth",
		table.MaxPriority, table.DefaultPriority))
}

// apply sets the spec's grow mode and priority from the flags.
func (o *growFlags) apply(flags *pflag.FlagSet, s *pb.ProcessSpec) error {
	if flags.Changed("grow") {
		g, ok := map[string]pb.Grow{"off": pb.Grow_GROW_OFF, "on": pb.Grow_GROW_ON, "move": pb.Grow_GROW_MOVE}[o.grow]
		if !ok {
			return flagError("grow", o.grow, errors.New("use on, move or off"))
		}
		s.Grow = g
	}
	if flags.Changed("priority") {
		n, err := strconv.ParseInt(o.priority, 10, 32)
		if err != nil || n < 0 || n > table.MaxPriority {
			return flagError("priority", o.priority, fmt.Errorf("use a whole number 0-%d", table.MaxPriority))
		}
		p := int32(n)
		s.Priority = &p
	}
	return nil
}

func growName(g pb.Grow) string {
	switch g {
	case pb.Grow_GROW_ON:
		return "on"
	case pb.Grow_GROW_MOVE:
		return "move"
	}
	return "off"
}

func (a *app) grantCmd() *cobra.Command {
	var cpu, mem string
	cmd := &cobra.Command{
		Use:   "grant ID [--cpu CORES] [--mem BYTES]",
		Short: "Set a process's grant within its bounds",
		Long: "Set a process's grant: the part of its bounds its node promises it, and for a\n" +
			"process spawned with --grow, its limits (memory: the grant plus a little headroom;\n" +
			"CPU: a quota of the grant). Only the values given change. What the node can hold\n" +
			"is granted at once; for the rest, other processes move off the node\n" +
			"make-before-break, and the grant follows when they have (shim ps -o wide and\n" +
			"shim events show it). Prints the grant, and what still waits and why.",
		Args: exactArgs(1, "one process ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			g := &pb.Grant{}
			var err error
			set := cmd.Flags().Changed
			if set("cpu") {
				if g.CpuMilli, err = parseCores(cpu); err != nil || g.CpuMilli <= 0 {
					return flagError("cpu", cpu, orErr(err, "must be more than 0"))
				}
			}
			if set("mem") {
				if g.MemBytes, err = parseBytes(mem); err != nil || g.MemBytes <= 0 {
					return flagError("mem", mem, orErr(err, "must be more than 0"))
				}
			}
			if !set("cpu") && !set("mem") {
				return usagef("nothing to grant: give --cpu, --mem or both")
			}
			var rec *pb.ProcessRecord
			err = a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: args[0], Grant: g, Reason: "shim grant"}))
				if err == nil {
					rec = resp.Msg.GetProcess()
				}
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintln(a.out, grantLine(rec))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cpu, "cpu", "", "CPU grant in `CORES`")
	f.StringVar(&mem, "mem", "", "memory grant in `BYTES` (K, M, G or T units)")
	return cmd
}

func orErr(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}

// grantLine renders a process's grant: "ID grant=0.5/96M node=n1", and the
// growth that waits: " want=1/512M (waiting for room: ...)".
func grantLine(rec *pb.ProcessRecord) string {
	g := table.GrantOf(rec)
	line := fmt.Sprintf("%s grant=%s/%s node=%s", rec.GetId(), table.Cores(g.CpuMilli), table.Bytes(g.MemBytes), dash(rec.GetNode()))
	if w := rec.GetWant(); w != nil {
		line += fmt.Sprintf(" want=%s/%s (%s)", table.Cores(w.CpuMilli), table.Bytes(w.MemBytes), cell(rec.GetWantReason()))
	}
	if m := rec.GetMoveTo(); m != "" {
		line += " move-to=" + m
	}
	return line
}

// grantText is the GRANT cell of `ps -o wide`: cpu/mem, and what waits.
func grantText(r *pb.ProcessRecord) string {
	if table.Terminal(r.GetState()) {
		return "-"
	}
	g := table.GrantOf(r)
	s := table.Cores(g.CpuMilli) + "/" + table.Bytes(g.MemBytes)
	if w := r.GetWant(); w != nil {
		s += "→" + table.Cores(w.CpuMilli) + "/" + table.Bytes(w.MemBytes)
	}
	return s
}

type grantJSON struct {
	CPU float64 `json:"cpu"` // cores
	Mem int64   `json:"mem"` // bytes
}

func grantView(g *pb.Grant) grantJSON {
	return grantJSON{CPU: cores(g.GetCpuMilli()), Mem: g.GetMemBytes()}
}

func (w *jsonWriter) grant(k string, g *grantJSON) {
	w.key(k)
	if g == nil {
		w.b = append(w.b, "null"...)
		return
	}
	w.open('{')
	w.float("cpu", g.CPU)
	w.int("mem", g.Mem)
	w.close('}')
}

// ---- shim events

type eventJSON struct {
	Index  uint64 `json:"index"`
	Time   string `json:"time"`
	Type   string `json:"type"`
	ID     string `json:"id"`
	Node   string `json:"node"`
	Reason string `json:"reason"`
}

func (a *app) eventsCmd() *cobra.Command {
	var follow bool
	var output, since string
	var types []string
	cmd := &cobra.Command{
		Use:   "events [-f] [-o text|json] [--since INDEX] [--type TYPE]...",
		Short: "Print what happened in the cluster",
		Long: "Print the cluster's recent events, oldest first, one a line: index, time, type,\n" +
			"process, node and why. Types: process.placed, process.running, process.exited,\n" +
			"process.failed, process.killed, process.stopping, process.moving, process.moved,\n" +
			"process.move_failed, process.resized, process.grown, process.shrunk,\n" +
			"process.waiting, process.room (moved to make room for another), node.joined,\n" +
			"node.up, node.down, node.left, node.drained, node.undrained, node.removed.\n" +
			"--type takes a type or a prefix ending in a dot (node.). With --since, only the\n" +
			"events after that index: resume from the last index printed. With -f, keep\n" +
			"printing new events until Ctrl-C.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "text", "json"); err != nil {
				return err
			}
			req := &pb.EventsRequest{Follow: follow, Types: types}
			if cmd.Flags().Changed("since") {
				n, err := strconv.ParseUint(since, 10, 64)
				if err != nil {
					return flagError("since", since, errors.New("use a table index, a whole number"))
				}
				req.Since = n
			}
			for _, t := range types {
				if t == "" || strings.ContainsAny(t, " \t") {
					return flagError("type", t, errors.New("use a type such as process.grown, or a prefix such as node."))
				}
			}
			return a.events(cmd.Context(), req, output == "json")
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&follow, "follow", "f", false, "keep printing new events until Ctrl-C")
	f.StringVarP(&output, "output", "o", "text", "output `FORMAT`: text or json (one object a line)")
	f.StringVar(&since, "since", "", "only the events after table `INDEX`")
	f.StringArrayVar(&types, "type", nil, "only events of `TYPE` (repeatable; a prefix ending in . matches a family)")
	return cmd
}

// events prints the event stream (client.Events). With follow it resumes
// after the last event printed when the member it reads from goes away.
func (a *app) events(ctx context.Context, req *pb.EventsRequest, asJSON bool) error {
	if err := a.resolve(); err != nil {
		return err
	}
	err := a.cl.Events(ctx, req, func(e *pb.Event) error {
		if asJSON {
			b, err := json.Marshal(eventView(e))
			if err != nil {
				return err
			}
			_, err = a.out.Write(append(b, '\n'))
			return err
		}
		_, err := fmt.Fprintln(a.out, eventLine(e))
		return err
	})
	if ctx.Err() != nil {
		return nil // Ctrl-C
	}
	return cliErr(err)
}

func eventView(e *pb.Event) eventJSON {
	t := ""
	if s := stamp(e.UnixNano); s != nil {
		t = *s
	}
	return eventJSON{Index: e.Index, Time: t, Type: e.Type, ID: e.Id, Node: e.Node, Reason: e.Reason}
}

// eventLine is one event as text: INDEX TIME TYPE ID NODE REASON.
func eventLine(e *pb.Event) string {
	t := time.Unix(0, e.UnixNano).UTC().Format("2006-01-02T15:04:05.000Z")
	return strings.TrimSpace(fmt.Sprintf("%d %s %s %s %s %s", e.Index, t, e.Type, dash(e.Id), dash(e.Node), cell(e.Reason)))
}
