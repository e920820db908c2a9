"""Suite-wide settings: deterministic hypothesis runs without deadlines (CI has 2 cores)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "moegen", deadline=None, derandomize=True, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "moegen"))
