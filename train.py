"""Training entry point: ``deepspeed train.py --config C``, ``torchrun ... train.py``, or
``python train.py``."""

import argparse

from w2v_dist.cli import add_train_arguments, exit_with, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_train_arguments(parser)
    exit_with(run_train(parser.parse_args()))
