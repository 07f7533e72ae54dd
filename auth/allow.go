package auth

import (
	"errors"
	"fmt"
	"strings"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Kind says how a caller proved who it is.
type Kind int

const (
	KindNone  Kind = iota // nothing: no certificate, no token
	KindNode              // a node certificate the TLS handshake verified
	KindToken             // a bearer token
	KindSelf              // trust is off (tests, benchmarks): may do anything
	// KindWorkload is a workload's self token (self.go): its own record
	// and bounds only, checked per process by OwnProcess.
	KindWorkload
)

// Role is what a token may do, or what a node certificate's node is.
type Role string

const (
	RoleAdmin    Role = "admin"    // token: everything a user can do
	RoleOperator Role = "operator" // token: run and stop processes (not as root), and read
	RoleRead     Role = "read"     // token: read
	RoleNode     Role = "node"     // token: join a node (have its certificate signed)
	RoleServer   Role = "server"   // node certificate: a Raft voter
	RoleWorker   Role = "worker"   // node certificate: runs processes only
	RoleSelf     Role = "self"     // a workload's self token: its own process only
)

// TokenRoles are the roles a token may have, for usage messages.
var TokenRoles = []Role{RoleAdmin, RoleOperator, RoleRead, RoleNode}

// ParseTokenRole reads a token role by name.
func ParseTokenRole(s string) (Role, error) {
	for _, r := range TokenRoles {
		if string(r) == s {
			return r, nil
		}
	}
	return "", fmt.Errorf("unknown role %q: use admin, operator, read or node", s)
}

// Identity is who a caller is.
type Identity struct {
	Kind    Kind
	Node    string // KindNode: the certificate's node name
	Role    Role
	TokenID string // KindToken: the token's id
	// Unchecked marks a token a worker passed on without checking it (it
	// holds no table): only a server's answer may rest on it.
	Unchecked bool
	// KindWorkload: the process and incarnation the self token names.
	Process     string
	Incarnation uint64
}

// Self is the identity of every caller when trust is off.
var Self = Identity{Kind: KindSelf, Role: RoleAdmin}

func (id Identity) String() string {
	switch id.Kind {
	case KindNode:
		return fmt.Sprintf("node %s (%s certificate)", id.Node, id.Role)
	case KindToken:
		if id.Unchecked {
			return "token " + id.TokenID
		}
		return fmt.Sprintf("token %s (%s)", id.TokenID, id.Role)
	case KindSelf:
		return "anyone (trust is off)"
	case KindWorkload:
		return fmt.Sprintf("process %s (incarnation %d, self token)", id.Process, id.Incarnation)
	}
	return "no credentials"
}

// Sentinel errors of Allow and ActsFor; the API maps them to Connect's
// unauthenticated and permission_denied.
var (
	ErrUnauthenticated  = errors.New("unauthenticated")
	ErrPermissionDenied = errors.New("permission denied")
)

// Procedures that are not Connect RPCs.
const (
	ProcMetrics         = "/metrics"
	ProcHeartbeatStream = "/shim/v1/heartbeat-stream"
	// ProcEvents is the event stream (ShimService.Events), read access.
	ProcEvents = "/shim.v1.ShimService/Events"
)

const shimService = "/" + shimv1connect.ShimServiceName + "/"

// What each kind of caller may call. Admin tokens may call every
// ShimService procedure and /metrics; the sets below are the rest.
var (
	readProcs = set(
		shimv1connect.ShimServiceListProcedure,
		shimv1connect.ShimServiceNodesProcedure,
		shimv1connect.ShimServiceLogsProcedure,
		shimv1connect.ShimServiceWhoamiProcedure,
		ProcEvents,
		ProcMetrics,
		shimv1connect.ShimServiceEndpointsProcedure,
		shimv1connect.ShimServiceServicesProcedure,
	)
	operatorProcs = union(readProcs, set(
		shimv1connect.ShimServiceSpawnProcedure,
		shimv1connect.ShimServiceKillProcedure,
		shimv1connect.ShimServiceResizeProcedure,
		shimv1connect.ShimServiceDrainProcedure,
		shimv1connect.ShimServiceSetGrantProcedure,
		shimv1connect.ShimServiceScaleProcedure,
		shimv1connect.ShimServiceUpdateProcedure,
		shimv1connect.ShimServiceExecProcedure,
	))
	// selfProcs: a workload's self token reads its own record and changes
	// its own bounds and grant (the handlers check the id: OwnProcess).
	selfProcs = set(
		shimv1connect.ShimServiceListProcedure,
		shimv1connect.ShimServiceResizeProcedure,
		shimv1connect.ShimServiceSetGrantProcedure,
	)
	// joinProcs: a join token only has its node's certificate signed.
	joinProcs = set(
		shimv1connect.AgentServiceCertifyProcedure,
		shimv1connect.ShimServiceWhoamiProcedure,
	)
	// nodeProcs: any node certificate, acting for itself (ActsFor).
	nodeProcs = set(
		shimv1connect.AgentServiceJoinProcedure,
		shimv1connect.AgentServiceLeaveProcedure,
		shimv1connect.AgentServiceHeartbeatProcedure,
		shimv1connect.AgentServiceAssignmentsProcedure,
		shimv1connect.AgentServiceReportProcedure,
		shimv1connect.ShimServiceWhoamiProcedure,
		shimv1connect.ShimServiceSetGrantProcedure, // its own processes' grants (the handler checks)
		ProcHeartbeatStream,
		shimv1connect.ShimServiceEndpointsProcedure, // a worker's DNS server reads them
	)
	// serverProcs: a server certificate also commits forwarded writes,
	// asks the leader for a read index, and asks nodes for their
	// processes' use and logs.
	serverProcs = union(nodeProcs, set(
		shimv1connect.AgentServiceApplyProcedure,
		shimv1connect.AgentServiceReadIndexProcedure,
		shimv1connect.AgentServiceUsageProcedure,
		shimv1connect.ShimServiceLogsProcedure,
		shimv1connect.ShimServiceExecProcedure, // to the process's node
	))
)

// Allow decides whether id may call procedure (a Connect procedure such as
// "/shim.v1.ShimService/Spawn", or ProcMetrics, ProcHeartbeatStream). It is
// pure. The error wraps ErrUnauthenticated when the caller is nobody, and
// ErrPermissionDenied when it may not.
//
// A token a worker could not check (Unchecked) may call the user API: the
// worker passes the call on with the token, and the server decides.
func Allow(id Identity, procedure string) error {
	var ok bool
	switch id.Kind {
	case KindSelf:
		return nil
	case KindNone:
		return fmt.Errorf("%w: %s needs a token (Authorization: Bearer) or a node certificate", ErrUnauthenticated, procName(procedure))
	case KindToken:
		switch {
		case id.Unchecked:
			ok = strings.HasPrefix(procedure, shimService)
		case id.Role == RoleAdmin:
			ok = strings.HasPrefix(procedure, shimService) || procedure == ProcMetrics
		case id.Role == RoleOperator:
			ok = operatorProcs[procedure]
		case id.Role == RoleRead:
			ok = readProcs[procedure]
		case id.Role == RoleNode:
			ok = joinProcs[procedure]
		}
	case KindWorkload:
		// Unchecked or not (a worker passes it on): the same few calls.
		ok = selfProcs[procedure]
	case KindNode:
		switch id.Role {
		case RoleServer:
			ok = serverProcs[procedure]
		case RoleWorker:
			ok = nodeProcs[procedure]
		}
	}
	if !ok {
		return fmt.Errorf("%w: %s may not call %s", ErrPermissionDenied, id, procName(procedure))
	}
	return nil
}

// ActsFor decides whether id may speak for node: heartbeat, report and read
// assignments as it, or join under its name. A worker certificate speaks only
// for itself; a server certificate also forwards other nodes' calls (it can
// commit anything through Raft anyway).
func ActsFor(id Identity, node string) error {
	switch {
	case id.Kind == KindSelf:
		return nil
	case id.Kind == KindNode && id.Role == RoleServer:
		return nil
	case id.Kind == KindNode && id.Node == node:
		return nil
	}
	return fmt.Errorf("%w: %s may not act as node %q", ErrPermissionDenied, id, node)
}

// procName shortens "/shim.v1.ShimService/Spawn" to "Spawn".
func procName(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 && strings.HasPrefix(p, "/shim.v1.") {
		return p[i+1:]
	}
	return p
}

func set(xs ...string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

func union(a, b map[string]bool) map[string]bool {
	m := make(map[string]bool, len(a)+len(b))
	for k := range a {
		m[k] = true
	}
	for k := range b {
		m[k] = true
	}
	return m
}
