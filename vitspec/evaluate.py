"""`python -m vitspec.evaluate`: evaluate a checkpoint (`vitspec evaluate`),
kept for the commands people already use.

An entry point only: importing it gives nothing (the code is `vitspec.app.evaluate`).
"""

if __name__ == "__main__":
    import sys

    from vitspec.app.cli import run

    sys.exit(run("evaluate", sys.argv[1:], "python -m vitspec.evaluate"))
