"""Predicted per-GPU memory of one KVPO iteration, as JSON lines.

The code is ``kvpo_megatron/benchmarks/memory.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.memory import main

if __name__ == "__main__":
    main()
