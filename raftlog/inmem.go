package raftlog

import (
	"fmt"
	"sync"

	"github.com/hashicorp/raft"
)

// In InMemory mode every node of the process joins one in-memory network: its
// transport is connected to all other registered transports, by address.
var inmemNet = struct {
	sync.Mutex
	nodes map[raft.ServerAddress]*raft.InmemTransport
}{nodes: map[raft.ServerAddress]*raft.InmemTransport{}}

type inmemEntry struct {
	addr  raft.ServerAddress
	trans *raft.InmemTransport
	once  sync.Once
}

func registerInmem(addr string) (*inmemEntry, error) {
	a, t := raft.NewInmemTransport(raft.ServerAddress(addr))
	inmemNet.Lock()
	defer inmemNet.Unlock()
	if _, dup := inmemNet.nodes[a]; dup {
		return nil, fmt.Errorf("in-memory address %q already in use", a)
	}
	for pa, pt := range inmemNet.nodes {
		pt.Connect(a, t)
		t.Connect(pa, pt)
	}
	inmemNet.nodes[a] = t
	return &inmemEntry{addr: a, trans: t}, nil
}

func (e *inmemEntry) unregister() {
	e.once.Do(func() {
		inmemNet.Lock()
		defer inmemNet.Unlock()
		delete(inmemNet.nodes, e.addr)
		for _, pt := range inmemNet.nodes {
			pt.Disconnect(e.addr)
		}
		e.trans.DisconnectAll()
	})
}
