#!/bin/sh
echo "hello from a capsule admitted through the service"
