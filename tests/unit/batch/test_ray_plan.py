"""How many inference actors ``--ray`` starts, with which resources, on which nodes, and whether
case tasks fit beside them: decided from the cluster's resources, without a cluster (a stand-in
for the few ``ray`` calls it makes). And the line a run that makes no progress prints."""

from __future__ import annotations

import logging

import pytest

from spleen_seg.batch.ray_cluster import ACTOR_CPUS, ActorPlan, RaySettings, StallWatch, actor_plan, in_flight_text
from spleen_seg.errors import ConfigError


class FakeRay:
    def __init__(self, gpus: float = 0.0, node_cpus: tuple[float, ...] = (4.0,), dead: int = 0,
                 free: dict[str, float] | None = None) -> None:
        self.gpus = gpus
        self.free = free or {}
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

    def available_resources(self) -> dict[str, float]:
        return self.free


@pytest.mark.parametrize("gpus, share, device, count", [
    (2.0, 1.0, "auto", 2), (2.0, 0.5, "auto", 4), (3.0, 0.25, "cuda", 12), (1.0, 1.0, "cuda", 1),
])
def test_gpu_clusters_get_one_actor_per_gpu_share(gpus, share, device, count):
    plan = actor_plan(FakeRay(gpus=gpus), device, RaySettings(gpus_per_actor=share))
    assert plan == ActorPlan(count, {"num_gpus": share, "num_cpus": 0}, [], whole_cases=False)


def test_cpu_clusters_get_one_actor_per_live_node_with_a_cpu():
    fake = FakeRay(node_cpus=(16.0, 2.0, 0.0), dead=1)
    assert actor_plan(fake, "auto", RaySettings()) == ActorPlan(2, {"num_cpus": ACTOR_CPUS}, ["node0", "node1"])
    # --device cpu keeps a GPU cluster's actors on CPUs
    gpu_nodes = FakeRay(gpus=4.0, node_cpus=(8.0,))
    assert actor_plan(gpu_nodes, "cpu", RaySettings()) == ActorPlan(1, {"num_cpus": ACTOR_CPUS}, ["node0"])
    assert actor_plan(fake, "cpu", RaySettings(actors=3)).nodes == ["node0", "node1", "node0"]


@pytest.mark.parametrize("fake, device, whole_cases", [
    (FakeRay(node_cpus=(1.0, 1.0)), "auto", True),  # issue 15: each node's only CPU goes to its actor
    (FakeRay(node_cpus=(1.0,)), "cpu", True),  # a local instance on a one-core machine
    (FakeRay(node_cpus=(2.0, 1.0)), "auto", False),  # one CPU to spare is enough for the task pipeline
    (FakeRay(node_cpus=(16.0, 16.0)), "auto", False),
    (FakeRay(gpus=2.0, node_cpus=(0.0, 0.0)), "auto", True),  # GPU nodes started with --num-cpus 0
    (FakeRay(gpus=2.0, node_cpus=(0.0, 4.0)), "cuda", False),  # a CPU head node runs the case tasks
])
def test_actors_do_whole_cases_when_no_cpu_is_left_for_a_case_task(fake, device, whole_cases):
    assert actor_plan(fake, device, RaySettings()).whole_cases is whole_cases


@pytest.mark.parametrize("fake, device, message", [
    (FakeRay(gpus=2.0), "cuda:1", "Ray assigns each actor its GPU"),
    (FakeRay(), "cuda", "the cluster has no GPU"),
    (FakeRay(node_cpus=(0.0,)), "cpu", r"no node with a CPU to run an inference actor \(each needs CPU 1; the "
                                      r"cluster has CPU 0\): start its nodes with 'ray start --num-cpus N', N >= 1"),
    (FakeRay(node_cpus=(0.0, 0.0)), "auto", "no node with a CPU"),
])
def test_plans_that_cannot_run_are_refused_naming_the_fix(fake, device, message):
    with pytest.raises(ConfigError, match=message):
        actor_plan(fake, device, RaySettings())


@pytest.mark.parametrize("fake, settings, message", [
    (FakeRay(node_cpus=(1.0, 1.0)), RaySettings(actors=3), r"3 inference actors need CPU 3 \(1 each\); the cluster's "
                                                           r"nodes hold 2 \(CPU 2\)"),
    (FakeRay(gpus=1.0), RaySettings(actors=3, gpus_per_actor=0.5), r"3 inference actors of 0.5 GPU need 1.5 GPUs; "
                                                                   r"the cluster has CPU 4, GPU 1"),
])
def test_more_actors_than_the_cluster_holds_are_refused_instead_of_waiting_forever(fake, settings, message):
    with pytest.raises(ConfigError, match=message) as refused:
        actor_plan(fake, "auto", settings)
    assert len(str(refused.value).splitlines()) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stall_is_reported_after_the_configured_seconds_and_then_at_that_interval(caplog):
    fake = FakeRay(node_cpus=(1.0, 1.0), free={"CPU": 0.0, "node:127.0.0.1": 1.0})
    fake.node_list[0]["Resources"]["node:127.0.0.1"] = 1.0  # Ray's bookkeeping: not a demand, not shown
    clock = Clock()
    watch = StallWatch(fake, 30.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="spleen_seg.batch.ray_cluster")

    def after(seconds: float, advanced: bool = False) -> list[str]:
        caplog.clear()
        clock.now += seconds
        watch.idle(advanced, lambda: "2 of 2 inference actors to start (each needs CPU 1)")
        return caplog.messages

    assert after(29.0) == []
    assert after(1.0) == ["--ray: no progress for 30 s: waiting for 2 of 2 inference actors to start (each needs "
                          "CPU 1); cluster resources free/total: CPU 0/2; still waiting (Ctrl-C or SIGTERM stops the "
                          "run, the same command resumes it)"]
    assert after(29.0) == []
    assert "no progress for 60 s" in after(1.0)[0]
    assert after(10.0, advanced=True) == []  # a stage finished: the count starts again
    assert after(29.0) == [] and "no progress for 30 s" in after(1.0)[0]
    watch.progressed()  # a case finished
    assert after(29.0) == []


def test_a_stall_line_names_each_stage_of_the_cases_in_flight_and_what_it_needs():
    stages = {"prepare": [0, 1, 0], "network": [1], "finish": []}
    assert in_flight_text(stages, {"num_cpus": 1}) == (
        "4 cases in flight: 3 in prepare tasks (each needs CPU 1), 1 at inference actors 1 (each needs CPU 1)")
    assert in_flight_text({"whole": [1, 0, 1]}, {"num_gpus": 0.5, "num_cpus": 0}) == (
        "3 cases in flight: 3 at inference actors 0, 1 (each needs GPU 0.5)")
