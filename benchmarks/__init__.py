"""Benchmarks and soak tests for skr (``make bench``, ``make soak``); never run by ``make test``."""
