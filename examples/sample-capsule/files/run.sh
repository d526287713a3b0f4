#!/bin/sh
# Sample capsule entrypoint: prints what it was given and exits 0.
echo "capsule auth-token-issuance running against $TARGET"
/capsule/tools/probe.sh
