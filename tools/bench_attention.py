"""Attention micro benchmark: plain SDPA vs the split attention.

The code is ``kvpo_megatron/benchmarks/attention.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.attention import main

if __name__ == "__main__":
    main()
