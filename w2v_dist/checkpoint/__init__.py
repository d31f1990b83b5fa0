"""Everything a run saves: the commit protocol, retention, resume, and the files DeepSpeed writes."""
