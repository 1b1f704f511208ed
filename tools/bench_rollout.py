"""Streaming rollout benchmark of the library's engine (seconds per block, FPS, MFU, memory).

The code is ``kvpo_megatron/benchmarks/rollout.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.rollout import main

if __name__ == "__main__":
    main()
