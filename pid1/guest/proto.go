package guest

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// The host hands the guest its Config as a QEMU fw_cfg file of this name
// (-fw_cfg name=FwCfgName,file=...), read from
// /sys/firmware/qemu_fw_cfg/by_name/FwCfgName/raw.
const FwCfgName = "opt/shim/config"

// Names of the virtio-serial ports the host creates.
const (
	PortControl = "shim.ctl" // the control channel, both ways
	PortStdout  = "shim.out" // the workload's stdout (and stderr when they share a file)
	PortStderr  = "shim.err" // the workload's stderr when it has a file of its own
)

// ConsolePrefix starts every line the guest init writes to the serial
// console. Its exit report there ("shim-guest: exit code 3") is what a host
// that was not connected to the control channel reads afterwards.
const ConsolePrefix = "shim-guest: "

// GuestEnv is set to "1" on the guest kernel's command line; the kernel
// passes it to init's environment (see IsGuest).
const GuestEnv = "SHIM_GUEST"

// MaxLine bounds a control-channel line, newline included; longer lines are
// rejected by the reader.
const MaxLine = 512

// Config is what the host tells the guest init to do.
type Config struct {
	Argv   []string `json:"argv"`
	Env    []string `json:"env"`    // exactly the workload's environment
	Dir    string   `json:"dir"`    // working directory; "" = "/"
	UID    uint32   `json:"uid"`    // the workload's user and group
	GID    uint32   `json:"gid"`    //
	Shares []Share  `json:"shares"` // 9p file systems to mount, in order
	Links  []Link   `json:"links"`  // symbolic links to create, e.g. /bin -> usr/bin
	// Stdout and Stderr name the virtio-serial ports the workload writes
	// to; "" = /dev/null. The same name for both shares one descriptor.
	Stdout string `json:"stdout"`
	Stderr string `json:"stderr"`
	// VCPUs is how many vCPUs to keep online (the rest of the present
	// ones stay offline until a "cpus" message); 0 = all.
	VCPUs int `json:"vcpus"`
}

// Share is a host directory exported with -virtfs under Tag.
type Share struct {
	Tag      string `json:"tag"`
	Path     string `json:"path"` // mount point in the guest (the host path)
	ReadOnly bool   `json:"ro"`
}

// Link is a symbolic link Path -> Target.
type Link struct {
	Path   string `json:"path"`
	Target string `json:"target"`
}

// Control-channel message kinds. One message per line, fields separated by
// single spaces, numbers in decimal.
const (
	// host -> guest
	KindSignal = "signal" // "signal N": send signal N to the workload
	KindStat   = "stat"   // "stat": answer with a "mem" line now
	KindCPUs   = "cpus"   // "cpus N": keep N vCPUs online
	// guest -> host
	KindStarted = "started" // "started PID": the workload runs (guest pid)
	KindExit    = "exit"    // "exit code N" or "exit signal N [oom]": the workload ended
	KindFail    = "fail"    // "fail TEXT": the guest could not start the workload
	KindWant    = "want"    // "want mem BYTES cpu MILLI": the guest asks for that much (0 = no change)
	KindMem     = "mem"     // "mem TOTAL AVAILABLE CPUS": the guest's view (bytes, bytes, online vCPUs)
)

// ErrBadMessage is returned for a line that is not a control message.
var ErrBadMessage = errors.New("bad control message")

// Msg is one control-channel message. Which fields are used depends on Kind:
// signal N (A); cpus N (A); started PID (A); exit code N (A) or exit signal N [oom]
// (A, Signal, OOM); fail (Text); want mem A cpu B; mem A B C.
type Msg struct {
	Kind    string
	A, B, C int64
	Signal  bool // exit: A is a signal number
	OOM     bool // exit: the guest's OOM killer acted while the workload ran
	Text    string
}

// String formats m as its line, without the newline.
func (m Msg) String() string {
	switch m.Kind {
	case KindSignal, KindStarted, KindCPUs:
		return m.Kind + " " + strconv.FormatInt(m.A, 10)
	case KindExit:
		if m.Signal {
			s := "exit signal " + strconv.FormatInt(m.A, 10)
			if m.OOM {
				s += " oom"
			}
			return s
		}
		return "exit code " + strconv.FormatInt(m.A, 10)
	case KindFail:
		t := strings.Map(func(r rune) rune {
			if r < ' ' {
				return ' '
			}
			return r
		}, m.Text)
		if len(t) > MaxLine-16 {
			t = t[:MaxLine-16]
		}
		return "fail " + t
	case KindWant:
		return fmt.Sprintf("want mem %d cpu %d", m.A, m.B)
	case KindMem:
		return fmt.Sprintf("mem %d %d %d", m.A, m.B, m.C)
	}
	return m.Kind
}

// ParseMsg parses one line (without its newline).
func ParseMsg(line string) (Msg, error) {
	f := strings.Fields(line)
	bad := func() (Msg, error) {
		if len(line) > 64 {
			line = line[:64] + "..."
		}
		return Msg{}, fmt.Errorf("%w: %q", ErrBadMessage, line)
	}
	if len(f) == 0 {
		return bad()
	}
	nums := func(idx ...int) ([]int64, bool) {
		out := make([]int64, len(idx))
		for i, j := range idx {
			if j >= len(f) {
				return nil, false
			}
			v, err := strconv.ParseInt(f[j], 10, 64)
			if err != nil || v < 0 {
				return nil, false
			}
			out[i] = v
		}
		return out, true
	}
	m := Msg{Kind: f[0]}
	switch {
	case f[0] == KindStat && len(f) == 1:
		return m, nil
	case (f[0] == KindSignal || f[0] == KindStarted || f[0] == KindCPUs) && len(f) == 2:
		if n, ok := nums(1); ok {
			m.A = n[0]
			return m, nil
		}
	case f[0] == KindExit && (len(f) == 3 || len(f) == 4 && f[1] == "signal" && f[3] == "oom") &&
		(f[1] == "code" || f[1] == "signal"):
		if n, ok := nums(2); ok {
			m.A, m.Signal, m.OOM = n[0], f[1] == "signal", len(f) == 4
			return m, nil
		}
	case f[0] == KindFail:
		m.Text = strings.TrimPrefix(strings.TrimPrefix(line, "fail"), " ")
		return m, nil
	case f[0] == KindWant && len(f) == 5 && f[1] == "mem" && f[3] == "cpu":
		if n, ok := nums(2, 4); ok {
			m.A, m.B = n[0], n[1]
			return m, nil
		}
	case f[0] == KindMem && len(f) == 4:
		if n, ok := nums(1, 2, 3); ok {
			m.A, m.B, m.C = n[0], n[1], n[2]
			return m, nil
		}
	}
	return bad()
}
