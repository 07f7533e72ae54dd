package auth

import (
	"crypto/x509"
	"errors"
	"slices"
	"testing"
	"time"
)

// testCluster is a CA and a helper to issue node credentials from it.
type testCluster struct {
	t  *testing.T
	ca *CA
}

func newTestCluster(t *testing.T) *testCluster {
	t.Helper()
	ca, err := NewCA("c0ffee", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &testCluster{t: t, ca: ca}
}

func (c *testCluster) node(name string, role Role, hosts ...string) *Credentials {
	c.t.Helper()
	key, err := NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	csr, err := NewCSR(key, name, hosts)
	if err != nil {
		c.t.Fatal(err)
	}
	der, got, err := c.ca.Sign(csr, role, time.Now())
	if err != nil || got != name {
		c.t.Fatalf("sign %s: %q, %v", name, got, err)
	}
	cr, err := NewCredentials(der, key, c.ca.Cert.Raw)
	if err != nil {
		c.t.Fatal(err)
	}
	return cr
}

func TestCARoundTrip(t *testing.T) {
	c := newTestCluster(t)
	if !c.ca.Cert.IsCA || c.ca.Cert.Subject.OrganizationalUnit[0] != "c0ffee" {
		t.Fatalf("CA subject %v", c.ca.Cert.Subject)
	}
	key, err := c.ca.KeyDER()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseCA(c.ca.Cert.Raw, key)
	if err != nil || !back.Key.Equal(c.ca.Key) {
		t.Fatalf("ParseCA: %v", err)
	}
	if len(c.ca.Pin()) != 64 || c.ca.Pin() != Pin(back.Cert.Raw) {
		t.Errorf("pin %q", c.ca.Pin())
	}
	other := newTestCluster(t)
	okey, _ := other.ca.KeyDER()
	if _, err := ParseCA(c.ca.Cert.Raw, okey); !errors.Is(err, ErrCert) {
		t.Errorf("a CA with another CA's key: %v", err)
	}
	n := c.node("n1", RoleServer)
	if _, err := ParseCA(n.Cert.Certificate[0], key); !errors.Is(err, ErrCert) {
		t.Errorf("a node certificate as CA: %v", err)
	}
}

func TestSignNode(t *testing.T) {
	c := newTestCluster(t)
	n := c.node("web-1", RoleWorker, "10.0.0.7:7070", "node7.example:7070", "0.0.0.0:7070", "[::1]:7071")
	leaf := n.Cert.Leaf
	if n.Node != (Identity{Kind: KindNode, Node: "web-1", Role: RoleWorker}) {
		t.Errorf("identity %+v", n.Node)
	}
	if !slices.Contains(leaf.DNSNames, "node7.example") || !slices.Contains(leaf.DNSNames, "localhost") {
		t.Errorf("DNS names %v", leaf.DNSNames)
	}
	want := []string{"10.0.0.7", "127.0.0.1", "::1"}
	var got []string
	for _, ip := range leaf.IPAddresses {
		got = append(got, ip.String())
		if ip.IsUnspecified() {
			t.Errorf("0.0.0.0 in the certificate")
		}
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("IPs %v lack %s", got, w)
		}
	}
	if err := leaf.VerifyHostname("10.0.0.7"); err != nil {
		t.Error(err)
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := VerifyNode([]*x509.Certificate{leaf}, n.Pool, u, time.Now()); err != nil {
			t.Errorf("verify for %v: %v", u, err)
		}
	}
	// Another cluster's CA does not vouch for it.
	o := newTestCluster(t)
	pool := x509.NewCertPool()
	pool.AddCert(o.ca.Cert)
	if _, err := VerifyNode([]*x509.Certificate{leaf}, pool, x509.ExtKeyUsageClientAuth, time.Now()); !errors.Is(err, ErrCert) {
		t.Errorf("verified by a foreign CA: %v", err)
	}
	// The CA itself is no node.
	if _, err := NodeOf(c.ca.Cert); !errors.Is(err, ErrCert) {
		t.Errorf("CA as a node: %v", err)
	}
}

func TestSignRefuses(t *testing.T) {
	c := newTestCluster(t)
	key, _ := NewKey()
	csr, _ := NewCSR(key, "n1", nil)
	for _, role := range []Role{RoleAdmin, RoleNode, ""} {
		if _, _, err := c.ca.Sign(csr, role, time.Now()); !errors.Is(err, ErrCert) {
			t.Errorf("role %q: %v", role, err)
		}
	}
	if _, _, err := c.ca.Sign([]byte("junk"), RoleWorker, time.Now()); !errors.Is(err, ErrCert) {
		t.Errorf("junk request: %v", err)
	}
	bad := append([]byte(nil), csr...)
	bad[len(bad)-5] ^= 0xff // the signature
	if _, _, err := c.ca.Sign(bad, RoleWorker, time.Now()); err == nil {
		t.Error("a request with a broken signature was signed")
	}
	for _, name := range []string{"", "a b", "x/../y", string(make([]byte, 64))} {
		if _, err := NewCSR(key, name, nil); !errors.Is(err, ErrCert) {
			t.Errorf("name %q: %v", name, err)
		}
	}
}

func TestCredentialsCheckKey(t *testing.T) {
	c := newTestCluster(t)
	n := c.node("n1", RoleServer)
	other, _ := NewKey()
	if _, err := NewCredentials(n.Cert.Certificate[0], other, c.ca.Cert.Raw); !errors.Is(err, ErrCert) {
		t.Errorf("certificate with a foreign key: %v", err)
	}
	if _, err := NewCredentials(n.Cert.Certificate[0], n.Cert.PrivateKey, newTestCluster(t).ca.Cert.Raw); !errors.Is(err, ErrCert) {
		t.Errorf("certificate with a foreign CA: %v", err)
	}
}

func TestCredentialsFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadCredentials(dir); !errors.Is(err, errNotExist()) {
		t.Fatalf("empty dir: %v", err)
	}
	c := newTestCluster(t)
	n := c.node("n1", RoleServer, "127.0.0.1:7070")
	if err := n.Save(dir); err != nil {
		t.Fatal(err)
	}
	back, err := LoadCredentials(dir)
	if err != nil || back.Node != n.Node || !back.CA.Equal(n.CA) {
		t.Fatalf("load: %+v, %v", back, err)
	}
	for f, mode := range map[string]uint32{CAFile: 0o644, NodeCertFile: 0o600, NodeKeyFile: 0o600} {
		if m := fileMode(t, dir, f); m != mode {
			t.Errorf("%s: mode %o, want %o", f, m, mode)
		}
	}
}
