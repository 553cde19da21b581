"""Speculative decoding with a run's Eagle3 draft, measured, as a script: `python tools/speculate.py RUN --json`
(the program: vlm_train.cli.speculate)."""

from vlm_train.cli.speculate import main

if __name__ == "__main__":
    main()
