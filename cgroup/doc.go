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
// Bounds are mapped by pure functions (MapV1, MapV2) and written through
// github.com/containerd/cgroups/v3: cgroup1 for v1, cgroup2 for v2, with
// direct writes only where those have no field (cpu.cfs_burst_us and
// cpu.max.burst, pids.max = "max" on v1, memory.max = "max" on v2). A Group
// remembers what it wrote, so an Update writes only the files that change.
// Listings, usage and kill read and write the control files directly: the
// libraries' versions stat every file of a group or read every statistic.
package cgroup
