package agent

import (
	"syscall"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Spec is what the agent asks a Runtime to start.
type Spec struct {
	ID          string
	Incarnation uint64
	Argv, Env   []string
	Dir         string
	LogPath     string // stdout and stderr, appended
	Resources   *pb.Resources
	Grant       *pb.Grant // the grant it starts at: a VM's size (its Resources are its ceiling)
	Isolation   pb.Isolation
	Network     pb.Network
	User        string
	Rootfs      string  // a host folder: resolved from the spec's NAME[/SUB]
	WorkDir     string  // the work folder, <data dir>/work/<id> (see sandbox.go)
	Mounts      []Mount // host paths, resolved
	CA          []byte  // the cluster CA (PEM), for CAFile in the work folder; nil with trust off
	// Keep (on-lost keep): KillAll, and the guard's fence, spare it; it
	// runs on while the node is cut off (see agent/lost.go).
	Keep bool
}

// Exit describes how a process ended. Code is -1 when unknown.
type Exit struct {
	Code      int
	Signal    string
	OOMKilled bool
	Reason    string
}

// Failed reports whether the exit counts as a failure for restart policies.
func (e Exit) Failed() bool { return e.Code != 0 || e.Signal != "" || e.OOMKilled }

// Proc is one running process.
type Proc interface {
	PID() int
	StartTime() uint64
	Signal(sig syscall.Signal) error
	Kill() error // the whole sandbox, at once
	Done() <-chan struct{}
	Exit() Exit
	Resize(r *pb.Resources) error
	Stats() (*pb.Usage, error) // cumulative CPU time and current memory
}

// Found is a sandbox left by an earlier agent.
type Found struct {
	ID          string
	Incarnation uint64
}

// Runtime starts and re-adopts processes: the real sandbox (exec), or a
// simulated one for scale tests.
type Runtime interface {
	Start(s Spec) (Proc, error)
	Adopt(id string, inc uint64, pid int, startTime uint64) (Proc, error)
	Existing() ([]Found, error)
	Remove(id string, inc uint64) error // kill and clean up a sandbox that will not be adopted
	KillAll() error                     // SIGKILL every process in every sandbox of this node, at once
}
