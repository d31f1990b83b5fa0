"""Corpus discovery and synthesis, shard writing, planning, streaming, collation and text handling."""
