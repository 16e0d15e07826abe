"""Test-suite settings: Hypothesis profiles (HYPOTHESIS_PROFILE=dev|ci|thorough; CI sets ci)."""

import os

from hypothesis import settings

from harness.cases import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
