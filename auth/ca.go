// Package auth is shim's cluster trust: the cluster CA and the node
// certificates it signs, client tokens, the identity of a caller, the pure
// rule of who may call what (Allow), and the one function that builds every
// tls.Config (Config).
//
// Design. The first server makes a CA (ECDSA P-256, self-signed, 20 years)
// and signs its own node certificate. A node certificate names the node (its
// common name) and its role (server or worker, in the organizational unit),
// carries the node's advertised names and addresses, and serves for both TLS
// client and server authentication. A joining node proves it may join with a
// join token, which also pins the CA (the SHA-256 of its certificate), so it
// trusts the cluster before it has any certificate; the leader then signs its
// certificate request. Users hold tokens (<id>.<secret>) with a role; the
// table keeps only the secret's SHA-256.
//
// Who a caller is (Identity) is decided once, at the edge: from the client
// certificate the TLS handshake verified, or from the bearer token. What it
// may do is Allow's answer, and, for node certificates, ActsFor's: a worker
// speaks only for itself, a server forwards for others.
package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"time"
)

// Validity of what the CA signs. Nothing rotates certificates yet, so they
// are long-lived; a node is retired by removing it, not by expiry.
const (
	caValidity   = 20 * 365 * 24 * time.Hour
	nodeValidity = 10 * 365 * 24 * time.Hour
	// backdate covers clocks a little behind the signer's.
	backdate = time.Hour
)

// orgName is the organization of every certificate shim makes.
const orgName = "shim"

// rolePrefix marks the organizational unit that holds a node's role.
const rolePrefix = "shim-node:"

// ErrCert means a certificate or request is not one this cluster accepts.
var ErrCert = errors.New("certificate")

// CA is the cluster's certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a self-signed CA for the cluster clusterID.
func NewCA(clusterID string, now time.Time) (*CA, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{orgName}, OrganizationalUnit: []string{clusterID}, CommonName: "shim cluster CA " + clusterID},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("make CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("make CA: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// ParseCA reads a CA from its certificate and PKCS#8 key (DER).
func ParseCA(certDER, keyDER []byte) (*CA, error) {
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("%w: CA: %v", ErrCert, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: %q is not a CA", ErrCert, cert.Subject.CommonName)
	}
	k, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return nil, fmt.Errorf("%w: CA key: %v", ErrCert, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: the CA key does not match its certificate", ErrCert)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// KeyDER returns the CA's key as PKCS#8 DER.
func (ca *CA) KeyDER() ([]byte, error) {
	b, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	return b, nil
}

// Pin is the SHA-256 of the CA certificate, in hex: what a join token
// carries so that the joiner can recognize the cluster's CA.
func (ca *CA) Pin() string { return Pin(ca.Cert.Raw) }

// Pin returns the hex SHA-256 of a certificate's DER.
func Pin(certDER []byte) string {
	h := sha256.Sum256(certDER)
	return hex.EncodeToString(h[:])
}

// Sign checks a node's certificate request (PKCS#10 DER) and signs a
// certificate for the name in its common name, with role, valid for the
// names and addresses it asks for plus localhost.
func (ca *CA) Sign(csrDER []byte, role Role, now time.Time) (certDER []byte, name string, err error) {
	if role != RoleServer && role != RoleWorker {
		return nil, "", fmt.Errorf("%w: a node is a server or a worker, not %q", ErrCert, role)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, "", fmt.Errorf("%w: request: %v", ErrCert, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, "", fmt.Errorf("%w: request: %v", ErrCert, err)
	}
	name = csr.Subject.CommonName
	if err := ValidName(name); err != nil {
		return nil, "", err
	}
	if _, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok {
		return nil, "", fmt.Errorf("%w: request: want an ECDSA key", ErrCert)
	}
	dns, ips := withLocal(csr.DNSNames, csr.IPAddresses)
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject: pkix.Name{Organization: []string{orgName}, OrganizationalUnit: []string{rolePrefix + string(role)},
			CommonName: name},
		NotBefore:   now.Add(-backdate),
		NotAfter:    now.Add(nodeValidity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    dns,
		IPAddresses: ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, csr.PublicKey, ca.Key)
	if err != nil {
		return nil, "", fmt.Errorf("sign %s: %w", name, err)
	}
	return der, name, nil
}

// withLocal adds localhost, 127.0.0.1 and ::1 to a certificate's names, so
// that a node is always reachable as itself on the loopback.
func withLocal(dns []string, ips []net.IP) ([]string, []net.IP) {
	dns = slices.Clone(dns)
	if !slices.Contains(dns, "localhost") {
		dns = append(dns, "localhost")
	}
	ips = slices.Clone(ips)
	for _, ip := range []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback} {
		if !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	}
	return dns, ips
}

// NewKey makes an ECDSA P-256 key.
func NewKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("make key: %w", err)
	}
	return k, nil
}

// NewCSR makes a certificate request for node name, valid for hosts (DNS
// names or IP addresses, ports allowed and dropped).
func NewCSR(key *ecdsa.PrivateKey, name string, hosts []string) ([]byte, error) {
	if err := ValidName(name); err != nil {
		return nil, err
	}
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{Organization: []string{orgName}, CommonName: name}}
	for _, h := range hosts {
		if host, _, err := net.SplitHostPort(h); err == nil {
			h = host
		}
		h = strings.Trim(h, "[]")
		if h == "" {
			continue
		}
		if ip := net.ParseIP(h); ip != nil {
			if !ip.IsUnspecified() && !slices.ContainsFunc(tmpl.IPAddresses, ip.Equal) {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if !slices.Contains(tmpl.DNSNames, h) {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("certificate request: %w", err)
	}
	return der, nil
}

// NodeOf reads the identity a node certificate names: its common name and
// its role. It does not verify the certificate; the TLS handshake (or
// VerifyNode) has.
func NodeOf(cert *x509.Certificate) (Identity, error) {
	name := cert.Subject.CommonName
	if ValidName(name) != nil {
		return Identity{}, fmt.Errorf("%w: %q is not a node name", ErrCert, name)
	}
	var role Role
	for _, ou := range cert.Subject.OrganizationalUnit {
		if r, ok := strings.CutPrefix(ou, rolePrefix); ok {
			role = Role(r)
		}
	}
	if role != RoleServer && role != RoleWorker {
		return Identity{}, fmt.Errorf("%w: %s is not a node certificate", ErrCert, name)
	}
	return Identity{Kind: KindNode, Node: name, Role: role}, nil
}

// VerifyNode checks that cert (with any intermediates after it) chains to a
// CA in pool for usage, and returns the node it names. It checks no host
// name: peers are known by their certificate, not their address.
func VerifyNode(chain []*x509.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage, now time.Time) (Identity, error) {
	if len(chain) == 0 {
		return Identity{}, fmt.Errorf("%w: none presented", ErrCert)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{usage}, CurrentTime: now}); err != nil {
		return Identity{}, fmt.Errorf("%w: %v", ErrCert, err)
	}
	return NodeOf(chain[0])
}

// ValidName checks a node name: 1-63 letters, digits, '.', '_' and '-' (the
// table's rule for names).
func ValidName(n string) error {
	if n == "" || len(n) > 63 {
		return fmt.Errorf("%w: node name %.20q must be 1-63 characters", ErrCert, n)
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: node name %q may hold only letters, digits, '.', '_' and '-'", ErrCert, n)
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		// crypto/rand does not fail on Linux; a fixed serial would
		// still make a valid certificate.
		return big.NewInt(1)
	}
	return n
}
