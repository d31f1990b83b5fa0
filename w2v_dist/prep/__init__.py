"""Offline corpus preparation: finding utterances, synthesis, download, writing and verifying shards."""
