"""`vlm-evaluate` as a script, `python tools/evaluate.py` (the program: vlm_train.cli.evaluate)."""

from vlm_train.cli.evaluate import main

if __name__ == "__main__":
    main()
