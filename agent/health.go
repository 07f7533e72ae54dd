package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Health checks. Each run of a process with a check (ProcessSpec.check)
// gets one worker, as kubelet's prober gives each probe one: it probes
// every interval with the check's runner (http, tcp or exec), reports each
// change of verdict to the table with the run's RUNNING status, and kills
// the run once it has been unhealthy for restart_after (since its last
// healthy probe, or since it started): the restart policy then decides.
// The worker ends with the run.

// Check defaults.
const (
	defaultCheckInterval = time.Second
	defaultCheckTimeout  = time.Second
	defaultRestartAfter  = 30 * time.Second
)

// verdict is a worker's state: the last verdict and since when the run
// has been without a healthy probe.
type verdict struct {
	health    pb.Health
	unhealthy time.Time // the run's start, or its last healthy probe
}

// observe folds one probe into v. It returns whether the verdict changed
// (report it) and whether the run has been unhealthy too long (restart it).
func (v *verdict) observe(ok bool, now time.Time, restartAfter time.Duration) (changed, restart bool) {
	h := pb.Health_HEALTH_UNHEALTHY
	if ok {
		h = pb.Health_HEALTH_HEALTHY
		v.unhealthy = now
	}
	changed = h != v.health
	v.health = h
	restart = !ok && restartAfter > 0 && now.Sub(v.unhealthy) >= restartAfter
	return changed, restart
}

func durOr(ms int64, def time.Duration) time.Duration {
	if ms <= 0 {
		return def
	}
	return time.Duration(ms) * time.Millisecond
}

// watchHealth runs the health worker of run p of l until p ends.
func (a *Agent) watchHealth(l *local, p Proc) {
	v := verdict{unhealthy: a.Clock.Now()}
	interval := defaultCheckInterval
	a.mu.Lock()
	if c := l.rec.GetSpec().GetCheck(); c != nil {
		// The first probe too at the check's interval: at the default one
		// a run with a short --check-restart was restarted at its first
		// probe, unhealthy in ps for no time at all.
		interval = durOr(c.IntervalMillis, defaultCheckInterval)
	}
	a.mu.Unlock()
	for {
		select {
		case <-p.Done():
			return
		case <-a.Clock.After(interval):
		}
		a.mu.Lock()
		rec := l.rec
		current := a.procs[l.id] == l && l.proc == p && !l.done && !l.winding()
		a.mu.Unlock()
		if !current {
			return
		}
		c := rec.GetSpec().GetCheck()
		if c == nil {
			if len(rec.GetSpec().GetCommand()) > 0 {
				return // its record came: no check (a run's check never changes)
			}
			continue // adopted: its record has not come yet
		}
		interval = durOr(c.IntervalMillis, defaultCheckInterval)
		err := a.probe(rec, c)
		restartAfter := durOr(c.RestartAfterMillis, defaultRestartAfter)
		if c.RestartAfterMillis < 0 {
			restartAfter = 0
		}
		changed, restart := v.observe(err == nil, a.Clock.Now(), restartAfter)
		a.mu.Lock()
		if a.procs[l.id] != l || l.proc != p || l.done || l.winding() {
			a.mu.Unlock()
			return
		}
		if changed {
			if err != nil {
				a.Log.Info("health check failed", "id", l.id, "err", err)
			}
			a.reports.put(&pb.StatusUpdate{Id: l.id, Incarnation: l.inc, State: pb.ProcessState_PROCESS_STATE_RUNNING,
				Pid: int64(p.PID()), StartTime: p.StartTime(), Restarts: l.restarts, AtUnixNano: l.startedAt.UnixNano(), Health: v.health})
		}
		a.mu.Unlock()
		if restart {
			a.Log.Warn("restarting unhealthy process", "id", l.id, "unhealthy_for", restartAfter, "err", err)
			_ = p.Signal(syscall.SIGKILL)
			return
		}
	}
}

// probe runs check c against rec once: nil means healthy.
func (a *Agent) probe(rec *pb.ProcessRecord, c *pb.HealthCheck) error {
	timeout := durOr(c.TimeoutMillis, defaultCheckTimeout)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	switch c.Kind {
	case "http", "tcp":
		port := table.PortsOn(rec, a.Node.GetName())[c.Port]
		if port == 0 {
			return fmt.Errorf("no port %s", c.Port)
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port)))
		if c.Kind == "tcp" {
			conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return err
			}
			return conn.Close()
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+c.Path, nil)
		if err != nil {
			return err
		}
		resp, err := checkClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode >= 400 {
			return fmt.Errorf("GET %s: %s", c.Path, resp.Status)
		}
		return nil
	case "exec":
		cmd := exec.CommandContext(ctx, c.Command[0], c.Command[1:]...)
		cmd.Env = a.checkEnv(rec)
		cmd.Dir = "/"
		uid, gid := checkUser(rec.Spec.GetUser())
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}, Setpgid: true}
		cmd.WaitDelay = timeout
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	return fmt.Errorf("unknown check kind %q", c.Kind)
}

// checkClient probes http checks: no keep-alive, no redirects followed.
var checkClient = &http.Client{
	Transport:     &http.Transport{DisableKeepAlives: true, Proxy: nil},
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// checkEnv is an exec check's environment: the process's own, without its
// self token.
func (a *Agent) checkEnv(rec *pb.ProcessRecord) []string {
	var env []string
	for _, e := range a.env(rec) {
		if !strings.HasPrefix(e, "SHIM_TOKEN=") {
			env = append(env, e)
		}
	}
	return env
}

// checkUser is the user an exec check runs as: the process's ("UID[:GID]"),
// else nobody.
func checkUser(u string) (uint32, uint32) {
	const nobody = 65534
	if u == "" {
		return nobody, nobody
	}
	us, gs, _ := strings.Cut(u, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	if err != nil {
		return nobody, nobody
	}
	gid := uid
	if gs != "" {
		if g, err := strconv.ParseUint(gs, 10, 32); err == nil {
			gid = g
		}
	}
	return uint32(uid), uint32(gid)
}

// serviceEnv is what a process on node learns of its service and ports:
// SHIM_SERVICE and SHIM_REPLICA for a replica, SHIM_PORT_<NAME> per port.
func serviceEnv(rec *pb.ProcessRecord, node string) []string {
	ports := table.PortsOn(rec, node)
	var env []string
	if rec.Service != "" {
		env = append(env, "SHIM_SERVICE="+rec.Service, fmt.Sprintf("SHIM_REPLICA=%d", rec.Replica))
	}
	for _, p := range rec.Spec.GetPorts() {
		env = append(env, fmt.Sprintf("SHIM_PORT_%s=%d", p.Name, ports[p.Name]))
	}
	return env
}

// RunningPID returns the host PID of process id's current run on this
// node, and its record, if it runs here now (shim exec).
func (a *Agent) RunningPID(id string) (int, *pb.ProcessRecord, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	l := a.procs[id]
	if l == nil || l.proc == nil || l.done || l.winding() {
		return 0, nil, false
	}
	return l.proc.PID(), l.rec, true
}
