package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// list lists every page.
func (a *app) list(ctx context.Context, req *pb.ListRequest) ([]*pb.ProcessRecord, error) {
	var out []*pb.ProcessRecord
	err := a.listPages(ctx, req, func(resp *pb.ListResponse) error {
		out = append(out, resp.GetProcesses()...)
		return nil
	})
	return out, err
}

// listPages lists page after page (List answers in pages), handing each to
// fn as it comes. Only the first page waits (a blocking query).
func (a *app) listPages(ctx context.Context, req *pb.ListRequest, fn func(*pb.ListResponse) error) error {
	req = proto.Clone(req).(*pb.ListRequest)
	if req.PageSize == 0 {
		req.PageSize = 10000 // the most a page may hold (it stops at 4 MiB too): fewer round trips
	}
	for {
		resp, err := a.listResp(ctx, req)
		if err != nil {
			return err
		}
		if err := fn(resp); err != nil {
			return err
		}
		if resp.GetNextPageToken() == "" {
			return nil
		}
		req.PageToken, req.MinIndex, req.WaitMillis = resp.GetNextPageToken(), 0, 0
	}
}

// listResp lists, linearizably unless --stale.
func (a *app) listResp(ctx context.Context, req *pb.ListRequest) (*pb.ListResponse, error) {
	req.Consistency = a.consistency()
	var out *pb.ListResponse
	err := a.call(ctx, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
		resp, err := c.List(ctx, connect.NewRequest(req))
		if err == nil {
			out = resp.Msg
		}
		return err
	})
	return out, err
}

func (a *app) nodes(ctx context.Context) ([]*pb.NodeStatus, error) {
	resp, err := a.nodesResp(ctx)
	return resp.GetNodes(), err
}

// nodesResp lists the nodes, linearizably unless --stale.
func (a *app) nodesResp(ctx context.Context) (*pb.NodesResponse, error) {
	var out *pb.NodesResponse
	err := a.call(ctx, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
		resp, err := c.Nodes(ctx, connect.NewRequest(&pb.NodesRequest{Usage: true, Consistency: a.consistency()}))
		if err == nil {
			out = resp.Msg
		}
		return err
	})
	return out, err
}

func (a *app) psCmd() *cobra.Command {
	var all bool
	var output, node string
	cmd := &cobra.Command{
		Use:   "ps [-a] [-o table|json|wide] [ID...]",
		Short: "List processes",
		Long: "List live processes, or all of them with -a. IDs may be exact ids, unique id\n" +
			"prefixes or names; naming a process shows it even when it has finished.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "table", "json", "wide"); err != nil {
				return err
			}
			req := &pb.ListRequest{Ids: args, All: all || len(args) > 0, Node: node, Usage: output != "json"}
			if output == "json" && a.stale {
				var recs []*pb.ProcessRecord
				var st *pb.Staleness
				err := a.listPages(cmd.Context(), req, func(resp *pb.ListResponse) error {
					if st == nil {
						st = resp.GetStaleness()
					}
					recs = append(recs, resp.GetProcesses()...)
					return nil
				})
				if err != nil {
					return err
				}
				return a.writeStaleJSON(a.out, st, "processes", func(w io.Writer) error {
					return writeProcessesJSON(w, recs)
				})
			}
			// Page by page, as the pages come: a table per page (one
			// header), or one JSON array.
			first := true
			err := a.listPages(cmd.Context(), req, func(resp *pb.ListResponse) error {
				recs := resp.GetProcesses()
				defer func() { first = false }()
				if output == "json" {
					return writeProcessesJSONPage(a.out, recs, first, resp.GetNextPageToken() == "")
				}
				if len(recs) == 0 && !first {
					return nil
				}
				return writeProcessTablePage(a.out, recs, output == "wide", all, a.now(), first)
			})
			return err
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include finished processes")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table, json or wide")
	cmd.Flags().StringVar(&node, "node", "", "only processes on `NODE`")
	return cmd
}

func (a *app) printProcesses(w io.Writer, recs []*pb.ProcessRecord, output string, history bool) error {
	if output == "json" {
		return writeProcessesJSON(w, recs)
	}
	return writeProcessTable(w, groupReplicas(recs), output == "wide", history, a.now())
}

func (a *app) topCmd() *cobra.Command {
	var interval string
	var once, all bool
	cmd := &cobra.Command{
		Use:   "top [-n INTERVAL] [--once]",
		Short: "Show processes with their resource use, refreshed until Ctrl-C",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			every, err := parseInterval(interval)
			if err != nil {
				return flagError("interval", interval, err)
			}
			ctx := cmd.Context()
			tty := isTerminal(a.out)
			for {
				var frame bytes.Buffer
				if err := a.topFrame(ctx, &frame, all); err != nil {
					if ctx.Err() != nil {
						return nil // Ctrl-C
					}
					return err
				}
				if tty && !once {
					io.WriteString(a.out, "\033[H\033[2J")
				}
				if _, err := a.out.Write(frame.Bytes()); err != nil || once {
					return err
				}
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(every):
				}
			}
		},
	}
	cmd.Flags().StringVarP(&interval, "interval", "n", "2s", "refresh `INTERVAL` (2s, 500ms, or seconds)")
	cmd.Flags().BoolVar(&once, "once", false, "print one frame and exit")
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include finished processes")
	return cmd
}

// topFrame renders one `shim top` screen: a summary line and the wide table.
func (a *app) topFrame(ctx context.Context, w io.Writer, all bool) error {
	recs, err := a.list(ctx, &pb.ListRequest{All: all, Usage: true})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "shim top - %s  processes: %s", a.now().Format("15:04:05"), processSummary(recs))
	if nodes, err := a.nodes(ctx); err == nil { // the node summary is optional
		fmt.Fprintf(w, "  nodes: %s", nodeSummary(nodes))
	}
	fmt.Fprint(w, "\n\n")
	return writeProcessTable(w, recs, true, false, a.now())
}

// processSummary counts processes by state: "5 (3 running, 2 pending)".
func processSummary(recs []*pb.ProcessRecord) string {
	return countSummary(len(recs), func(yield func(string)) {
		for _, r := range recs {
			yield(table.StateName(r.GetState()))
		}
	})
}

// nodeSummary counts nodes by state and sums their usage.
func nodeSummary(nodes []*pb.NodeStatus) string {
	var cpu, capc, mem, capm int64
	for _, n := range nodes {
		cpu += n.GetUsage().GetCpuMilli()
		mem += int64(n.GetUsage().GetMemoryBytes())
		if n.GetNode().GetState() == pb.NodeState_NODE_STATE_UP {
			capc += capCPU(n.GetNode().GetCapacity())
			capm += capMem(n.GetNode().GetCapacity())
		}
	}
	s := countSummary(len(nodes), func(yield func(string)) {
		for _, n := range nodes {
			yield(nodeStateText(n.GetNode()))
		}
	})
	return fmt.Sprintf("%s  cpu: %s/%s  mem: %s/%s", s, table.Cores(cpu), table.Cores(capc), table.Bytes(mem), table.Bytes(capm))
}

func countSummary(total int, each func(func(string))) string {
	counts := map[string]int{}
	each(func(s string) { counts[s]++ })
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%d %s", counts[k], k)
	}
	if len(parts) == 0 {
		return "0"
	}
	return fmt.Sprintf("%d (%s)", total, strings.Join(parts, ", "))
}

// isTerminal reports whether w is a character device.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
