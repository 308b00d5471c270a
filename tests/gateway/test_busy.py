"""How busy a replica looks to the router: ours exactly, other gateways' as of the last poll."""

from __future__ import annotations

from cortex.core.gateway_config import NeuronEntry
from cortex.core.neuron_api import Health, ModelHealth
from cortex.gateway.router import Lease
from cortex.gateway.state import FleetState, Replica


def one_replica() -> tuple[FleetState, Replica]:
    state = FleetState([NeuronEntry(name="a", endpoint="http://a:1")])
    node = state.nodes["a"]
    node.healthy = True
    replica = node.replicas["m"] = Replica("m", "a", "loaded")
    return state, replica


def poll(state: FleetState, in_flight: int, queue_depth: int = 0) -> None:
    health = Health(models=[ModelHealth(id="m", status="loaded", in_flight=in_flight, queue_depth=queue_depth)])
    state.apply_health(state.nodes["a"], health)


def test_a_poll_counts_only_the_excess_over_ours_as_others() -> None:
    state, replica = one_replica()
    lease = Lease(state.nodes["a"], replica)
    poll(state, in_flight=3, queue_depth=1)
    assert replica.others_in_flight == 3
    assert replica.busy() == 4
    lease.release()
    assert replica.busy() == 3


def test_a_poll_taken_while_ours_ran_does_not_blame_it_on_others() -> None:
    """The neuron's snapshot saw our request; the answer to the poll arrives after it finished."""
    state, replica = one_replica()
    Lease(state.nodes["a"], replica).release()
    poll(state, in_flight=1)
    assert replica.others_in_flight == 0
    assert replica.busy() == 0
    poll(state, in_flight=1)  # the next poll: nothing of ours since, so this one is someone else's
    assert replica.others_in_flight == 1
