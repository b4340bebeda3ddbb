"""How many inference actors ``--ray`` starts, with which resources, on which nodes: decided from
the cluster's resources, without a cluster (a stand-in for the few ``ray`` calls it makes)."""

from __future__ import annotations

import pytest

from spleen_seg.batch.ray import ACTOR_CPUS, RaySettings, _actor_plan
from spleen_seg.errors import ConfigError


class FakeRay:
    def __init__(self, gpus: float = 0.0, node_cpus: tuple[float, ...] = (4.0,), dead: int = 0) -> None:
        self.gpus = gpus
        self.node_list = [{"NodeID": f"node{i}", "Alive": True, "Resources": {"CPU": cpus}}
                          for i, cpus in enumerate(node_cpus)]
        self.node_list += [{"NodeID": f"dead{i}", "Alive": False, "Resources": {"CPU": 8.0}} for i in range(dead)]

    def cluster_resources(self) -> dict[str, float]:
        resources = {"CPU": sum(n["Resources"]["CPU"] for n in self.node_list if n["Alive"])}
        if self.gpus:
            resources["GPU"] = self.gpus
        return resources

    def nodes(self) -> list[dict]:
        return self.node_list


@pytest.mark.parametrize("gpus, share, device, count", [
    (2.0, 1.0, "auto", 2), (2.0, 0.5, "auto", 4), (3.0, 0.25, "cuda", 12), (1.0, 1.0, "cuda", 1),
])
def test_gpu_clusters_get_one_actor_per_gpu_share(gpus, share, device, count):
    plan = _actor_plan(FakeRay(gpus=gpus), device, RaySettings(gpus_per_actor=share))
    assert plan == (count, {"num_gpus": share, "num_cpus": 0}, [])


def test_cpu_clusters_get_one_actor_per_live_node_with_a_cpu():
    fake = FakeRay(node_cpus=(16.0, 2.0, 0.0), dead=1)
    assert _actor_plan(fake, "auto", RaySettings()) == (2, {"num_cpus": ACTOR_CPUS}, ["node0", "node1"])
    # --device cpu keeps a GPU cluster's actors on CPUs
    gpu_nodes = FakeRay(gpus=4.0, node_cpus=(8.0,))
    assert _actor_plan(gpu_nodes, "cpu", RaySettings()) == (1, {"num_cpus": ACTOR_CPUS}, ["node0"])
    assert _actor_plan(fake, "cpu", RaySettings(actors=3))[2] == ["node0", "node1", "node0"]


@pytest.mark.parametrize("fake, device, message", [
    (FakeRay(gpus=2.0), "cuda:1", "Ray assigns each actor its GPU"),
    (FakeRay(), "cuda", "the cluster has no GPU"),
    (FakeRay(node_cpus=(0.0,)), "cpu", "no node with a CPU"),
])
def test_plans_that_cannot_run_are_refused_naming_the_fix(fake, device, message):
    with pytest.raises(ConfigError, match=message):
        _actor_plan(fake, device, RaySettings())
