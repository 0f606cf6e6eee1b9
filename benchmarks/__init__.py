"""Benchmarks run by ``dynamo-ext bench``; each prints JSON and compares against a baseline."""
