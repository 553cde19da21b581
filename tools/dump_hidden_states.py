"""The hidden-state dump for offline Eagle3 training as a script (the program: vlm_train.cli.dump_hidden_states)."""

from vlm_train.cli.dump_hidden_states import main

if __name__ == "__main__":
    main()
