"""Evaluation: FID and its feature extractors, CLIP score, CIDEr-D, VQA accuracy, the Shapes
suite and tokenizer metrics, and the `cm3jax eval` driver (docs/eval.md)."""
