package vm

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/shim-run/shim/pid1/guest"
)

// errNoControl: the control channel is not connected.
var errNoControl = errors.New("control channel not connected")

// control is the host end of a VM's control channel: a client of the unix
// socket chardev behind the guest's PortControl. It reconnects until
// stopped, so a lost connection (or QEMU not yet accepting) heals itself.
type control struct {
	path  string
	onMsg func(guest.Msg) // called on the reader goroutine

	mu   sync.Mutex
	conn net.Conn
	up   chan struct{} // closed while connected; replaced on disconnect
	// noRedial: the VM is gone; end once the current connection ends.
	noRedial bool

	stopc   chan struct{}
	stopped chan struct{}
}

func newControl(path string, onMsg func(guest.Msg)) *control {
	c := &control{path: path, onMsg: onMsg, up: make(chan struct{}), stopc: make(chan struct{}), stopped: make(chan struct{})}
	go c.run()
	return c
}

func (c *control) run() {
	defer close(c.stopped)
	for {
		conn, err := dialUnix(c.path, time.Second)
		if err == nil {
			c.mu.Lock()
			c.conn = conn
			close(c.up)
			c.mu.Unlock()
			c.read(conn)
			c.mu.Lock()
			c.conn = nil
			c.up = make(chan struct{})
			c.mu.Unlock()
			conn.Close()
		}
		c.mu.Lock()
		done := c.noRedial
		c.mu.Unlock()
		if done {
			return
		}
		select {
		case <-c.stopc:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (c *control) read(conn net.Conn) {
	done := make(chan struct{})
	defer close(done)
	go func() { // unblock the read on stop
		select {
		case <-c.stopc:
			conn.Close()
		case <-done:
		}
	}()
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, guest.MaxLine), guest.MaxLine)
	for sc.Scan() {
		if m, err := guest.ParseMsg(sc.Text()); err == nil {
			c.onMsg(m)
		}
	}
}

// send writes m, waiting up to timeout for the channel to be connected.
func (c *control) send(m guest.Msg, timeout time.Duration) error {
	c.mu.Lock()
	up := c.up
	c.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-up:
	case <-t.C:
		return errNoControl
	case <-c.stopc:
		return errNoControl
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return errNoControl
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := c.conn.Write([]byte(m.String() + "\n")); err != nil {
		return fmt.Errorf("control channel: %w", err)
	}
	return nil
}

// drain stops reconnecting and waits up to timeout for the current
// connection to end by itself (QEMU closes it when it exits), so that the
// guest's last messages are read; then it stops.
func (c *control) drain(timeout time.Duration) {
	c.mu.Lock()
	c.noRedial = true
	c.mu.Unlock()
	select {
	case <-c.stopped:
	case <-time.After(timeout):
	}
	c.stop()
}

// stop disconnects for good.
func (c *control) stop() {
	select {
	case <-c.stopc:
	default:
		close(c.stopc)
	}
	<-c.stopped
}
