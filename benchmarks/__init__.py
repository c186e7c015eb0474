"""Measurements (not tests): scripts run as ``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>``;
installed with the library (``pip install -e .``) so that they import each other as ``benchmarks.<name>``."""
