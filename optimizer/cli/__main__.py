"""``python -m optimizer.cli``: the console script's entry point, for environments without it."""

from optimizer.cli import main

if __name__ == "__main__":
    main()
