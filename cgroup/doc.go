// Package cgroup maps shim's min/max/burst resource bounds onto cgroup v1 and
// v2 and manages one cgroup per process.
//
// A Manager owns one subtree (its root, a path relative to the cgroup mount
// such as "shim/node1") and creates one Group per managed process directly
// below it. On cgroup v1 a group exists once per controller hierarchy (cpu,
// cpuacct, memory, pids, freezer; cpuset is deliberately not used so that
// cpus/mems never have to be copied down), plus devices for a container's
// group (CreateDevices). On cgroup v2 it is a single directory with the cpu,
// memory and pids controllers enabled on the way down. A container runtime
// that joins a group by its path may create it in every mounted v1
// hierarchy; Delete removes it from those too.
//
// v1 is driven through github.com/containerd/cgroups/v3/cgroup1, with direct
// writes where that library has no field (cpu.cfs_burst_us, resetting
// pids.max to "max"). v2 is driven through the cgroup2 file interface
// directly; see the note on Manager.
package cgroup
