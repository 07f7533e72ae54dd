//go:build !(cgo && seccomp)

package exec

// seccompBuilt: this binary compiles seccomp filters (-tags seccomp).
const seccompBuilt = false

// compileSeccomp: built without libseccomp, sandboxes get no seccomp
// filter (capabilities and no_new_privs still apply).
func compileSeccomp() ([]byte, error) { return nil, nil }
