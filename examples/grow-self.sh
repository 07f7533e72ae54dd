#!/bin/sh
# A workload that asks for memory before a big allocation ("Oh, more RAM").
# The sandbox sees the host's system folders and its own /work, not this
# file, so pass it as a script:
#
#   shim spawn --grow --mem 64M:1G -- /bin/sh -c "$(cat examples/grow-self.sh)"
#
# Every workload finds its way back to the cluster in its environment:
# $SHIM_ADDR (its node's API, host:port), $SHIM_CA (the cluster's CA, a file
# in its work folder) and $SHIM_TOKEN (its self token, good for its own
# process only). With them it asks for a 640 MiB grant over the Connect JSON
# API (SetGrant; `shim grant $SHIM_PROCESS_ID --mem 640M` does the same where
# the CLI is installed), waits a moment for its node to raise the limit,
# then allocates 600 MiB. The node grants what it holds at once and moves
# other processes away for the rest.
set -e
curl -sSf --cacert "$SHIM_CA" -H "Authorization: Bearer $SHIM_TOKEN" -H 'Content-Type: application/json' \
  -d "{\"id\":\"$SHIM_PROCESS_ID\",\"grant\":{\"memBytes\":\"$((640 << 20))\"},\"reason\":\"about to load the index\"}" \
  "https://$SHIM_ADDR/shim.v1.ShimService/SetGrant" >/dev/null
sleep 1
exec python3 -c 'import time; index = b"x" * (600 << 20); print("loaded", flush=True); time.sleep(86400)'
