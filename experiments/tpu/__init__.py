"""Cloud TPU pod scripts: `python -m experiments.tpu.pod --help` (walk-through in docs/tpu.md)."""
