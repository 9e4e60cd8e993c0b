"""Hypothesis profiles: `ci` (the default) is derandomized and bounded so the suite's time is known.

`ci` reports a failure as drawn, without shrinking it (shrinking a failing parity case can take
minutes of recompiling), with the blob that reproduces it (`@reproduce_failure`). `explore`
draws anew each run, more examples, and shrinks. No test may depend on which examples a
Hypothesis release happens to draw: every bound holds for any config the strategies can make.
"""

import os

from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("VITSPEC_MAX_EXAMPLES", "25")),
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
