"""Placement and eviction policy as pure functions: ranking, feasibility, victims, residency."""

from __future__ import annotations

import pytest

from cortex.core.catalogue import Catalogue, CatalogueModel
from cortex.core.gateway_config import NeuronEntry
from cortex.gateway.evictor import EvictionPolicy
from cortex.gateway.placement import TIER_EVICT, TIER_FREE, TIER_PINNED, NoPlacement, Placer
from cortex.gateway.state import Device, FleetState, Replica

NOW = 10_000.0
LRU = EvictionPolicy("lru", min_residency_s=60)
PRIORITY = EvictionPolicy("priority", min_residency_s=60)


def fleet(**nodes: list[int]) -> FleetState:
    """Healthy nodes with devices of the given sizes (MB), all free."""
    state = FleetState([NeuronEntry(name=n, endpoint=f"http://{n}:1") for n in nodes])
    for name, sizes in nodes.items():
        node = state.nodes[name]
        node.healthy = node.discovered = True
        node.devices = {i: Device(i, vram_total_mb=mb, vram_free_mb=mb) for i, mb in enumerate(sizes)}
    return state


def put(
    state: FleetState,
    node: str,
    model: str,
    mb: int,
    *,
    device: int = 0,
    last_used: float = 1.0,
    resident_for: float = 3600.0,
    **fields: object,
) -> Replica:
    replica = Replica(model, node, "loaded", [device], mb, last_used=last_used, resident_since=NOW - resident_for)
    for key, value in fields.items():
        setattr(replica, key, value)
    state.nodes[node].replicas[model] = replica
    dev = state.nodes[node].devices[device]
    dev.vram_used_mb += mb
    dev.vram_free_mb -= mb
    return replica


def catalogue(*models: CatalogueModel) -> Catalogue:
    return Catalogue(models=list(models))


def spec(model_id: str, vram_mb: int | None = 4000, **fields: object) -> CatalogueModel:
    return CatalogueModel(id=model_id, vram_mb=vram_mb, **fields)


def plan(state: FleetState, want: CatalogueModel, policy: EvictionPolicy = LRU, *others: CatalogueModel):
    return Placer(state, catalogue(want, *others), policy).plan(want, NOW)


def test_free_fit_beats_evict_fit_and_most_free_breaks_ties() -> None:
    state = fleet(a=[10000], b=[10000], c=[16000])
    put(state, "a", "old", 8000)
    chosen = plan(state, spec("new"))
    assert (chosen.node.name, chosen.tier, chosen.victims) == ("c", TIER_FREE, [])


def test_pinned_node_first_even_when_another_has_more_room() -> None:
    state = fleet(a=[10000], b=[40000])
    chosen = plan(state, spec("new", pinned_on=["a"]))
    assert (chosen.node.name, chosen.tier) == ("a", TIER_PINNED)


def test_runtime_pin_counts_like_a_catalogue_pin() -> None:
    state = fleet(a=[10000], b=[40000])
    state.runtime_pins.add(("new", "a"))
    assert plan(state, spec("new")).node.name == "a"


def test_evicts_only_when_nothing_fits_free() -> None:
    state = fleet(a=[10000])
    put(state, "a", "old", 8000)
    chosen = plan(state, spec("new"))
    assert chosen.tier == TIER_EVICT
    assert [v.model_id for v in chosen.victims] == ["old"]


def test_lru_evicts_least_recently_used_first_and_no_more_than_needed() -> None:
    state = fleet(a=[12000])
    put(state, "a", "recent", 4000, last_used=900.0)
    put(state, "a", "stale", 4000, last_used=100.0)
    put(state, "a", "middle", 4000, last_used=500.0)
    assert [v.model_id for v in plan(state, spec("new")).victims] == ["stale"]
    assert [v.model_id for v in plan(state, spec("big", 8000)).victims] == ["stale", "middle"]


