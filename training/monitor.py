"""`python -m training.monitor install|dashboard`, the operator's command on the head node (cluster.yaml runs it);
the code is training/ops/monitor.py."""

import sys

from training.ops.monitor import main

if __name__ == "__main__":
    sys.exit(main())
