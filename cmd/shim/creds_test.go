package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// tlsFake serves f over HTTPS with a certificate from a fresh CA, and
// records the Authorization headers it sees.
type tlsFake struct {
	srv   *httptest.Server
	caPEM []byte
	mu    sync.Mutex
	auths []string
}

func newTLSFake(t *testing.T, f *fakeServer) *tlsFake {
	t.Helper()
	ca, err := auth.NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	key, _ := auth.NewKey()
	csr, _ := auth.NewCSR(key, "s1", []string{"127.0.0.1"})
	der, _, err := ca.Sign(csr, auth.RoleServer, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cr, err := auth.NewCredentials(der, key, ca.Cert.Raw)
	if err != nil {
		t.Fatal(err)
	}
	tf := &tlsFake{}
	_, h := shimv1connect.NewShimServiceHandler(f)
	tf.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tf.mu.Lock()
		tf.auths = append(tf.auths, r.Header.Get("Authorization"))
		tf.mu.Unlock()
		h.ServeHTTP(w, r)
	}))
	tf.srv.TLS = cr.TLS(auth.APIServer)
	tf.srv.StartTLS()
	t.Cleanup(tf.srv.Close)
	dir := t.TempDir()
	if err := auth.WritePEM(filepath.Join(dir, "ca.pem"), "CERTIFICATE", ca.Cert.Raw, 0o644); err != nil {
		t.Fatal(err)
	}
	tf.caPEM, _ = os.ReadFile(filepath.Join(dir, "ca.pem"))
	return tf
}

// runReal runs the CLI with its real dialer, the given environment and
// working directory.
func runReal(t *testing.T, env map[string]string, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	a := newApp(&out, &errOut)
	a.getenv = func(k string) string { return env[k] }
	code := a.execute(context.Background(), args)
	if errOut.Len() > 0 && (strings.Count(errOut.String(), "\n") != 1 || !strings.HasPrefix(errOut.String(), "shim: ")) {
		t.Errorf("shim %q: stderr is not one 'shim: ' line: %q", args, errOut.String())
	}
	return result{code, out.String(), errOut.String()}
}

func TestCredentialsFromDataDir(t *testing.T) {
	tf := newTLSFake(t, &fakeServer{})
	addr := strings.TrimPrefix(tf.srv.URL, "https://")
	dir := t.TempDir()
	tok := auth.NewToken("").String()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), tf.caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "admin.token"), []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// No flags: $SHIM_DATA_DIR's admin.token and ca.pem.
	r := runReal(t, map[string]string{"SHIM_DATA_DIR": dir, "SHIM_ADDR": addr}, "nodes")
	if r.code != 0 {
		t.Fatalf("nodes with the data dir's credentials: %+v", r)
	}
	// Flags win over the data dir; the environment too.
	other := auth.NewToken("").String()
	r = runReal(t, map[string]string{"SHIM_DATA_DIR": dir, "SHIM_ADDR": addr}, "--token", other, "nodes")
	r2 := runReal(t, map[string]string{"SHIM_DATA_DIR": dir, "SHIM_ADDR": addr, "SHIM_TOKEN": other}, "ps")
	if r.code != 0 || r2.code != 0 {
		t.Fatalf("--token: %+v; $SHIM_TOKEN: %+v", r, r2)
	}
	tf.mu.Lock()
	got := tf.auths
	tf.mu.Unlock()
	if len(got) != 3 || got[0] != "Bearer "+tok || got[1] != "Bearer "+other || got[2] != "Bearer "+other {
		t.Errorf("Authorization headers %q", got)
	}
	caFile := filepath.Join(dir, "ca.pem")
	empty := t.TempDir()
	r = runReal(t, map[string]string{"SHIM_DATA_DIR": empty, "SHIM_ADDR": addr, "SHIM_TOKEN": tok, "SHIM_CA": caFile}, "nodes")
	if r.code != 0 {
		t.Errorf("$SHIM_CA: %+v", r)
	}
}

