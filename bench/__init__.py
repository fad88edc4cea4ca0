"""The benchmarks: scripts run from the checkout (python bench/NAME.py), on the harness in bench/common.py."""
