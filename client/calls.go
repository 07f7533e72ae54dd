package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// NewRequestID returns a random 128-bit request id, in hex.
func NewRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Spawn starts req.Count copies (0 means 1) of req.Spec and returns their
// records. It gives req a request id if it has none and retries with it
// while answers are lost: the table answers a retry with the processes the
// first attempt made, so a spawn happens at most once.
func (c *Client) Spawn(ctx context.Context, req *pb.SpawnRequest) ([]*pb.ProcessRecord, error) {
	if req.GetRequestId() == "" {
		req.RequestId = NewRequestID()
	}
	var out []*pb.ProcessRecord
	err := c.Retry(ctx, "retry with request id "+req.GetRequestId()+" to spawn at most once",
		func(ctx context.Context, m shimv1connect.ShimServiceClient) error {
			resp, err := m.Spawn(ctx, connect.NewRequest(req))
			if err == nil {
				out = resp.Msg.GetProcesses()
			}
			return err
		})
	return out, err
}

// Kill signals processes (signal 0: SIGTERM, then SIGKILL after the grace
// period) and marks them stopped, retrying while answers are lost (a kill
// repeated changes nothing).
func (c *Client) Kill(ctx context.Context, signal int32, ids ...string) ([]*pb.ProcessRecord, error) {
	if len(ids) == 0 {
		return nil, errors.New("kill: no process ids")
	}
	var out []*pb.ProcessRecord
	err := c.Retry(ctx, "the kill may or may not have been made", func(ctx context.Context, m shimv1connect.ShimServiceClient) error {
		resp, err := m.Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: ids, Signal: signal}))
		if err == nil {
			out = resp.Msg.GetProcesses()
		}
		return err
	})
	return out, err
}

// unary runs one call under failover.
func unary[Req, Resp any](ctx context.Context, c *Client, req *Req,
	call func(shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[Req]) (*connect.Response[Resp], error),
) (*Resp, error) {
	var out *Resp
	err := c.Call(ctx, func(ctx context.Context, m shimv1connect.ShimServiceClient) error {
		resp, err := call(m)(ctx, connect.NewRequest(req))
		if err == nil {
			out = resp.Msg
		}
		return err
	})
	return out, err
}

// List returns processes: req.Ids (IDs, prefixes or names; all if empty),
// terminal ones too with req.All.
func (c *Client) List(ctx context.Context, req *pb.ListRequest) (*pb.ListResponse, error) {
	return unary(ctx, c, req, func(m shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
		return m.List
	})
}

// Nodes returns the cluster's nodes with what they hold.
func (c *Client) Nodes(ctx context.Context, req *pb.NodesRequest) (*pb.NodesResponse, error) {
	return unary(ctx, c, req, func(m shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[pb.NodesRequest]) (*connect.Response[pb.NodesResponse], error) {
		return m.Nodes
	})
}

// Resize changes a process's bounds in place (or moves it, with req.Move).
func (c *Client) Resize(ctx context.Context, req *pb.ResizeRequest) (*pb.ProcessRecord, error) {
	resp, err := unary(ctx, c, req, func(m shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[pb.ResizeRequest]) (*connect.Response[pb.ResizeResponse], error) {
		return m.Resize
	})
	return resp.GetProcess(), err
}

// Drain stops placing processes on node and moves its processes away
// (undrain: takes them again).
func (c *Client) Drain(ctx context.Context, node string, undrain bool) (*pb.NodeRecord, error) {
	resp, err := unary(ctx, c, &pb.DrainRequest{Node: node, Undrain: undrain}, func(m shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[pb.DrainRequest]) (*connect.Response[pb.DrainResponse], error) {
		return m.Drain
	})
	return resp.GetNode(), err
}

// Whoami says how the cluster sees the client's credentials.
func (c *Client) Whoami(ctx context.Context) (*pb.WhoamiResponse, error) {
	return unary(ctx, c, &pb.WhoamiRequest{}, func(m shimv1connect.ShimServiceClient) func(context.Context, *connect.Request[pb.WhoamiRequest]) (*connect.Response[pb.WhoamiResponse], error) {
		return m.Whoami
	})
}

// Events calls fn with each event after req.Since, oldest first; with
// req.Follow it keeps going as events happen, resuming after the last one
// seen on another member when one goes away, until ctx ends (then it
// returns nil) or fn returns an error (returned as is).
func (c *Client) Events(ctx context.Context, req *pb.EventsRequest, fn func(*pb.Event) error) error {
	r := &pb.EventsRequest{Since: req.GetSince(), Follow: req.GetFollow(), Types: req.GetTypes()}
	for {
		var fnErr error
		err := c.CallTimeout(ctx, 0, func(ctx context.Context, m shimv1connect.ShimServiceClient) error {
			if !r.Follow && c.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, c.timeout)
				defer cancel()
			}
			s, err := m.Events(ctx, connect.NewRequest(r))
			if err != nil {
				return err
			}
			defer s.Close()
			for s.Receive() {
				e := s.Msg()
				r.Since = max(r.Since, e.GetIndex())
				if fnErr = fn(e); fnErr != nil {
					return nil
				}
			}
			return s.Err()
		})
		switch {
		case fnErr != nil:
			return fnErr
		case ctx.Err() != nil:
			return nil
		case err == nil && !r.Follow:
			return nil
		case err != nil && (!r.Follow || !Unreachable(err)):
			return err
		}
		select { // following: the member went away; resume on one that answers
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}
