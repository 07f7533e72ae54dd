package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// Services: `shim scale`, `shim endpoints`, `shim services`, and spawn's
// --port and --check flags.

// serviceFlags are spawn's service flags.
type serviceFlags struct {
	ports                                  []string
	check, interval, timeout, restartAfter string
}

func (o *serviceFlags) add(f *pflag.FlagSet) {
	f.StringArrayVar(&o.ports, "port", nil, "ask for a port `NAME[:N]`: N fixed, or one the node picks; the process sees $SHIM_PORT_<NAME> (repeatable)")
	f.StringVar(&o.check, "check", "", "health `CHECK`: http:PORTNAME:/path, tcp:PORTNAME or exec:CMD [ARG...]")
	f.StringVar(&o.interval, "check-interval", "", "time between health checks `DURATION` (default 1s)")
	f.StringVar(&o.timeout, "check-timeout", "", "health check timeout `DURATION` (default 1s)")
	f.StringVar(&o.restartAfter, "check-restart", "", "restart a run unhealthy this long `DURATION` (default 30s; 0 never)")
}

// apply sets spec's ports and check from the flags.
func (o *serviceFlags) apply(flags *pflag.FlagSet, s *pb.ProcessSpec) error {
	for _, p := range o.ports {
		ps, err := parsePort(p)
		if err != nil {
			return flagError("port", p, err)
		}
		s.Ports = append(s.Ports, ps)
	}
	if flags.Changed("check") {
		c, err := parseCheck(o.check)
		if err != nil {
			return flagError("check", o.check, err)
		}
		s.Check = c
	}
	for _, d := range []struct {
		flag, v string
		to      *int64
		zero    int64
	}{
		{"check-interval", o.interval, nil, 0}, {"check-timeout", o.timeout, nil, 0}, {"check-restart", o.restartAfter, nil, -1},
	} {
		if !flags.Changed(d.flag) {
			continue
		}
		if s.Check == nil {
			return usagef("--%s needs --check", d.flag)
		}
		v, err := time.ParseDuration(d.v)
		if err != nil || v < 0 {
			return flagError(d.flag, d.v, fmt.Errorf("not a duration like 500ms or 2s"))
		}
		ms := v.Milliseconds()
		if ms == 0 {
			ms = d.zero
			if ms == 0 {
				return flagError(d.flag, d.v, fmt.Errorf("must be at least 1ms"))
			}
		}
		switch d.flag {
		case "check-interval":
			s.Check.IntervalMillis = ms
		case "check-timeout":
			s.Check.TimeoutMillis = ms
		default:
			s.Check.RestartAfterMillis = ms
		}
	}
	return nil
}

// parsePort reads NAME[:N]; the name is upper-cased.
func parsePort(v string) (*pb.PortSpec, error) {
	name, num, fixed := strings.Cut(v, ":")
	p := &pb.PortSpec{Name: strings.ToUpper(name)}
	if fixed {
		n, err := strconv.ParseUint(num, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("port %q is not 1-65535", num)
		}
		p.Port = uint32(n)
	}
	return p, nil
}

// parseCheck reads http:PORT:/path, tcp:PORT or exec:CMD [ARG...].
func parseCheck(v string) (*pb.HealthCheck, error) {
	kind, rest, _ := strings.Cut(v, ":")
	switch kind {
	case "http":
		port, path, ok := strings.Cut(rest, ":")
		if !ok || port == "" {
			return nil, fmt.Errorf("want http:PORTNAME:/path")
		}
		return &pb.HealthCheck{Kind: kind, Port: strings.ToUpper(port), Path: path}, nil
	case "tcp":
		if rest == "" {
			return nil, fmt.Errorf("want tcp:PORTNAME")
		}
		return &pb.HealthCheck{Kind: kind, Port: strings.ToUpper(rest)}, nil
	case "exec":
		argv := strings.Fields(rest)
		if len(argv) == 0 {
			return nil, fmt.Errorf("want exec:CMD [ARG...]")
		}
		return &pb.HealthCheck{Kind: kind, Command: argv}, nil
	}
	return nil, fmt.Errorf("unknown kind %q: use http:PORTNAME:/path, tcp:PORTNAME or exec:CMD", kind)
}

