"""Replay benchmark of the library's path (ms per tuple, MFU, memory).

The code is ``kvpo_megatron/benchmarks/replay.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.replay import main

if __name__ == "__main__":
    main()
