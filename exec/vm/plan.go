package vm

import (
	"fmt"

	"github.com/shim-run/shim/cgroup"
)

// Sizes.
const (
	// MemBlock is virtio-mem's block size: the grain of memory grants.
	MemBlock = 2 << 20
	// MinBootMem is the least memory a guest boots with: the Debian kernel
	// keeps about 58 MiB of it for itself.
	MinBootMem = 128 << 20
	// DefaultGrantMem is the starting memory when neither a grant nor a
	// minimum is given.
	DefaultGrantMem = 256 << 20
	// DefaultMemMargin is what the QEMU process gets in its cgroup beyond
	// the guest's memory, for QEMU itself (see the package doc for the
	// measurement).
	DefaultMemMargin = 128 << 20
	// DefaultCPUMarginMilli is what the QEMU process gets beyond the CPU
	// grant: its main loop and I/O threads.
	DefaultCPUMarginMilli = 100
	// linuxMemBlock is the guest kernel's memory block on x86-64: the
	// virtio-mem region is a whole number of them, since the guest only
	// uses complete blocks.
	linuxMemBlock = 128 << 20
	// maxVCPUs bounds the vCPUs of one VM.
	maxVCPUs = 64
	// qemuPids bounds the tasks of the QEMU process (vCPU, I/O and 9p
	// worker threads); the workload's own pids limit is the guest's
	// business.
	qemuPids = 512
)

// plan is a VM's fixed shape and its current grant.
type plan struct {
	BootMem  int64 `json:"boot_mem"`  // RAM at boot; never removed
	MaxMem   int64 `json:"max_mem"`   // the most the guest can have
	Region   int64 `json:"region"`    // size of the virtio-mem region (0 = none)
	MaxVCPUs int   `json:"max_vcpus"` // vCPUs present
	GrantMem int64 `json:"grant_mem"` // guest memory now: BootMem + plugged
	VCPUs    int   `json:"vcpus"`     // vCPUs online now
	GrantCPU int64 `json:"grant_cpu"` // millicores now (the cgroup quota, less the margin)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// newPlan shapes a VM from its bounds and starting grant (0 = default).
//
// Memory: the guest boots with max(min, MinBootMem, max/32) (the last so
// that the kernel's page structures for all the memory it may get fit in
// memory it cannot lose), and a virtio-mem device covers the rest up to
// max, of which the grant less the boot memory is plugged from the start.
// So the guest starts with its grant and can shrink back to its boot
// memory. A max of 0 means no growth beyond the grant.
//
// CPU: ceil(max) vCPUs present (ceil(grant) if max is 0), of which
// ceil(grant) online.
func newPlan(r cgroup.Resources, grantMem, grantCPU int64) (plan, error) {
	if err := r.Validate(); err != nil {
		return plan{}, fmt.Errorf("resources: %w", ErrInvalid)
	}
	if grantMem < 0 || grantCPU < 0 {
		return plan{}, fmt.Errorf("negative grant: %w", ErrInvalid)
	}
	if grantMem == 0 {
		grantMem = max(r.MemMinBytes, DefaultGrantMem)
		if r.MemMaxBytes > 0 {
			grantMem = min(grantMem, r.MemMaxBytes)
		}
	}
	maxMem := r.MemMaxBytes
	if maxMem == 0 {
		maxMem = max(grantMem, r.MemMinBytes)
	}
	maxMem = roundUp(maxMem, MemBlock)
	if maxMem < MinBootMem {
		return plan{}, fmt.Errorf("memory maximum %d MiB is below a VM's minimum of %d MiB: %w",
			maxMem>>20, MinBootMem>>20, ErrInvalid)
	}
	if grantMem > maxMem {
		return plan{}, fmt.Errorf("memory grant %d MiB exceeds the maximum %d MiB: %w", grantMem>>20, maxMem>>20, ErrInvalid)
	}
	p := plan{BootMem: min(roundUp(max(r.MemMinBytes, MinBootMem, maxMem/32), MemBlock), maxMem), MaxMem: maxMem}
	if p.MaxMem > p.BootMem {
		p.Region = roundUp(p.MaxMem-p.BootMem, linuxMemBlock)
	}
	p.GrantMem = p.memTarget(grantMem)

	if grantCPU == 0 {
		grantCPU = max(r.CPUMinMilli, 1000)
		if r.CPUMaxMilli > 0 {
			grantCPU = min(grantCPU, r.CPUMaxMilli)
		}
	}
	maxCPU := r.CPUMaxMilli
	if maxCPU == 0 {
		maxCPU = grantCPU
	}
	if grantCPU > maxCPU {
		return plan{}, fmt.Errorf("CPU grant %dm exceeds the maximum %dm: %w", grantCPU, maxCPU, ErrInvalid)
	}
	p.MaxVCPUs = vcpusFor(maxCPU)
	if p.MaxVCPUs > maxVCPUs {
		return plan{}, fmt.Errorf("CPU maximum %dm is more than %d vCPUs: %w", maxCPU, maxVCPUs, ErrInvalid)
	}
	p.GrantCPU, p.VCPUs = grantCPU, vcpusFor(grantCPU)
	return p, nil
}

// vcpusFor is ceil(milli/1000), at least 1.
func vcpusFor(milli int64) int { return max(1, int((milli+999)/1000)) }

// memTarget is the guest memory for a grant: at least the boot memory,
// rounded up to MemBlock, at most MaxMem.
func (p plan) memTarget(grant int64) int64 {
	return min(roundUp(max(grant, p.BootMem), MemBlock), p.MaxMem)
}

// plugged is the virtio-mem requested-size for guest memory mem.
func (p plan) plugged(mem int64) int64 { return mem - p.BootMem }

// resize returns the plan for a new grant.
func (p plan) resize(mem, cpuMilli int64) (plan, error) {
	if mem <= 0 || cpuMilli <= 0 {
		return p, fmt.Errorf("resize: memory %d and CPU %dm must be positive: %w", mem, cpuMilli, ErrInvalid)
	}
	if mem > p.MaxMem {
		return p, fmt.Errorf("resize: memory %d MiB exceeds the VM's maximum %d MiB (fixed at start): %w",
			mem>>20, p.MaxMem>>20, ErrInvalid)
	}
	if v := vcpusFor(cpuMilli); v > p.MaxVCPUs {
		return p, fmt.Errorf("resize: CPU %dm needs %d vCPUs, more than the VM's maximum %d (fixed at start): %w",
			cpuMilli, v, p.MaxVCPUs, ErrInvalid)
	}
	p.GrantMem, p.GrantCPU, p.VCPUs = p.memTarget(mem), cpuMilli, vcpusFor(cpuMilli)
	return p, nil
}

// groupResources are the cgroup bounds of the QEMU process: the guest's
// memory (guestMem, which may lag a shrinking grant) and CPU grant plus the
// margins for QEMU itself; the minimum bounds as given.
func groupResources(r cgroup.Resources, guestMem, cpuMilli, memMargin, cpuMargin int64) cgroup.Resources {
	return cgroup.Resources{
		CPUMinMilli:   r.CPUMinMilli,
		CPUMaxMilli:   cpuMilli + cpuMargin,
		CPUBurstMilli: r.CPUBurstMilli,
		MemMinBytes:   r.MemMinBytes,
		MemMaxBytes:   guestMem + memMargin,
		PidsMax:       qemuPids,
	}
}
