"""The benchmarks and checks that ``tools/`` runs: they drive the library's own path (``build_model``, ``accelerate``,
the streaming engine, ``KVPOTrainer``) and print JSON. They live in the package so that the tools and the tests that
check them import one module (no ``sys.path`` edits); nothing in the library imports them."""
