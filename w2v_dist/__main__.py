from w2v_dist.cli import run

if __name__ == "__main__":  # spawned workers re-import this module as __mp_main__
    run()
