package auth

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Where a data dir keeps its trust material.
const (
	CAFile         = "ca.pem"            // the cluster CA certificate (0644)
	NodeCertFile   = "tls/node.pem"      // this node's certificate (0600)
	NodeKeyFile    = "tls/node-key.pem"  // its key (0600)
	AdminTokenFile = "admin.token"       // bootstrap server only (0600)
	JoinTokenFile  = "join.token"        // bootstrap server only (0600)
	BootstrapFile  = "tls/bootstrap.pem" // the CA key, until the table holds it (0600)
)

// WritePEM writes one PEM block to path with mode, through a temporary file
// renamed into place, creating the directory.
func WritePEM(path, typ string, der []byte, mode os.FileMode) error {
	return WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// WriteFile writes b to path with mode, atomically.
func WriteFile(path string, b []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil { // umask
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// ReadPEM reads the first PEM block of type typ from path.
func ReadPEM(path, typ string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s: no %s in it", path, typ)
		}
		if blk.Type == typ {
			return blk.Bytes, nil
		}
	}
}

// ReadCA reads a CA certificate from a PEM file.
func ReadCA(path string) (*x509.Certificate, error) {
	der, err := ReadPEM(path, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// LoadCredentials reads a node's credentials from its data dir. It returns
// an error wrapping os.ErrNotExist when the node has none yet.
func LoadCredentials(dataDir string) (*Credentials, error) {
	caDER, err := ReadPEM(filepath.Join(dataDir, CAFile), "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	certDER, err := ReadPEM(filepath.Join(dataDir, NodeCertFile), "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	keyDER, err := ReadPEM(filepath.Join(dataDir, NodeKeyFile), "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	key, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dataDir, NodeKeyFile), err)
	}
	return NewCredentials(certDER, key, caDER)
}

// Save writes the credentials into a data dir: the CA world-readable, the
// certificate and key for root only. The key goes last, so that a data dir
// with a key has the rest.
func (c *Credentials) Save(dataDir string) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.Cert.PrivateKey)
	if err != nil {
		return fmt.Errorf("save credentials: %w", err)
	}
	errs := []error{
		WritePEM(filepath.Join(dataDir, CAFile), "CERTIFICATE", c.CA.Raw, 0o644),
		WritePEM(filepath.Join(dataDir, NodeCertFile), "CERTIFICATE", c.Cert.Certificate[0], 0o600),
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("save credentials: %w", err)
	}
	if err := WritePEM(filepath.Join(dataDir, NodeKeyFile), "PRIVATE KEY", keyDER, 0o600); err != nil {
		return fmt.Errorf("save credentials: %w", err)
	}
	return nil
}
