"""Hypothesis profiles.

``ci``   derandomized (the same examples on every run and machine, no example
         database), no deadline (CI machines are shared and slow), 30 examples,
         and the reproduction blob printed on failure.
``dev``  randomized, 50 examples, with the example database, so a failure
         found once is replayed until fixed.

``HYPOTHESIS_PROFILE=<name>`` selects a profile explicitly; otherwise ``ci``
when the ``CI`` environment variable is set (as ``.ci/run`` does), else ``dev``.
Shrunk failures worth keeping are pinned in the tests as ``@example(...)``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=30,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    # No deadline here either: the machine's cores are shared, so wall-clock
    # limits would flag load, not slow code.
    deadline=None,
    max_examples=50,
    print_blob=True,
)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
