package agent

import (
	"errors"
	"sync"
	"sync/atomic"
	"syscall"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// SimRuntime pretends to run processes: each "process" lives until it is
// signalled, except one whose command is SimExit, which exits 0 at once:
// short-lived work for soak tests. It lets one machine host thousands of simulated workers that use
// the same API, lease and report paths as real ones.
type SimRuntime struct {
	pids atomic.Int64
	mu   sync.Mutex
	live map[*simProc]bool
}

// SimExit is the command of a simulated process that exits 0 at once.
const SimExit = "sim:exit"

var errSimAdopt = errors.New("simulated processes do not survive the agent")

// Start starts a simulated process.
func (r *SimRuntime) Start(s Spec) (Proc, error) {
	p := &simProc{pid: int(r.pids.Add(1)), done: make(chan struct{}), rt: r, keep: s.Keep}
	r.mu.Lock()
	if r.live == nil {
		r.live = map[*simProc]bool{}
	}
	r.live[p] = true
	r.mu.Unlock()
	if len(s.Argv) > 0 && s.Argv[0] == SimExit {
		p.once.Do(func() { p.exit = Exit{}; p.end() })
	}
	return p, nil
}

// KillAll ends every simulated process but those with on-lost keep.
func (r *SimRuntime) KillAll() error {
	r.mu.Lock()
	ps := make([]*simProc, 0, len(r.live))
	for p := range r.live {
		if !p.keep {
			ps = append(ps, p)
		}
	}
	r.mu.Unlock()
	for _, p := range ps {
		_ = p.Kill()
	}
	return nil
}

// Adopt always fails: simulated processes end with their agent.
func (r *SimRuntime) Adopt(string, uint64, int, uint64) (Proc, error) { return nil, errSimAdopt }

// Existing finds nothing.
func (r *SimRuntime) Existing() ([]Found, error) { return nil, nil }

// Remove does nothing.
func (r *SimRuntime) Remove(string, uint64) error { return nil }

type simProc struct {
	pid  int
	once sync.Once
	done chan struct{}
	exit Exit
	rt   *SimRuntime
	keep bool // on-lost keep: KillAll spares it
}

func (p *simProc) PID() int          { return p.pid }
func (p *simProc) StartTime() uint64 { return 1 }
func (p *simProc) Signal(sig syscall.Signal) error {
	p.once.Do(func() {
		p.exit = Exit{Code: -1, Signal: sig.String()}
		p.end()
	})
	return nil
}

func (p *simProc) end() {
	close(p.done)
	p.rt.mu.Lock()
	delete(p.rt.live, p)
	p.rt.mu.Unlock()
}
func (p *simProc) Kill() error                  { return p.Signal(syscall.SIGKILL) }
func (p *simProc) Done() <-chan struct{}        { return p.done }
func (p *simProc) Exit() Exit                   { return p.exit }
func (p *simProc) Resize(r *pb.Resources) error { return nil }
func (p *simProc) Stats() (*pb.Usage, error)    { return &pb.Usage{}, nil }
