package raftlog

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Raft over TLS.
//
// hashicorp/raft's NetworkTransport runs over any StreamLayer; tlsLayer is
// one that speaks TLS, as Nomad's RaftLayer does (nomad/raft_rpc.go). The
// tls.Configs come from the caller (auth.Config): the listener's requires a
// client certificate of a server node, the dialer's checks that the peer holds
// one. A connection that fails that check never reaches Raft, so a client
// without the cluster's server certificate cannot send Raft a single
// message, whatever term it claims.
//
// Accept hands the transport a connection whose handshake runs on its first
// read, in the transport's goroutine for that connection, so a peer that
// stalls its handshake holds up no one else; handshakeTimeout bounds it.
// Dial handshakes before it returns, within the transport's dial timeout.
// Raft keeps its connections (a pool per peer), so each costs one handshake.

// handshakeTimeout bounds the TLS handshake of an accepted connection.
const handshakeTimeout = 10 * time.Second

type tlsLayer struct {
	net.Listener
	adv    net.Addr
	server *tls.Config
	client *tls.Config
}

// newTLSLayer listens on bind; adv (if set) is the address others dial.
func newTLSLayer(bind string, adv net.Addr, server, client *tls.Config) (*tlsLayer, error) {
	if server == nil || client == nil {
		return nil, errors.New("raft TLS needs both a server and a client config")
	}
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, err
	}
	if adv == nil {
		adv = ln.Addr()
	}
	if a, ok := adv.(*net.TCPAddr); !ok || a.IP == nil || a.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("%s is not an address peers can dial (listening on all addresses needs an advertised one)", adv)
	}
	return &tlsLayer{Listener: ln, adv: adv, server: server, client: client}, nil
}

// Accept returns the next connection, its handshake still to come.
func (l *tlsLayer) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &serverConn{Conn: tls.Server(c, l.server)}, nil
}

// Addr is the advertised address.
func (l *tlsLayer) Addr() net.Addr { return l.adv }

// Dial connects to a peer and completes the handshake within timeout.
func (l *tlsLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: timeout}, Config: l.client}
	return d.Dial("tcp", string(address))
}

// serverConn is an accepted connection that handshakes, with a deadline, on
// its first read or write.
type serverConn struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (c *serverConn) handshake() error {
	c.once.Do(func() {
		_ = c.Conn.SetDeadline(time.Now().Add(handshakeTimeout))
		c.err = c.Conn.Handshake()
		_ = c.Conn.SetDeadline(time.Time{})
		if c.err != nil {
			c.err = fmt.Errorf("raft TLS handshake with %s: %w", c.RemoteAddr(), c.err)
		}
	})
	return c.err
}

func (c *serverConn) Read(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *serverConn) Write(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}
