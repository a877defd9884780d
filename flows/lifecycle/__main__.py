"""`python -m flows.lifecycle --config FILE` (the KubeRay RayJob's entrypoint) is `herd run`."""

import sys

from flows.lifecycle.cli import main

sys.exit(main(sys.argv[1:]))
