"""The language model as a trainer: its config reading (`config`) and its `Task` (`task`)."""
