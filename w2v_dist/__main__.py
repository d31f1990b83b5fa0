import sys

from w2v_dist.cli import main

sys.exit(main())
