"""Fixtures for gateway tests: real `cortex serve` processes in front of fake (or real) neurons."""

from tests.support.fleet_fixtures import http, stack, start_fake, start_gateway  # noqa: F401  (fixtures)
