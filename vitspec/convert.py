"""`python -m vitspec.convert SRC DST ...`: the command line of `vitspec.conversion` (see there).

The implementation lives in `vitspec.conversion` so that the package can export the function
`vitspec.convert` without this module's name shadowing it, and without runpy's warning about a
module imported before it runs as `__main__`.
"""

import sys

from vitspec.conversion import main

if __name__ == "__main__":
    sys.exit(main())
