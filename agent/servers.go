package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Whom the agent talks to. It tries the address that answered last, then
// Addrs (the wiring's: this node's own API on a server, which forwards to the
// leader; the servers on a worker), then the servers it has learned from the
// cluster (every join and heartbeat answer lists them), which it remembers in
// the data dir (serversFile) for the agent after it.
//
// Those remembered servers are what lets a node restarted after a crash
// rejoin at once. A server's own API cannot forward to the leader until its
// table knows the leader's address, and a restarted server's table catches
// up only when the leader next sends it log entries: hashicorp/raft retries
// a follower that failed with a backoff that doubles up to ~10 s (its
// heartbeats, capped at 100 ms here, carry no entries). So the join, whose
// tries are bounded (joinTry), goes on to a server that can answer.

// serversFile is where the agent remembers the servers' API addresses, one a
// line, in the data dir.
const serversFile = "servers"

// addrBook holds the servers' addresses the agent knows besides Addrs.
type addrBook struct {
	mu    sync.Mutex
	path  string   // serversFile in the data dir; "" keeps nothing
	known []string // the servers' API addresses, as the cluster last listed them
	good  string   // the address that answered last
}

// load reads the servers a previous agent remembered; none if it cannot.
func (b *addrBook) load(path string) error {
	b.path = path
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remembered servers: %w", err)
	}
	b.known = strings.Fields(string(data))
	return nil
}

// learn takes in the servers as the cluster lists them, and reports whether
// the list changed. A changed list is remembered; failing that, the next
// agent starts from its Addrs alone.
func (b *addrBook) learn(addrs []string) (changed bool, err error) {
	if len(addrs) == 0 {
		return false, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if slices.Equal(addrs, b.known) {
		return false, nil
	}
	b.known = append([]string(nil), addrs...)
	if b.path == "" {
		return true, nil
	}
	tmp := b.path + ".tmp"
	err = os.WriteFile(tmp, []byte(strings.Join(b.known, "\n")+"\n"), 0o644)
	if err == nil {
		err = os.Rename(tmp, b.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return true, fmt.Errorf("remember the servers: %w", err)
	}
	return true, nil
}

// order returns the addresses to try, in order.
func (b *addrBook) order(addrs []string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return tryOrder(b.good, addrs, b.known)
}

func (b *addrBook) answered(addr string) {
	b.mu.Lock()
	b.good = addr
	b.mu.Unlock()
}

// tryOrder is the order in which to try the servers: good (the address that
// answered last) if it is still one of them, then addrs, then known, each
// address once.
func tryOrder(good string, addrs, known []string) []string {
	out := make([]string, 0, 1+len(addrs)+len(known))
	if good != "" && (slices.Contains(addrs, good) || slices.Contains(known, good)) {
		out = append(out, good)
	}
	for _, list := range [][]string{addrs, known} {
		for _, a := range list {
			if a != "" && !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// joinTry bounds each try of round round (from 0) of a join at one address:
// short at first, so that an address that cannot answer yet (a restarted
// server whose table has not caught up) gives way to the next at once, and
// longer in later rounds, for a cluster slow to commit the join.
func joinTry(round int) time.Duration {
	return min(250*time.Millisecond<<min(round, 4), 2*time.Second)
}

// call runs f against the servers in turn (see order), until one answers.
// attempt, if set, bounds each try when there is another address to try, so
// that an address that hangs (a server cut off) does not use up the call.
func call[T any](ctx context.Context, a *Agent, attempt time.Duration, f func(ctx context.Context, c shimv1connect.AgentServiceClient) (T, error)) (T, error) {
	var zero T
	err := errors.New("no API address")
	addrs := a.book.order(a.Addrs())
	for _, addr := range addrs {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if attempt > 0 && len(addrs) > 1 {
			actx, cancel = context.WithTimeout(ctx, attempt)
		}
		var v T
		v, err = f(actx, a.Client(addr))
		cancel()
		if err == nil {
			a.book.answered(addr)
			return v, nil
		}
		if c := connect.CodeOf(err); c != connect.CodeUnavailable && c != connect.CodeUnknown && c != connect.CodeDeadlineExceeded {
			return zero, err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return zero, err
}

// join registers the node, retrying until it succeeds or ctx ends.
func (a *Agent) join(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for round := 0; ; round++ {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := call(rctx, a, joinTry(round), func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.JoinResponse], error) {
			return c.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: a.Node}))
		})
		cancel()
		if err == nil {
			a.servers(resp.Msg.Servers)
			a.Log.Info("joined the cluster", "node", a.Node.Name, "servers", resp.Msg.Servers)
			return nil
		}
		a.Log.Warn("join failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-a.Clock.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// servers takes in the servers' API addresses as the cluster lists them,
// and passes a changed list on to OnServers.
func (a *Agent) servers(addrs []string) {
	changed, err := a.book.learn(addrs)
	if err != nil {
		a.Log.Warn("could not remember the servers: a restarted agent may take longer to rejoin", "err", err)
	}
	if changed && a.OnServers != nil {
		a.OnServers(addrs)
	}
}
