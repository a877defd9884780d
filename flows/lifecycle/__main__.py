"""`python -m flows.lifecycle --config FILE` (the KubeRay RayJob's entrypoint) is `herd run`."""

import sys

from flows.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
