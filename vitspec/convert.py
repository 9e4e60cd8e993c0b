"""`python -m vitspec.convert`: convert a checkpoint between layouts (`vitspec convert`), kept for the
commands people already use.

Run, it is the command; imported (`import vitspec.convert`), it stands aside for the function
`vitspec.convert`: the import system binds `vitspec.convert` to what `sys.modules` holds under this
name once the module has run, so the function is put there and the name keeps meaning the function.
"""

import sys

if __name__ == "__main__":
    from vitspec.app.cli import run

    sys.exit(run("convert", sys.argv[1:], "python -m vitspec.convert"))
else:
    from vitspec.app.convert import convert

    sys.modules[__name__] = convert
