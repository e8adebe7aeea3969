#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs visible to this executor as Spark's resource JSON,
# e.g. {"name": "gpu", "addresses": ["0", "1"]}. Same as Spark's examples/src/main/scripts one.
ADDRS=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e ':a' -e 'N' -e '$!ba' -e 's/\n/","/g')
echo "{\"name\": \"gpu\", \"addresses\": [\"$ADDRS\"]}"
