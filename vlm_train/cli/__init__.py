"""The command-line programs installed with the package (vlm-generate, vlm-evaluate, ...); tools/ runs them as
scripts too. Each module's `main(argv)` parses its arguments, prints JSON (or the answer) and returns it."""
