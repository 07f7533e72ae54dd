package auth

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// handshake runs a TLS handshake over loopback between a server and a
// client config, and returns each side's error and the server's state.
func handshake(t *testing.T, srv, cli *tls.Config) (serverErr, clientErr error, st tls.ConnectionState) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		err error
		st  tls.ConnectionState
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- res{err: err}
			return
		}
		defer c.Close()
		tc := tls.Server(c, srv)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		err = tc.Handshake()
		if err == nil {
			// TLS 1.3: the client's certificate is judged after the
			// client thinks it is done; make it read the verdict.
			_, err = tc.Write([]byte("x"))
		}
		ch <- res{err, tc.ConnectionState()}
	}()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cli)
	if err == nil {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	r := <-ch
	return r.err, err, r.st
}

func TestRaftTLSNeedsServerCertificates(t *testing.T) {
	c := newTestCluster(t)
	s1 := c.node("s1", RoleServer, "127.0.0.1")
	s2 := c.node("s2", RoleServer, "10.9.9.9") // no loopback name matters: Raft checks no address
	w1 := c.node("w1", RoleWorker, "127.0.0.1")
	foreign := newTestCluster(t).node("s1", RoleServer, "127.0.0.1")

	if se, ce, _ := handshake(t, s1.TLS(RaftServer), s2.TLS(RaftClient)); se != nil || ce != nil {
		t.Fatalf("server to server: %v / %v", se, ce)
	}
	cases := []struct {
		what     string
		srv, cli *tls.Config
	}{
		{"a worker dials raft", s1.TLS(RaftServer), w1.TLS(RaftClient)},
		{"no client certificate", s1.TLS(RaftServer), Config(RaftClient, s1.Pool, nil)},
		{"another cluster's server dials", s1.TLS(RaftServer), foreign.TLS(RaftClient)},
		{"raft answered by a worker", w1.TLS(RaftServer), s1.TLS(RaftClient)},
		{"raft answered by another cluster", foreign.TLS(RaftServer), s1.TLS(RaftClient)},
	}
	for _, k := range cases {
		se, ce, _ := handshake(t, k.srv, k.cli)
		if se == nil && ce == nil {
			t.Errorf("%s: handshake succeeded", k.what)
		}
	}
}

func TestAPITLS(t *testing.T) {
	c := newTestCluster(t)
	s1 := c.node("s1", RoleServer, "127.0.0.1")
	w1 := c.node("w1", RoleWorker)
	foreign := newTestCluster(t).node("x", RoleWorker)

	// A user: no certificate, HTTP/2 offered.
	cli := Config(APIClient, s1.Pool, nil)
	cli.NextProtos = []string{"h2", "http/1.1"}
	se, ce, st := handshake(t, s1.TLS(APIServer), cli)
	if se != nil || ce != nil || st.NegotiatedProtocol != "h2" || len(st.PeerCertificates) != 0 {
		t.Fatalf("user: %v / %v, %q", se, ce, st.NegotiatedProtocol)
	}
	if st.Version != tls.VersionTLS13 {
		t.Errorf("version %x", st.Version)
	}
	// The heartbeat stream: http/1.1 only, with a node certificate.
	se, ce, st = handshake(t, s1.TLS(APIServer), w1.TLS(StreamClient))
	if se != nil || ce != nil || st.NegotiatedProtocol != "http/1.1" || len(st.VerifiedChains) != 1 {
		t.Fatalf("stream: %v / %v, %q, %d chains", se, ce, st.NegotiatedProtocol, len(st.VerifiedChains))
	}
	if id, err := NodeOf(st.PeerCertificates[0]); err != nil || id.Node != "w1" {
		t.Errorf("peer %v, %v", id, err)
	}
	// Another cluster's node certificate is refused.
	if se, ce, _ := handshake(t, s1.TLS(APIServer), Config(APIClient, s1.Pool, &foreign.Cert)); se == nil && ce == nil {
		t.Error("a foreign client certificate was accepted")
	}
	// A client of another cluster does not trust this server.
	if se, ce, _ := handshake(t, s1.TLS(APIServer), foreign.TLS(APIClient)); se == nil && ce == nil {
		t.Error("a server of another cluster was trusted")
	}
	// TLS 1.2 is refused.
	old := Config(APIClient, s1.Pool, nil)
	old.MinVersion, old.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	if se, ce, _ := handshake(t, s1.TLS(APIServer), old); se == nil && ce == nil {
		t.Error("TLS 1.2 accepted")
	}
}

func TestFetchCAChecksPin(t *testing.T) {
	c := newTestCluster(t)
	s1 := c.node("s1", RoleServer, "127.0.0.1")
	ln, err := tls.Listen("tcp", "0.0.0.0:0", s1.TLS(APIServer))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = conn.(*tls.Conn).Handshake()
				conn.Close()
			}()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	addr := "127.0.0.1:" + port
	ca, err := FetchCA(ctx, addr, c.ca.Pin())
	if err != nil || !ca.Equal(c.ca.Cert) {
		t.Fatalf("FetchCA: %v", err)
	}
	other := newTestCluster(t)
	if _, err := FetchCA(ctx, addr, other.ca.Pin()); !errors.Is(err, ErrPin) {
		t.Errorf("wrong pin: %v", err)
	}
	// The right CA, but the server's certificate is not for this address.
	if _, err := FetchCA(ctx, "127.0.0.2:"+port, c.ca.Pin()); err == nil || !strings.Contains(err.Error(), "certificate is valid for") {
		t.Errorf("wrong address: %v", err)
	}
}

// BenchmarkHandshake is the CPU of one TLS 1.3 handshake as the CLI makes
// it (no client certificate) and as nodes make it (with one), both sides in
// this process over loopback.
func BenchmarkHandshake(b *testing.B) {
	ca, err := NewCA("bench", time.Now())
	if err != nil {
		b.Fatal(err)
	}
	c := &testCluster{t: &testing.T{}, ca: ca}
	s1 := c.node("s1", RoleServer, "127.0.0.1")
	w1 := c.node("w1", RoleWorker)
	for _, k := range []struct {
		name string
		cli  *tls.Config
	}{
		{"user", Config(APIClient, s1.Pool, nil)},
		{"node", w1.TLS(APIClient)},
	} {
		b.Run(k.name, func(b *testing.B) {
			ln, err := tls.Listen("tcp", "127.0.0.1:0", s1.TLS(APIServer))
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					conn, err := ln.Accept()
					if err != nil {
						return
					}
					_ = conn.(*tls.Conn).Handshake()
					_, _ = conn.Write([]byte("x"))
					conn.Close()
				}
			}()
			for b.Loop() {
				conn, err := tls.Dial("tcp", ln.Addr().String(), k.cli)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = conn.Read(make([]byte, 1))
				conn.Close()
			}
		})
	}
}

// BenchmarkTokenCheck is what a server does per request with a token:
// parse it and compare the secret's hash.
func BenchmarkTokenCheck(b *testing.B) {
	tok := NewToken("")
	s, hash := tok.String(), tok.Hash()
	for b.Loop() {
		t, err := ParseToken(s)
		if err != nil || !t.Matches(hash) {
			b.Fatal("no match")
		}
	}
}
