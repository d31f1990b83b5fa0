"""w2v-dist: distributed wav2vec 2.0 CTC fine-tuning on LibriSpeech (WebDataset shards + DeepSpeed)."""

__version__ = "0.1.0"
