"""`vlm-inspect-shards` as a script, `python tools/inspect_shards.py` (the program: vlm_train.cli.inspect_shards)."""

from vlm_train.cli.inspect_shards import main

if __name__ == "__main__":
    main()
