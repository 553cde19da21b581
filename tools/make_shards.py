"""`vlm-make-shards` as a script, `python tools/make_shards.py` (the program: vlm_train.cli.make_shards)."""

from vlm_train.cli.make_shards import main

if __name__ == "__main__":
    main()
