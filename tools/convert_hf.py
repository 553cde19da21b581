"""`vlm-convert-hf` as a script, `python tools/convert_hf.py` (the program: vlm_train.cli.convert_hf)."""

from vlm_train.cli.convert_hf import main

if __name__ == "__main__":
    main()
