"""`python -m vitspec COMMAND ...`: the `vitspec` command (vitspec.app.cli)."""

if __name__ == "__main__":
    import sys

    from vitspec.app.cli import main

    sys.exit(main())
