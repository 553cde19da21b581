"""`vlm-merge-checkpoints` as a script, `python tools/merge_checkpoints.py` (vlm_train.cli.merge_checkpoints)."""

from vlm_train.cli.merge_checkpoints import main

if __name__ == "__main__":
    main()
