package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// A node's trust material, in its data dir (auth's file names):
//
//	ca.pem              the cluster CA (0644): what the CLI trusts
//	tls/node.pem        this node's certificate (0600)
//	tls/node-key.pem    its key (0600)
//	admin.token         bootstrap server: an admin token (0600)
//	join.token          bootstrap server: a join token, CA pin included (0600)
//	tls/bootstrap.pem   bootstrap server: the CA key, until the table holds it
//
// A node that has its certificate reuses it. The first server of a cluster
// (no --join, nothing in its data dir) makes all of it. Any other node
// enrolls: it gets the CA from a member's TLS handshake, trusted only if it
// matches the join token's pin, and sends a certificate request with the
// token to Certify.

// bootstrap is what the first server commits once it leads.
type bootstrap struct {
	trust  *pb.Trust
	tokens []*pb.TokenRecord
}

// trustSetup finds, makes or fetches this node's credentials. boot is set
// while the bootstrap's trust is not yet in the table.
func trustSetup(ctx context.Context, o *options, role pb.NodeRole, join []string, hosts []string, log *slog.Logger) (creds *auth.Credentials, boot *bootstrap, err error) {
	wantRole := auth.RoleWorker
	if role == pb.NodeRole_NODE_ROLE_SERVER {
		wantRole = auth.RoleServer
	}
	creds, err = auth.LoadCredentials(o.dataDir)
	switch {
	case err == nil:
		if creds.Node.Node != o.name || creds.Node.Role != wantRole {
			return nil, nil, fmt.Errorf("%s holds the certificate of %s, not of %s %s: use the node's own data dir",
				filepath.Join(o.dataDir, auth.NodeCertFile), creds.Node, wantRole, o.name)
		}
		boot, err = pendingBootstrap(o.dataDir)
		return creds, boot, err
	case !errors.Is(err, os.ErrNotExist):
		return nil, nil, fmt.Errorf("credentials: %w", err)
	}
	if _, err := os.Stat(filepath.Join(o.dataDir, "raft", "raft.db")); err == nil {
		return nil, nil, fmt.Errorf("%s holds Raft state but no node certificate (%s): it predates cluster trust or lost its tls/ directory; start this node with an empty data dir and --join",
			o.dataDir, filepath.Join(o.dataDir, auth.NodeCertFile))
	}
	if len(join) == 0 {
		return makeCluster(o, hosts, log)
	}
	tok, err := joinToken(o)
	if err != nil {
		return nil, nil, err
	}
	creds, err = (&enroller{join: join, tok: tok}).enroll(ctx, o.name, role, hosts)
	if err != nil {
		return nil, nil, err
	}
	if err := creds.Save(o.dataDir); err != nil {
		return nil, nil, err
	}
	log.Info("joined the cluster's trust: certificate signed", "node", o.name, "role", wantRole)
	return creds, nil, nil
}

// makeCluster makes a new cluster's CA, this server's certificate and the
// first two tokens, and writes them to the data dir. The CA key also goes to
// tls/bootstrap.pem until the table holds it (then it lives only there), so
// that a crash before that commit loses nothing.
func makeCluster(o *options, hosts []string, log *slog.Logger) (*auth.Credentials, *bootstrap, error) {
	cluster := auth.NewClusterID()
	ca, err := auth.NewCA(cluster, time.Now())
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := ca.KeyDER()
	if err != nil {
		return nil, nil, err
	}
	key, err := auth.NewKey()
	if err != nil {
		return nil, nil, err
	}
	csr, err := auth.NewCSR(key, o.name, hosts)
	if err != nil {
		return nil, nil, err
	}
	der, _, err := ca.Sign(csr, auth.RoleServer, time.Now())
	if err != nil {
		return nil, nil, err
	}
	creds, err := auth.NewCredentials(der, key, ca.Cert.Raw)
	if err != nil {
		return nil, nil, err
	}
	admin, join := auth.NewToken(""), auth.NewToken(ca.Pin())
	dir := o.dataDir
	if err := auth.WritePEM(filepath.Join(dir, auth.BootstrapFile), "PRIVATE KEY", keyDER, 0o600); err != nil {
		return nil, nil, fmt.Errorf("bootstrap: %w", err)
	}
	for f, tok := range map[string]auth.Token{auth.AdminTokenFile: admin, auth.JoinTokenFile: join} {
		if err := auth.WriteFile(filepath.Join(dir, f), []byte(tok.String()+"\n"), 0o600); err != nil {
			return nil, nil, fmt.Errorf("bootstrap: %w", err)
		}
	}
	if err := creds.Save(dir); err != nil {
		return nil, nil, err
	}
	log.Info("made a new cluster: CA, node certificate and tokens", "cluster", cluster,
		"ca", filepath.Join(dir, auth.CAFile), "admin_token", filepath.Join(dir, auth.AdminTokenFile),
		"join_token", filepath.Join(dir, auth.JoinTokenFile))
	boot, err := pendingBootstrap(dir)
	return creds, boot, err
}