func (a *app) scaleCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "scale NAME N",
		Short: "Set how many replicas a service runs",
		Long: "Set how many replicas a service (made by spawn --name NAME --count N) runs. The\n" +
			"replicas with the highest indexes stop first; new ones take the lowest free\n" +
			"indexes. Scaling to 0 stops the service and forgets it.",
		Example: "  shim scale web 5",
		Args:    exactArgs(2, "a service name and a count"),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := strconv.Atoi(args[1])
			if err != nil {
				return usagef("count %q is not a number", args[1])
			}
			if n < 0 || n > table.MaxSpawnIDs {
				return usagef("count %d must be 0-%d", n, table.MaxSpawnIDs)
			}
			var out *pb.ScaleResponse
			err = a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.Scale(ctx, connect.NewRequest(&pb.ScaleRequest{Name: args[0], Count: int32(n)}))
				if err == nil {
					out = resp.Msg
				}
				return err
			})
			if err != nil {
				return err
			}
			if out.GetService() == nil {
				fmt.Fprintf(a.out, "%s: stopped\n", args[0])
				return nil
			}
			fmt.Fprintf(a.out, "%s: %d replicas\n", args[0], out.GetService().GetCount())
			return nil
		},
	}
	cmd.Flags().SetInterspersed(false) // "scale web -1" is a count, refused as one
	return cmd
}

// endpointJSON is one line of `shim endpoints -o json`.
type endpointJSON struct {
	ID      string            `json:"id"`
	Node    string            `json:"node"`
	Address string            `json:"address"`
	Replica uint32            `json:"replica"`
	Ports   map[string]uint32 `json:"ports"`
}

func (a *app) endpointsCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "endpoints NAME [-o table|json]",
		Short: "List the healthy replicas of a service: id, node, address, ports",
		Args:  exactArgs(1, "a service name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "table", "json"); err != nil {
				return err
			}
			var eps []*pb.Endpoint
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.Endpoints(ctx, connect.NewRequest(&pb.EndpointsRequest{Name: args[0], Consistency: a.consistency()}))
				if err == nil {
					eps = resp.Msg.GetEndpoints()
				}
				return err
			})
			if err != nil {
				return err
			}
			return writeEndpoints(a.out, eps, output == "json")
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

