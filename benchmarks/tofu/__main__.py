"""``python -m benchmarks.tofu --preset mini|real|FILE [--out DIR] [--data DIR] [--set key=value ...]``."""
import sys

from benchmarks.tofu.pipeline import main

sys.exit(main())
