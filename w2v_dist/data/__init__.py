"""Online loading: shard indexes, batch plans, streaming, the typed batch; and the audio and text handling
that preparation shares."""
