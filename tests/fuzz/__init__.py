"""Fuzzing what reads untrusted mail; ``python -m tests.fuzz.fuzz_ingest --help`` runs the ingest fuzzer."""
