"""A small fleet for CLI tests: fake neurons (tests/support/fake_neuron.py) behind a real `cortex serve`."""

from tests.support.fleet_fixtures import stack, start_fake, start_gateway  # noqa: F401  (fixtures)
