"""Loaded at start-up by a service process whose PYTHONPATH a benchmark set to include this folder:
installs bench/forward_probe.py when $LATENTWIRE_BENCH_FORWARD_LOG names a file (see there)."""
import os
import sys

if os.environ.get("LATENTWIRE_BENCH_FORWARD_LOG"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import forward_probe

    forward_probe.install_from_env()
