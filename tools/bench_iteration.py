"""KVPO iterations on one or N processes (phases, throughput, scaling, memory).

The code is ``kvpo_megatron/benchmarks/iteration.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.iteration import main

if __name__ == "__main__":
    main()
