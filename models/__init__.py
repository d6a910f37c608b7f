"""Recipes that build the small X-LoRA checkpoints used by the README, the tests and the benchmarks."""
