"""Sweep entry points and assembly: config, search space, Tuner and the whole pipeline."""
