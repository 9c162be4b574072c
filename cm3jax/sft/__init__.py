"""Instruction tuning (docs/sft.md): Shapes task generators (`tasks`), instruction files
(`jsonl`), the SFT data directory (`prepare`), task mixtures (`mixture`), packed batches
(`data`) and the SFT `Task` on the shared harness (`task`)."""