// pendingBootstrap reads back what the bootstrap server has still to commit:
// nothing once tls/bootstrap.pem is gone.
func pendingBootstrap(dir string) (*bootstrap, error) {
	keyDER, err := auth.ReadPEM(filepath.Join(dir, auth.BootstrapFile), "PRIVATE KEY")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	caDER, err := auth.ReadPEM(filepath.Join(dir, auth.CAFile), "CERTIFICATE")
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	ca, err := auth.ParseCA(caDER, keyDER)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	cluster := ""
	if ou := ca.Cert.Subject.OrganizationalUnit; len(ou) > 0 {
		cluster = ou[0]
	}
	b := &bootstrap{trust: &pb.Trust{ClusterId: cluster, CaCert: caDER, CaKey: keyDER}}
	for f, role := range map[string]pb.TokenRole{auth.AdminTokenFile: pb.TokenRole_TOKEN_ROLE_ADMIN, auth.JoinTokenFile: pb.TokenRole_TOKEN_ROLE_NODE} {
		raw, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
		tok, err := auth.ParseToken(string(raw))
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %s: %w", filepath.Join(dir, f), err)
		}
		b.tokens = append(b.tokens, &pb.TokenRecord{Id: tok.ID, Hash: tok.Hash(), Role: role,
			Name: "bootstrap " + strings.TrimSuffix(f, ".token")})
	}
	return b, nil
}

// finishBootstrap commits the bootstrap's trust once this server leads, then
// removes the CA key file.
func finishBootstrap(ctx context.Context, srv *server.Server, dir string, b *bootstrap) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := srv.BootstrapTrust(ctx, b.trust, b.tokens); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, auth.BootstrapFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("bootstrap: %w", err)
	}
	return nil
}

// joinToken finds the join token: --join-token, $SHIM_JOIN_TOKEN or
// --join-token-file.
func joinToken(o *options) (auth.Token, error) {
	raw, from := o.joinToken, "--join-token"
	if raw == "" {
		raw, from = os.Getenv("SHIM_JOIN_TOKEN"), "$SHIM_JOIN_TOKEN"
	}
	if raw == "" && o.joinTokenFile != "" {
		b, err := os.ReadFile(o.joinTokenFile)
		if err != nil {
			return auth.Token{}, fmt.Errorf("--join-token-file: %w", err)
		}
		raw, from = string(b), o.joinTokenFile
	}
	if strings.TrimSpace(raw) == "" {
		return auth.Token{}, errors.New("joining needs a join token: pass --join-token, set $SHIM_JOIN_TOKEN or pass --join-token-file (the bootstrap server wrote one to <data-dir>/join.token; `shim token create --role node` makes more)")
	}
	tok, err := auth.ParseToken(raw)
	if err != nil {
		return auth.Token{}, fmt.Errorf("join token from %s: %w", from, err)
	}
	if tok.Pin == "" {
		return auth.Token{}, fmt.Errorf("join token from %s has no CA pin: use a join token as `shim token create --role node` prints it (SHIM1<pin>::<id>.<secret>)", from)
	}
	return tok, nil
}

// enroller gets nodes' certificates signed with a join token: it fetches
// the CA from a member (trusted only if it matches the token's pin), then
// sends each node's certificate request with the token to Certify. It
// retries while no member can answer, and gives up at once on a refusal.
type enroller struct {
	join  []string
	tok   auth.Token
	ca    *x509.Certificate // once fetched
	httpc *http.Client      // trusts ca
}

func (e *enroller) enroll(ctx context.Context, name string, role pb.NodeRole, hosts []string) (*auth.Credentials, error) {
	key, err := auth.NewKey()
	if err != nil {
		return nil, err
	}
	csr, err := auth.NewCSR(key, name, hosts)
	if err != nil {
		return nil, err
	}
	backoff := 100 * time.Millisecond
	for {
		var last error
		for _, addr := range e.join {
			creds, err := e.enrollAt(ctx, addr, csr, role, key)
			if err == nil {
				return creds, nil
			}
			switch connect.CodeOf(err) {
			case connect.CodeUnauthenticated, connect.CodePermissionDenied, connect.CodeInvalidArgument, connect.CodeAlreadyExists:
				return nil, fmt.Errorf("join %s: %s", addr, oneLine(err))
			}
			if errors.Is(err, auth.ErrPin) {
				return nil, fmt.Errorf("join %s: %w: the join token is for another cluster, or something else answers there", addr, err)
			}
			last = err
		}
		slog.Warn("cannot enroll yet; retrying", "node", name, "join", e.join, "err", last)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("join: %w (last: %v)", ctx.Err(), last)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (e *enroller) enrollAt(ctx context.Context, addr string, csr []byte, role pb.NodeRole, key *ecdsa.PrivateKey) (*auth.Credentials, error) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if e.ca == nil {
		ca, err := auth.FetchCA(rctx, addr, e.tok.Pin)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		e.ca, e.httpc = ca, server.NewHTTPClient(auth.Config(auth.APIClient, pool, nil))
	}
	cl := shimv1connect.NewAgentServiceClient(e.httpc, server.URL(addr, true))
	req := connect.NewRequest(&pb.CertifyRequest{Csr: csr, Role: role})
	req.Header().Set("Authorization", "Bearer "+e.tok.String())
	resp, err := cl.Certify(rctx, req)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(resp.Msg.CaCert, e.ca.Raw) {
		return nil, fmt.Errorf("%w: Certify answered with another CA", auth.ErrPin)
	}
	return auth.NewCredentials(resp.Msg.Cert, key, resp.Msg.CaCert)
}

// oneLine is a Connect error's message on one line.
func oneLine(err error) string {
	var ce *connect.Error
	msg := err.Error()
	if errors.As(err, &ce) {
		msg = ce.Message()
	}
	return strings.Join(strings.Fields(msg), " ")
}

// certHosts are the names and addresses a node's certificate carries: what
// it advertises and where it listens (unless that is every address).
func certHosts(addrs ...string) []string {
	var out []string
	for _, a := range addrs {
		if a == "" {
			continue
		}
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			host = a
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			continue
		}
		out = append(out, host)
	}
	return out
}
