#!/bin/sh
# Entrypoint of the chaos image (busybox sh): make the container's cgroup v1
# hierarchies writable, then become shimd as PID 1, so that `docker kill`
# takes shimd and every process it started down at once, like a host dying.
#
# Docker bind-mounts each controller read-only (the container's own cgroup
# as root), and a plain "remount,rw" of a bind mount fails with EBUSY: the
# per-mount flag needs "remount,bind,rw". shimd creates shim/<node>/... below
# the container's cgroup, so nodes never share a cgroup path.
set -e
for c in cpu cpuacct memory pids freezer; do
	if [ -d /sys/fs/cgroup/$c ]; then
		mount -o remount,bind,rw /sys/fs/cgroup/$c
	fi
done
exec /bin/shimd "$@"