def test_priority_evicts_lowest_priority_first_then_lru() -> None:
    state = fleet(a=[12000])
    put(state, "a", "important", 4000, last_used=100.0)  # least recently used, but high priority
    put(state, "a", "minor", 4000, last_used=900.0)
    put(state, "a", "minor-old", 4000, last_used=500.0)
    models = (spec("important", residency_priority=9), spec("minor"), spec("minor-old"))
    want = spec("new", residency_priority=5)
    assert [v.model_id for v in plan(state, want, PRIORITY, *models).victims] == ["minor-old"]
    assert [v.model_id for v in plan(state, want, LRU, *models).victims] == ["important"]


def test_priority_never_displaces_a_higher_priority_model() -> None:
    state = fleet(a=[8000])
    put(state, "a", "important", 8000)
    with pytest.raises(NoPlacement, match="higher residency priority"):
        plan(state, spec("new", residency_priority=1), PRIORITY, spec("important", residency_priority=9))


def test_pinned_and_busy_models_are_never_evicted() -> None:
    state = fleet(a=[12000])
    put(state, "a", "pinned", 4000, last_used=1.0)
    put(state, "a", "ours-in-flight", 4000, last_used=2.0, in_flight=1)
    put(state, "a", "theirs-queued", 4000, last_used=3.0, others_in_flight=2)
    with pytest.raises(NoPlacement) as err:
        plan(state, spec("new"), LRU, spec("pinned", pinned_on=["a"]))
    assert not err.value.infeasible
    assert "pinned is pinned" in str(err.value)
    assert "ours-in-flight has requests in flight" in str(err.value)
    assert "theirs-queued has requests in flight" in str(err.value)


def test_min_residency_blocks_eviction_and_says_when_to_retry() -> None:
    state = fleet(a=[8000])
    put(state, "a", "fresh", 8000, resident_for=15.0)
    with pytest.raises(NoPlacement, match="min residency") as err:
        plan(state, spec("new"))
    assert err.value.retry_after == pytest.approx(45.0)


def test_measured_vram_beats_the_catalogue_estimate() -> None:
    state = fleet(a=[10000])
    put(state, "a", "old", 5000)
    state.measured_vram_mb["new"] = 6000  # the catalogue says 1000: that was wrong
    chosen = plan(state, spec("new", vram_mb=1000))
    assert chosen.need_mb == 6000
    assert [v.model_id for v in chosen.victims] == ["old"]


def test_unknown_size_is_placed_on_the_node_with_most_free_memory() -> None:
    state = fleet(a=[10000], b=[20000])
    assert plan(state, spec("new", vram_mb=None)).node.name == "b"


def test_feasibility_min_device_vram_and_min_devices() -> None:
    state = fleet(small=[24000, 24000], big=[80000])
    assert plan(state, spec("wide", 30000, min_device_vram_mb=40000)).node.name == "big"
    two = plan(state, spec("split", 40000, min_devices=2))
    assert (two.node.name, two.devices, two.mb_per_device) == ("small", [0, 1], 20000)
    with pytest.raises(NoPlacement) as err:
        plan(state, spec("huge", 100000))
    assert err.value.infeasible


def test_reservations_of_running_loads_count_as_used() -> None:
    from cortex.gateway.state import Reservation

    state = fleet(a=[10000], b=[8000])
    state.nodes["a"].reservations["other"] = Reservation([0], 6000)
    assert plan(state, spec("new")).node.name == "b"
    state.nodes["b"].reservations["new"] = Reservation([0], 4000)  # "new" itself is being loaded on b
    assert plan(state, spec("new")).node.name == "a"


def test_unhealthy_nodes_and_nodes_already_holding_the_model_are_skipped() -> None:
    state = fleet(a=[40000], b=[10000], c=[40000])
    state.nodes["a"].healthy = False
    put(state, "c", "new", 4000)
    state.nodes["c"].replicas["new"].status = "loading"
    assert plan(state, spec("new")).node.name == "b"


def test_a_node_where_the_last_load_failed_goes_last() -> None:
    state = fleet(a=[40000], b=[10000])
    state.nodes["a"].replicas["new"] = Replica("new", "a", "failed", [], 0)
    assert plan(state, spec("new")).node.name == "b"
