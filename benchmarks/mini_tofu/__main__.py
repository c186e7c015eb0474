"""``python -m benchmarks.mini_tofu ...`` (or ``python benchmarks/mini_tofu ...``)."""
import sys

from benchmarks.mini_tofu.pipeline import main

sys.exit(main())
