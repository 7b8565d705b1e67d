"""Trivial job bodies for the raw rq side of the benchmarks."""


def noop(value):
    return value
