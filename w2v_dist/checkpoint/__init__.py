"""Everything a run saves: what it is (``saved``), which tag to load (``tags``), the commit protocol and
retention (``commit``), resume, elastic included (``resume``), and DeepSpeed's files read safely (``files``).
Nothing here imports the export: it reads what this package commits."""
