"""Export a run's Eagle3 draft for SGLang / vLLM, `python tools/export_eagle3.py RUN OUT_DIR` (the program:
vlm_train.cli.export_eagle3)."""

from vlm_train.cli.export_eagle3 import main

if __name__ == "__main__":
    main()