func TestCredentialsMissing(t *testing.T) {
	tf := newTLSFake(t, &fakeServer{})
	addr := strings.TrimPrefix(tf.srv.URL, "https://")
	empty := t.TempDir()
	tok := auth.NewToken("").String()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	_ = os.WriteFile(caFile, tf.caPEM, 0o644)
	for _, c := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{map[string]string{"SHIM_DATA_DIR": empty}, nil,
			"shim: no token: looked for --token, $SHIM_TOKEN and " + filepath.Join(empty, "admin.token") + " (no such file or directory)\n"},
		{map[string]string{"SHIM_DATA_DIR": empty, "SHIM_TOKEN": tok}, nil,
			"shim: no cluster CA: looked for --ca, $SHIM_CA and " + filepath.Join(empty, "ca.pem") + " (no such file or directory)\n"},
		{map[string]string{"SHIM_TOKEN": tok}, []string{"--ca", "/nonexistent/ca.pem"},
			"shim: cluster CA from --ca (/nonexistent/ca.pem): no such file or directory\n"},
		{map[string]string{"SHIM_TOKEN": "not-a-token", "SHIM_CA": caFile}, nil,
			"shim: token from $SHIM_TOKEN: malformed token: want <id>.<secret> (12 and 32 hex digits)\n"},
		{map[string]string{}, nil,
			"shim: no token: looked for --token, $SHIM_TOKEN and shim-data/admin.token (no such file or directory)\n"},
	} {
		c.env["SHIM_ADDR"] = addr
		r := runReal(t, c.env, append(c.args, "ps")...)
		if r.code != 1 || r.errOut != c.want {
			t.Errorf("env %v: exit %d, %q; want %q", c.env, r.code, r.errOut, c.want)
		}
	}
	// A CA that did not sign the server: one line, the address and why.
	other := newTLSFake(t, &fakeServer{})
	wrong := filepath.Join(t.TempDir(), "ca.pem")
	_ = os.WriteFile(wrong, other.caPEM, 0o644)
	r := runReal(t, map[string]string{"SHIM_ADDR": addr, "SHIM_TOKEN": tok, "SHIM_CA": wrong}, "ps")
	if r.code != 1 || !strings.Contains(r.errOut, addr) || !strings.Contains(r.errOut, "certificate") {
		t.Errorf("wrong CA: %+v", r)
	}
	// http:// (a cluster with trust off) needs no credentials.
	plain := httptest.NewServer(func() http.Handler { _, h := shimv1connect.NewShimServiceHandler(&fakeServer{}); return h }())
	defer plain.Close()
	if r := runReal(t, map[string]string{"SHIM_DATA_DIR": empty}, "--addr", plain.URL, "ps"); r.code != 0 {
		t.Errorf("http:// without credentials: %+v", r)
	}
}

func TestTokenCommands(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "token", "create", "--role", "root")
	if r.code != 2 || !strings.Contains(r.errOut, `invalid --role "root"`) {
		t.Errorf("bad role: %+v", r)
	}
	r, _ = runShim(t, f, "", "token", "create")
	if r.code != 2 {
		t.Errorf("no role: %+v", r)
	}
	r, _ = runShim(t, f, "", "token", "create", "--role", "read", "--ttl", "1h", "--name", "ci")
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if r.code != 0 || lines[len(lines)-1] != f.lastToken || f.createReq.GetTtlMillis() != 3600000 ||
		f.createReq.GetRole() != pb.TokenRole_TOKEN_ROLE_READ || f.createReq.GetName() != "ci" {
		t.Errorf("create: %+v, %v", r, f.createReq)
	}
	r, _ = runShim(t, f, "", "token", "list", "-o", "json")
	if r.code != 0 || !strings.Contains(r.out, `"role": "read"`) || strings.Contains(r.out, "hash") {
		t.Errorf("list: %+v", r)
	}
	r, _ = runShim(t, f, "", "token", "revoke", "nope")
	if r.code != 2 {
		t.Errorf("revoke a bad id: %+v", r)
	}
	r, _ = runShim(t, f, "", "token", "revoke", f.lastToken)
	if r.code != 0 || f.revoked != strings.SplitN(f.lastToken, ".", 2)[0] {
		t.Errorf("revoke by token: %+v, revoked %q", r, f.revoked)
	}
}

func (f *fakeServer) CreateToken(_ context.Context, r *connect.Request[pb.CreateTokenRequest]) (*connect.Response[pb.CreateTokenResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.createReq = r.Msg
	tok := auth.NewToken("")
	f.lastToken = tok.String()
	rec := &pb.TokenRecord{Id: tok.ID, Role: r.Msg.Role, Name: r.Msg.Name, CreatedUnixNano: t0.UnixNano()}
	f.tokens = append(f.tokens, rec)
	return connect.NewResponse(&pb.CreateTokenResponse{Token: f.lastToken, Record: rec}), nil
}

func (f *fakeServer) ListTokens(context.Context, *connect.Request[pb.ListTokensRequest]) (*connect.Response[pb.ListTokensResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return connect.NewResponse(&pb.ListTokensResponse{Tokens: f.tokens}), nil
}

func (f *fakeServer) RevokeToken(_ context.Context, r *connect.Request[pb.RevokeTokenRequest]) (*connect.Response[pb.RevokeTokenResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.revoked = r.Msg.Id
	return connect.NewResponse(&pb.RevokeTokenResponse{}), nil
}
