package cgroup

import (
	"fmt"
	"strconv"
)

// Resources are shim's resource bounds for one process. Zero means unset.
type Resources struct {
	CPUMinMilli   int64 // guaranteed CPU share, in millicores
	CPUMaxMilli   int64 // hard CPU ceiling, in millicores
	CPUBurstMilli int64 // CPU time that may be banked above the ceiling, in millicores per period
	MemMinBytes   int64 // protected (v2) / soft-limited (v1) memory
	MemMaxBytes   int64 // hard memory limit; exceeding it triggers the OOM killer
	PidsMax       int64 // maximum number of tasks (processes and threads)
}

// Validate reports whether r is usable: no field may be negative.
func (r Resources) Validate() error {
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"CPUMinMilli", r.CPUMinMilli}, {"CPUMaxMilli", r.CPUMaxMilli},
		{"CPUBurstMilli", r.CPUBurstMilli}, {"MemMinBytes", r.MemMinBytes},
		{"MemMaxBytes", r.MemMaxBytes}, {"PidsMax", r.PidsMax},
	} {
		if f.v < 0 {
			return fmt.Errorf("%s %d is negative: %w", f.name, f.v, ErrInvalid)
		}
	}
	return nil
}

const (
	// CFSPeriodUs is the CFS bandwidth period used for every group (100ms).
	CFSPeriodUs = 100000
	// minQuotaUs is the smallest quota the kernel accepts (1ms).
	minQuotaUs = 1000

	sharesPerCore = 1024
	minShares     = 2
	maxShares     = 262144

	weightPerCore = 100 // cgroup v2 default weight equals one core
	minWeight     = 1
	maxWeight     = 10000
)

// V1 holds the cgroup v1 file values for a Resources. -1 means "unlimited"
// wherever the kernel file accepts it.
type V1 struct {
	CPUShares       uint64 // cpu.shares: 1024 per core of CPUMinMilli, at least 2
	CPUCfsPeriodUs  uint64 // cpu.cfs_period_us: always CFSPeriodUs
	CPUCfsQuotaUs   int64  // cpu.cfs_quota_us: CPUMaxMilli per period (>= 1000), -1 = unlimited
	CPUCfsBurstUs   uint64 // cpu.cfs_burst_us: 0 = none; clamped to the quota, 0 without a quota
	MemoryLimit     int64  // memory.limit_in_bytes: MemMaxBytes, -1 = unlimited
	MemorySoftLimit int64  // memory.soft_limit_in_bytes: MemMinBytes, -1 = unlimited
	PidsMax         int64  // pids.max: -1 = "max"
}

// MapV1 maps r onto cgroup v1 values. Unset fields map to the values that
// undo a previous limit, so the result can be applied as a live update.
func MapV1(r Resources) V1 {
	v := V1{
		CPUShares:       minShares,
		CPUCfsPeriodUs:  CFSPeriodUs,
		CPUCfsQuotaUs:   -1,
		MemoryLimit:     -1,
		MemorySoftLimit: -1,
		PidsMax:         -1,
	}
	if r.CPUMinMilli > 0 {
		v.CPUShares = uint64(clamp(r.CPUMinMilli*sharesPerCore/1000, minShares, maxShares))
	}
	if q := quotaUs(r.CPUMaxMilli); q > 0 {
		v.CPUCfsQuotaUs = q
		v.CPUCfsBurstUs = burstUs(r.CPUBurstMilli, q)
	}
	if r.MemMaxBytes > 0 {
		v.MemoryLimit = r.MemMaxBytes
	}
	if r.MemMinBytes > 0 {
		v.MemorySoftLimit = r.MemMinBytes
	}
	if r.PidsMax > 0 {
		v.PidsMax = r.PidsMax
	}
	return v
}

// V2 holds the cgroup v2 file contents for a Resources, exactly as written.
type V2 struct {
	CPUWeight   uint64 // cpu.weight: 100 per core of CPUMinMilli, 1..10000
	CPUMax      string // cpu.max: "<quota> <period>" or "max 100000"
	CPUMaxBurst uint64 // cpu.max.burst: 0 = none; clamped to the quota, 0 without a quota
	MemoryMin   uint64 // memory.min: MemMinBytes, 0 = none
	MemoryMax   string // memory.max: bytes or "max"
	PidsMax     string // pids.max: count or "max"
}

// MapV2 maps r onto cgroup v2 values. Unset fields map to the values that
// undo a previous limit, so the result can be applied as a live update.
func MapV2(r Resources) V2 {
	v := V2{
		CPUWeight: minWeight,
		CPUMax:    "max " + strconv.Itoa(CFSPeriodUs),
		MemoryMax: "max",
		PidsMax:   "max",
	}
	if r.CPUMinMilli > 0 {
		v.CPUWeight = uint64(clamp(r.CPUMinMilli*weightPerCore/1000, minWeight, maxWeight))
	}
	if q := quotaUs(r.CPUMaxMilli); q > 0 {
		v.CPUMax = strconv.FormatInt(q, 10) + " " + strconv.Itoa(CFSPeriodUs)
		v.CPUMaxBurst = burstUs(r.CPUBurstMilli, q)
	}
	if r.MemMinBytes > 0 {
		v.MemoryMin = uint64(r.MemMinBytes)
	}
	if r.MemMaxBytes > 0 {
		v.MemoryMax = strconv.FormatInt(r.MemMaxBytes, 10)
	}
	if r.PidsMax > 0 {
		v.PidsMax = strconv.FormatInt(r.PidsMax, 10)
	}
	return v
}

// quotaUs converts a millicore ceiling into CFS quota per period; 0 if unset.
func quotaUs(milli int64) int64 {
	if milli <= 0 {
		return 0
	}
	return max(milli*CFSPeriodUs/1000, minQuotaUs)
}

// burstUs converts banked millicores into burst time per period. The kernel
// rejects a burst larger than the quota, so it is clamped to it.
func burstUs(milli, quota int64) uint64 {
	if milli <= 0 {
		return 0
	}
	return uint64(min(milli*CFSPeriodUs/1000, quota))
}

func clamp(v, lo, hi int64) int64 { return min(max(v, lo), hi) }
