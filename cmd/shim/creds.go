package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/shim-run/shim/auth"
)

// Credentials.
//
// The CLI presents a token (Authorization: Bearer) and trusts the cluster's
// CA. Each comes from its flag, else its environment variable, else the data
// dir of a shimd started in the same folder ($SHIM_DATA_DIR, default
// ./shim-data): the bootstrap server writes admin.token and ca.pem there, so
// `make run` and then `shim ps` next to it need no flags.

const defaultDataDir = "./shim-data"

type credentials struct {
	token string      // "" for none
	tls   *tls.Config // nil for http:// addresses
}

// credentials finds the token and, for https addresses, the CA. A missing
// or unreadable credential is an error saying where the CLI looked.
func (a *app) credentials(secure bool) (*credentials, error) {
	if a.creds != nil && (!secure || a.creds.tls != nil) {
		return a.creds, nil
	}
	dataDir := a.getenv("SHIM_DATA_DIR")
	if dataDir == "" {
		dataDir = defaultDataDir
	}
	cr := &credentials{}
	tok, err := a.token(dataDir)
	switch {
	case err == nil:
		cr.token = tok
	case secure:
		return nil, err
	}
	if secure {
		ca, err := a.readCA(dataDir)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		cr.tls = auth.Config(auth.APIClient, pool, nil)
	}
	a.creds = cr
	return cr, nil
}

func (a *app) token(dataDir string) (string, error) {
	raw, from := a.tokenFlag, "--token"
	if raw == "" {
		raw, from = a.getenv("SHIM_TOKEN"), "$SHIM_TOKEN"
	}
	if raw == "" {
		path := filepath.Join(dataDir, auth.AdminTokenFile)
		b, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("no token: looked for --token, $SHIM_TOKEN and %s (%s)", path, osReason(err))
		}
		raw, from = string(b), path
	}
	if auth.IsSelfToken(raw) { // a workload's own ($SHIM_TOKEN inside a sandbox)
		tok, err := auth.ParseSelfToken(raw)
		if err != nil {
			return "", fmt.Errorf("token from %s: %w", from, err)
		}
		return tok.String(), nil
	}
	tok, err := auth.ParseToken(raw)
	if err != nil {
		return "", fmt.Errorf("token from %s: %w", from, err)
	}
	return tok.String(), nil
}

func (a *app) readCA(dataDir string) (*x509.Certificate, error) {
	path, from := a.caFlag, "--ca"
	if path == "" {
		path, from = a.getenv("SHIM_CA"), "$SHIM_CA"
	}
	if path == "" {
		path, from = filepath.Join(dataDir, auth.CAFile), ""
	}
	ca, err := auth.ReadCA(path)
	if err != nil {
		if from == "" {
			return nil, fmt.Errorf("no cluster CA: looked for --ca, $SHIM_CA and %s (%s)", path, osReason(err))
		}
		return nil, fmt.Errorf("cluster CA from %s (%s): %s", from, path, osReason(err))
	}
	return ca, nil
}

// osReason is an OS error without the operation: "no such file or directory".
func osReason(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
