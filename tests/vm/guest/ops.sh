#!/bin/bash
# Test only: the operations boot's entry point (lczfs-test-ops.service).
. /usr/lib/lczfs-test/ops-lib.sh
. /usr/lib/lczfs-test/scenario.sh
