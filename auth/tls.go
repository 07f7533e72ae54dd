package auth

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"
)

// Use is what a tls.Config is for.
type Use int

const (
	// APIServer: the HTTPS API. TLS 1.3, HTTP/2 and HTTP/1.1, a client
	// certificate verified against the CA if the client offers one (users
	// come with tokens instead).
	APIServer Use = iota
	// APIClient: a node or the CLI calling an API. Verifies the server's
	// certificate and address against the CA; presents the node's
	// certificate if there is one. The http.Transport picks the ALPN.
	APIClient
	// StreamClient: the heartbeat stream, a raw HTTP/1.1 upgrade, so it
	// offers only http/1.1.
	StreamClient
	// RaftServer: the Raft transport's listener. Requires a client
	// certificate of a server node.
	RaftServer
	// RaftClient: the Raft transport's dialer. Requires the peer to hold a
	// server node's certificate; checks no address (peers are known by
	// their certificate, and Raft dials the address a member registered).
	RaftClient
)

// Config builds the tls.Config for use, trusting the CAs in pool and
// presenting cert (nil: none; the servers need one). It is the only place
// shim makes a tls.Config.
func Config(use Use, pool *x509.CertPool, cert *tls.Certificate) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS13}
	if cert != nil {
		c.Certificates = []tls.Certificate{*cert}
	}
	switch use {
	case APIServer:
		c.NextProtos = []string{"h2", "http/1.1"}
		c.ClientAuth = tls.VerifyClientCertIfGiven
		c.ClientCAs = pool
	case APIClient:
		c.RootCAs = pool
	case StreamClient:
		c.RootCAs = pool
		c.NextProtos = []string{"http/1.1"}
	case RaftServer:
		c.ClientAuth = tls.RequireAndVerifyClientCert
		c.ClientCAs = pool
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			return requireServer(cs.PeerCertificates, nil, x509.ExtKeyUsageClientAuth)
		}
	case RaftClient:
		// Chain and role are checked in VerifyConnection, instead of the
		// host name the default verification would insist on.
		c.InsecureSkipVerify = true
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			return requireServer(cs.PeerCertificates, pool, x509.ExtKeyUsageServerAuth)
		}
	}
	return c
}

// requireServer checks that chain is a server node's certificate; with
// pool set it also verifies the chain (the handshake has not).
func requireServer(chain []*x509.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage) error {
	var id Identity
	var err error
	if pool != nil {
		id, err = VerifyNode(chain, pool, usage, time.Now())
	} else if len(chain) == 0 {
		err = fmt.Errorf("%w: none presented", ErrCert)
	} else {
		id, err = NodeOf(chain[0])
	}
	if err != nil {
		return fmt.Errorf("raft peer: %w", err)
	}
	if id.Role != RoleServer {
		return fmt.Errorf("raft peer: %w: %s", ErrPermissionDenied, id)
	}
	return nil
}

// Credentials are a node's TLS material: its certificate and key, and the
// cluster CA.
type Credentials struct {
	Node Identity          // the name and role the certificate holds
	Cert tls.Certificate   // leaf then CA, with the key
	CA   *x509.Certificate // the cluster CA
	Pool *x509.CertPool    // holds CA
}

// NewCredentials assembles credentials from a node certificate (DER), its
// key and the CA certificate (DER), checking that they belong together.
func NewCredentials(certDER []byte, key any, caDER []byte) (*Credentials, error) {
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("%w: CA: %v", ErrCert, err)
	}
	leaf, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("%w: node: %v", ErrCert, err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	id, err := VerifyNode([]*x509.Certificate{leaf}, pool, x509.ExtKeyUsageServerAuth, time.Now())
	if err != nil {
		return nil, err
	}
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	priv, ok2 := key.(crypto.Signer)
	if !ok || !ok2 || !pub.Equal(priv.Public()) {
		return nil, fmt.Errorf("%w: the key does not match the certificate of %s", ErrCert, id.Node)
	}
	return &Credentials{
		Node: id,
		Cert: tls.Certificate{Certificate: [][]byte{certDER, caDER}, PrivateKey: key, Leaf: leaf},
		CA:   ca,
		Pool: pool,
	}, nil
}

// TLS returns the tls.Config for use with these credentials.
func (c *Credentials) TLS(use Use) *tls.Config { return Config(use, c.Pool, &c.Cert) }

// ErrPin means the server did not present the CA the join token pins.
var ErrPin = errors.New("the server's CA does not match the join token")

// FetchCA connects to a member's API at addr and returns the cluster CA
// from its TLS handshake, trusting it only if its hash is pin and it signed
// the member's certificate for addr's host.
func FetchCA(ctx context.Context, addr, pin string) (*x509.Certificate, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("fetch CA from %s: %w", addr, err)
	}
	var found *x509.Certificate
	c := &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"http/1.1"},
		// Nothing is trusted yet: the pin decides, in VerifyConnection.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			for _, ca := range cs.PeerCertificates {
				if ca.IsCA && Pin(ca.Raw) == pin {
					found = ca
				}
			}
			if found == nil || len(cs.PeerCertificates) == 0 {
				return ErrPin
			}
			pool := x509.NewCertPool()
			pool.AddCert(found)
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, DNSName: host})
			return err
		},
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: c}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("fetch CA from %s: %w", addr, err)
	}
	conn.Close()
	return found, nil
}
