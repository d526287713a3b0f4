#!/bin/sh
# Sample tool: reports the sandbox's view of itself.
echo "uid=$(id -u) pwd=$(pwd)"