func writeEndpoints(w io.Writer, eps []*pb.Endpoint, asJSON bool) error {
	if asJSON {
		out := make([]endpointJSON, 0, len(eps))
		for _, e := range eps {
			ports := e.GetPorts()
			if ports == nil {
				ports = map[string]uint32{}
			}
			out = append(out, endpointJSON{ID: e.GetId(), Node: e.GetNode(), Address: e.GetAddress(), Replica: e.GetReplica(), Ports: ports})
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tREPLICA\tNODE\tADDRESS\tPORTS")
	for _, e := range eps {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", e.GetId(), e.GetReplica(), e.GetNode(), e.GetAddress(), portsText(e.GetPorts()))
	}
	return tw.Flush()
}

// portsText formats ports as "ADMIN=9000,HTTP=20000", or "-".
func portsText(ports map[string]uint32) string {
	if len(ports) == 0 {
		return "-"
	}
	names := make([]string, 0, len(ports))
	for n := range ports {
		names = append(names, n)
	}
	sort.Strings(names)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s=%d", n, ports[n])
	}
	return strings.Join(parts, ",")
}

func (a *app) servicesCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "services [-o table|json]",
		Short: "List services: name, desired replicas, and why fewer run if they do",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "table", "json"); err != nil {
				return err
			}
			var svcs []*pb.ServiceRecord
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.Services(ctx, connect.NewRequest(&pb.ServicesRequest{Consistency: a.consistency()}))
				if err == nil {
					svcs = resp.Msg.GetServices()
				}
				return err
			})
			if err != nil {
				return err
			}
			if output == "json" {
				type svcJSON struct {
					Name    string   `json:"name"`
					Count   uint32   `json:"count"`
					Command []string `json:"command"`
					Reason  string   `json:"reason"`
				}
				out := make([]svcJSON, 0, len(svcs))
				for _, s := range svcs {
					out = append(out, svcJSON{s.GetName(), s.GetCount(), append([]string{}, s.GetSpec().GetCommand()...), s.GetReason()})
				}
				enc := json.NewEncoder(a.out)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			tw := tabwriter.NewWriter(a.out, 0, 8, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tCOUNT\tREASON\tCOMMAND")
			for _, s := range svcs {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", s.GetName(), s.GetCount(), dash(s.GetReason()), truncate(commandLine(s.GetSpec().GetCommand()), 40))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

// ---- ps: replicas grouped, with their health ----

// serviceView adds a replica's service fields to its JSON view.
func serviceView(r *pb.ProcessRecord, v *processJSON) {
	if r.GetService() != "" {
		v.Service = r.GetService()
		n := r.GetReplica()
		v.Replica = &n
	}
	if len(r.GetPorts()) > 0 {
		v.Ports = r.GetPorts()
	}
	if r.GetSpec().GetCheck() != nil {
		v.Health = table.HealthName(r)
	}
}

func appendServiceJSON(w *jsonWriter, v *processJSON) {
	if v.Service != "" {
		w.str("service", v.Service)
	}
	if v.Replica != nil {
		w.uint("replica", uint64(*v.Replica))
	}
	if len(v.Ports) > 0 {
		w.key("ports")
		w.open('{')
		names := make([]string, 0, len(v.Ports))
		for n := range v.Ports {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			w.uint(n, uint64(v.Ports[n]))
		}
		w.close('}')
	}
	if v.Health != "" {
		w.str("health", v.Health)
	}
}

// groupReplicas orders recs so that the replicas of each service follow
// one another by replica index, where the first of them was.
func groupReplicas(recs []*pb.ProcessRecord) []*pb.ProcessRecord {
	first := map[string]int{}
	for i, r := range recs {
		if s := r.GetService(); s != "" {
			if _, ok := first[s]; !ok {
				first[s] = i
			}
		}
	}
	if len(first) == 0 {
		return recs
	}
	out := slices.Clone(recs)
	pos := func(i int) int {
		if s := out[i].GetService(); s != "" {
			return first[s]
		}
		return i
	}
	idx := make([]int, len(out))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(x, y int) bool {
		px, py := pos(idx[x]), pos(idx[y])
		if px != py {
			return px < py
		}
		return out[idx[x]].GetReplica() < out[idx[y]].GetReplica()
	})
	res := make([]*pb.ProcessRecord, len(out))
	for i, k := range idx {
		res[i] = out[k]
	}
	return res
}

// nameText is the NAME cell: web[2] for replica 2 of service web.
func nameText(r *pb.ProcessRecord) string {
	if r.GetService() != "" {
		return fmt.Sprintf("%s[%d]", r.GetService(), r.GetReplica())
	}
	return dash(r.GetSpec().GetName())
}

// stateText is the STATE cell: running,healthy for a process with a check.
func stateText(r *pb.ProcessRecord) string {
	s := table.StateName(r.GetState())
	if r.GetSpec().GetCheck() != nil && r.GetState() == pb.ProcessState_PROCESS_STATE_RUNNING {
		s += "," + table.HealthName(r)
	}
	return s
}

// parseCount reads --count N or MIN:MAX (which starts MIN replicas).
func (o *spawnOptions) parseCount() error {
	bad := func(why string) error { return flagError("count", o.countS, errors.New(why)) }
	lo, hi, ranged := strings.Cut(o.countS, ":")
	n, err := strconv.Atoi(lo)
	if err != nil {
		return bad("not a number")
	}
	if n < 1 || n > table.MaxSpawnIDs {
		return bad(fmt.Sprintf("must be 1-%d", table.MaxSpawnIDs))
	}
	o.count = n
	if !ranged {
		return nil
	}
	m, err := strconv.Atoi(hi)
	if err != nil || m < n || m > table.MaxSpawnIDs {
		return bad(fmt.Sprintf("MIN:MAX needs 1 <= MIN <= MAX <= %d", table.MaxSpawnIDs))
	}
	if o.name == "" {
		return bad("MIN:MAX autoscales a service: give it a --name")
	}
	o.min, o.max = uint32(n), uint32(m)
	return nil
}
