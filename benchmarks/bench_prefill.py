"""Thin wrapper: ``python benchmarks/bench_prefill.py [args]`` == ``nsa bench prefill [args]``."""
import sys

from nsa.apps.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
