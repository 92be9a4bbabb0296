"""Test and demo machinery: a Kite Connect simulator that speaks the real protocol.

Imported by the demo and ``kitesim`` commands, the benchmarks and the tests; never by the
production code paths. It drives its prices from :mod:`streaming.market`, which imports
nothing of it.
"""
