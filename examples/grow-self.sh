#!/bin/sh
# A workload that asks for memory before a big allocation ("Oh, more RAM"):
# run it with `shim spawn --grow --mem 64M:1G -- /bin/sh grow-self.sh`. With
# its self token it asks its node for a 640 MiB grant over the Connect JSON
# API, waits a moment for the new limit, then allocates 600 MiB. The node
# grants what it holds at once and moves other processes away for the rest.
curl -sf --cacert "$SHIM_CA" -H "Authorization: Bearer $SHIM_TOKEN" -H 'Content-Type: application/json' -d "{\"id\":\"$SHIM_PROCESS_ID\",\"grant\":{\"memBytes\":\"$((640 << 20))\"},\"reason\":\"about to load the index\"}" "https://$SHIM_ADDR/shim.v1.ShimService/SetGrant" && sleep 1
exec python3 -c 'import time; index = b"x" * (600 << 20); print("loaded", flush=True); time.sleep(86400)'
