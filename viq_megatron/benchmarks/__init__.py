"""What the benchmark command lines (viq_megatron/cli/bench_*.py, plan_layout.py) compute, apart
from their argument parsing and printing: importable, and tested without running a bench."""
