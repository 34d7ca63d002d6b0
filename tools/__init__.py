"""Benchmarks against diffusers (+ peft) as the baseline: python -m tools.bench."""
