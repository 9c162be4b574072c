"""Procedural data worlds that exist offline and can be judged exactly (see `shapes`)."""
