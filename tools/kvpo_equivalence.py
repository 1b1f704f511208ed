"""One KVPO iteration under several parallel layouts vs a single-rank reference.

The code is ``kvpo_megatron/benchmarks/equivalence.py`` (tests import it from there); ``--help`` prints its documentation.
"""
from kvpo_megatron.benchmarks.equivalence import main

if __name__ == "__main__":
    raise SystemExit(main())
