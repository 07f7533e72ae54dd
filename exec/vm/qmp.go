package vm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// qmpTimeout bounds one QMP command (they take 4-8 ms under TCG).
const qmpTimeout = 5 * time.Second

// errQMPClosed: the QMP connection is gone (QEMU exited, or close).
var errQMPClosed = errors.New("qmp: connection closed")

// qmpError is an error QEMU answered a command with.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *qmpError) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// qmp is a client of the QEMU Machine Protocol: one JSON object a line,
// commands tagged with an id that QEMU echoes in the reply, events
// ({"event": ...}) interleaved. Commands may be issued concurrently; one
// goroutine reads.
type qmp struct {
	conn    net.Conn
	nextID  atomic.Uint64
	onEvent func(name string, data json.RawMessage) // called on the reader goroutine; must not block

	mu      sync.Mutex
	pending map[string]chan qmpReply
	err     error // set once the reader has stopped
	closed  chan struct{}
}

type qmpReply struct {
	ID     string          `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *qmpError       `json:"error"`
	Event  string          `json:"event"`
	Data   json.RawMessage `json:"data"`
}

// dialQMP connects to a QMP socket, reads the greeting and negotiates
// capabilities, all within timeout.
func dialQMP(path string, timeout time.Duration, onEvent func(string, json.RawMessage)) (*qmp, error) {
	conn, err := dialUnix(path, timeout)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	q := &qmp{conn: conn, onEvent: onEvent, pending: map[string]chan qmpReply{}, closed: make(chan struct{})}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	if !sc.Scan() {
		conn.Close()
		return nil, fmt.Errorf("qmp: no greeting: %w", scanErr(sc))
	}
	var greet struct {
		QMP *json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(sc.Bytes(), &greet); err != nil || greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: unexpected greeting %.80q", sc.Text())
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities","id":"caps"}` + "\n")); err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %w", err)
	}
	for {
		if !sc.Scan() {
			conn.Close()
			return nil, fmt.Errorf("qmp: capabilities: %w", scanErr(sc))
		}
		var r qmpReply
		if json.Unmarshal(sc.Bytes(), &r) != nil || r.Event != "" {
			continue
		}
		if r.Error != nil {
			conn.Close()
			return nil, r.Error
		}
		break
	}
	_ = conn.SetDeadline(time.Time{})
	go q.read(sc)
	return q, nil
}

func scanErr(sc *bufio.Scanner) error {
	if err := sc.Err(); err != nil {
		return err
	}
	return errQMPClosed
}

// read dispatches replies and events until the connection ends. The
// scanner keeps what it buffered during the handshake.
func (q *qmp) read(sc *bufio.Scanner) {
	for sc.Scan() {
		var r qmpReply
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			continue
		}
		if r.Event != "" {
			if q.onEvent != nil {
				q.onEvent(r.Event, r.Data)
			}
			continue
		}
		q.mu.Lock()
		ch := q.pending[r.ID]
		delete(q.pending, r.ID)
		q.mu.Unlock()
		if ch != nil {
			ch <- r
		}
	}
	q.mu.Lock()
	q.err = errQMPClosed
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.closed)
}

// run executes a command with arguments (nil for none) and decodes its
// return value into out (nil to ignore it).
func (q *qmp) run(cmd string, args any, out any) error {
	id := strconv.FormatUint(q.nextID.Add(1), 10)
	msg := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	ch := make(chan qmpReply, 1)
	q.mu.Lock()
	if q.err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, q.err)
	}
	q.pending[id] = ch
	q.mu.Unlock()
	forget := func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}
	_ = q.conn.SetWriteDeadline(time.Now().Add(qmpTimeout))
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	t := time.NewTimer(qmpTimeout)
	defer t.Stop()
	select {
	case r, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp %s: %w", cmd, errQMPClosed)
		}
		if r.Error != nil {
			return fmt.Errorf("qmp %s: %w", cmd, r.Error)
		}
		if out != nil {
			if err := json.Unmarshal(r.Return, out); err != nil {
				return fmt.Errorf("qmp %s: reply: %w", cmd, err)
			}
		}
		return nil
	case <-t.C:
		forget()
		return fmt.Errorf("qmp %s: no reply within %v", cmd, qmpTimeout)
	}
}

// close ends the connection; QEMU keeps listening for the next client.
func (q *qmp) close() {
	q.conn.Close()
	<-q.closed
}

// maxSunPath is the longest path a sockaddr_un holds (108 with the NUL).
const maxSunPath = 107

// sockPath returns a path for a unix socket at path that fits in a
// sockaddr_un: path itself, or one through /proc/self/fd of an O_PATH
// descriptor of its directory (the caller closes the returned file).
func sockPath(path string) (string, *os.File, error) {
	if len(path) <= maxSunPath {
		return path, nil, nil
	}
	fd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	f := os.NewFile(uintptr(fd), filepath.Dir(path))
	short := "/proc/self/fd/" + strconv.Itoa(fd) + "/" + filepath.Base(path)
	if len(short) > maxSunPath {
		f.Close()
		return "", nil, fmt.Errorf("socket name %q is too long", filepath.Base(path))
	}
	return short, f, nil
}

// dialUnix connects to the unix socket at path, however long the path.
func dialUnix(path string, timeout time.Duration) (net.Conn, error) {
	p, dir, err := sockPath(path)
	if err != nil {
		return nil, err
	}
	if dir != nil {
		defer dir.Close()
	}
	return net.DialTimeout("unix", p, timeout)
}

// listenUnix creates a listening unix socket at path (replacing a stale
// one) and returns it as a file to hand to QEMU, which accepts on it.
func listenUnix(path string) (*os.File, error) {
	_ = os.Remove(path)
	p, dir, err := sockPath(path)
	if err != nil {
		return nil, err
	}
	if dir != nil {
		defer dir.Close()
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: p}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", path, err)
	}
	if err := unix.Listen(fd, 4); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}
