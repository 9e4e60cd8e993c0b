"""`python -m vitspec.datasets`: download a dataset (`vitspec download`),
kept for the commands people already use.

An entry point only: importing it gives nothing (`python -m vitspec.datasets download NAME` is
`vitspec download NAME`).
"""

if __name__ == "__main__":
    import sys

    from vitspec.app.cli import main

    sys.exit(main())
