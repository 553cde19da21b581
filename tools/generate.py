"""`vlm-generate` as a script, `python tools/generate.py` (the program: vlm_train.cli.generate)."""

from vlm_train.cli.generate import main

if __name__ == "__main__":
    main()
