"""The placement planner, as pure functions of a described host (no GPU needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.engines.placement import (
    CpuHost,
    EngineSpec,
    Gpu,
    GpuHost,
    Placement,
    PlacementRefused,
    plan,
    plan_deploy,
)
from models.engines.placement.types import GIB, core_list, parse_list
from models.types import ReplicaKey, VersionKey

CHAT = VersionKey("smollm2", "v1")
CHAT2 = VersionKey("smollm2", "v2")
EMBED = VersionKey("minilm", "l6")


def gpus(n: int, total_gib: float = 80, free_gib: float = 79, island: int = 0) -> GpuHost:
    return GpuHost(
        tuple(
            Gpu(i, int(total_gib * GIB), int(free_gib * GIB), numa=i // 4, island=island + i // 4)
            for i in range(n)
        )
    )


def held(placements: tuple[Placement, ...] | list[Placement], gpu: int) -> float:
    return sum(p.memory_fraction or 0 for p in placements if gpu in p.gpus)


def test_one_gpu_holds_a_chat_and_an_embedding_model_with_fractions_that_fit() -> None:
    host = gpus(1)
    chat = EngineSpec(CHAT, memory_bytes=10 * GIB)
    embed = EngineSpec(EMBED, memory_bytes=3 * GIB)
    chat_at, embed_at = plan(host, [chat, embed])
    assert chat_at.gpus == embed_at.gpus == (0,)
    assert chat_at.memory_fraction is not None
    assert embed_at.memory_fraction is not None
    # each gets at least its need, the bigger one more, and together at most 0.9
    assert chat_at.memory_fraction >= 10 / 80
    assert embed_at.memory_fraction >= 3 / 80
    assert chat_at.memory_fraction > embed_at.memory_fraction
    assert 0.88 <= chat_at.memory_fraction + embed_at.memory_fraction <= 0.9


def test_the_free_memory_read_at_start_bounds_the_fractions() -> None:
    host = gpus(1, total_gib=80, free_gib=40)  # something else holds half the GPU
    (only,) = plan(host, [EngineSpec(CHAT, memory_bytes=10 * GIB)])
    assert only.memory_fraction == 0.5


def test_eight_gpus_take_two_tensor_parallel_4_replicas_on_their_nvlink_islands() -> None:
    host = gpus(8)
    first, second = plan(host, [EngineSpec(CHAT, replicas=2, tensor_parallel=4,
                                           memory_bytes=30 * GIB)])  # fmt: skip
    assert first.gpus == (0, 1, 2, 3)
    assert second.gpus == (4, 5, 6, 7)
    assert first.memory_fraction == second.memory_fraction == 0.9
    # islands that interleave: a TP group stays inside one
    woven = GpuHost(tuple(Gpu(i, 80 * GIB, 80 * GIB, island=i % 2) for i in range(8)))
    a, b = plan(woven, [EngineSpec(CHAT, replicas=2, tensor_parallel=4, memory_bytes=GIB)])
    assert {a.gpus, b.gpus} == {(0, 2, 4, 6), (1, 3, 5, 7)}


def test_replicas_spread_over_gpus_and_a_new_version_gets_a_free_one() -> None:
    host = gpus(8)
    running = plan(host, [EngineSpec(CHAT, memory_bytes=10 * GIB),
                          EngineSpec(EMBED, memory_bytes=3 * GIB)])  # fmt: skip
    assert [p.gpus for p in running] == [(0,), (1,)]
    deploy = plan_deploy(host, EngineSpec(CHAT2, memory_bytes=10 * GIB), running, CHAT)
    assert deploy.kind == "beside"
    assert deploy.placements[0].gpus == (2,)


def test_explicit_gpus_win() -> None:
    host = gpus(8)
    (a, b) = plan(host, [EngineSpec(CHAT, replicas=2, memory_bytes=GIB, gpus=(6, 7))])
    assert (a.gpus, b.gpus) == ((6,), (7,))
    assert a.explicit
    with pytest.raises(PlacementRefused, match=r"gpus \[9\] are not on this host \(it has 0-7\)"):
        plan(host, [EngineSpec(CHAT, memory_bytes=GIB, gpus=(9,))])


def test_a_deploy_onto_a_full_gpu_is_a_rolling_swap_that_never_reaches_zero() -> None:
    host = gpus(1)
    running = plan(host, [EngineSpec(CHAT, replicas=2, memory_bytes=20 * GIB)])
    assert held(running, 0) <= 0.9
    deploy = plan_deploy(host, EngineSpec(CHAT2, replicas=2, memory_bytes=20 * GIB),
                         running, CHAT)  # fmt: skip
    assert deploy.kind == "rolling_swap"
    assert "does not fit" in deploy.note
    serving = {p.replica for p in running}
    on_gpu = list(running)
    for step in deploy.steps:
        serving -= set(step.stop)
        on_gpu = [p for p in on_gpu if p.replica not in step.stop]
        assert serving, f"step {step} leaves nothing serving"
        on_gpu += step.start
        serving |= {p.replica for p in step.start}
        assert held(on_gpu, 0) <= 0.9 + 1e-9  # what runs at each step fits on the GPU
    assert [s.stop for s in deploy.steps] == [(ReplicaKey("smollm2", "v1", 1),),
                                              (ReplicaKey("smollm2", "v1", 0),)]  # fmt: skip
    assert [p.replica.index for p in deploy.placements] == [0, 1]
    assert "stop smollm2@v1#1, start smollm2@v2#0 on GPU 0" in deploy.describe()


def test_a_deploy_that_fits_neither_beside_nor_by_a_swap_is_refused_with_the_numbers() -> None:
    host = gpus(1)
    running = plan(host, [EngineSpec(CHAT, memory_bytes=20 * GIB)])  # one replica, 0.9
    with pytest.raises(PlacementRefused) as refused:
        plan_deploy(host, EngineSpec(CHAT2, memory_bytes=20 * GIB), running, CHAT)
    message = str(refused.value)
    assert "smollm2@v2 does not fit: a replica needs 20.0 GiB on each of 1 GPU(s)" in message
    assert "GPU 0 0.0 GiB of 80.0 GiB" in message
    assert "rolling swap cannot make room" in message


def test_a_plan_that_cannot_fit_is_refused_with_what_it_needs_and_what_is_free() -> None:
    host = gpus(2, total_gib=24, free_gib=23)
    with pytest.raises(PlacementRefused) as refused:
        plan(host, [EngineSpec(CHAT, memory_bytes=30 * GIB)])
    assert str(refused.value) == (
        "smollm2@v1 does not fit: a replica needs 30.0 GiB on each of 1 GPU(s); free for"
        " engines: GPU 0 21.6 GiB of 24.0 GiB, GPU 1 21.6 GiB of 24.0 GiB"
    )
    with pytest.raises(PlacementRefused, match="tensor parallel size 4 needs 4 GPUs; this host"):
        plan(host, [EngineSpec(CHAT, tensor_parallel=4, memory_bytes=GIB)])
    with pytest.raises(PlacementRefused, match="no GPUs"):
        plan(GpuHost(()), [EngineSpec(CHAT, memory_bytes=GIB)])


def test_a_version_that_sets_its_own_fraction_keeps_it() -> None:
    host = gpus(1)
    own, other = plan(host, [EngineSpec(CHAT, fraction=0.5), EngineSpec(EMBED, memory_bytes=GIB)])
    assert own.memory_fraction == 0.5
    assert other.memory_fraction == 0.4


def test_two_cores_one_engine_each_or_one_engine_and_room_for_a_deploy() -> None:
    host = CpuHost((0, 1))
    chat, embed = plan(host, [EngineSpec(CHAT), EngineSpec(EMBED)])
    assert (chat.cpus, chat.omp_bind, embed.cpus, embed.omp_bind) == ((0,), "0", (1,), "1")
    (alone,) = plan(host, [EngineSpec(CHAT)])
    assert alone.cpus == (0,)  # the other core: the gateway's, and the next deploy's
    deploy = plan_deploy(host, EngineSpec(CHAT2), [alone], CHAT)
    assert deploy.kind == "beside"
    assert deploy.placements[0].cpus == (1,)
    assert deploy.placements[0].omp_bind == "1"
    # v1 stopped: its core is free again, and the next version goes there
    third = plan_deploy(host, EngineSpec(VersionKey("smollm2", "v3")), deploy.placements, CHAT2)
    assert third.placements[0].cpus == (0,)


def test_sixteen_cores_on_two_numa_nodes() -> None:
    host = CpuHost(tuple(range(16)), tuple((c, c // 8) for c in range(16)))
    chat, embed = plan(host, [EngineSpec(CHAT), EngineSpec(EMBED)])
    assert chat.cpus == (0, 1, 2, 3, 4)
    assert chat.omp_bind == "0-3"
    assert embed.cpus == (8, 9, 10, 11, 12)
    assert embed.omp_bind == "8-11"
    deploy = plan_deploy(host, EngineSpec(CHAT2), [chat, embed], CHAT)
    new = deploy.placements[0]
    # the free cores of one node (three of them) rather than a wider share on busy ones
    assert (new.cpus, new.omp_bind) == ((5, 6, 7), "5-6")
    replicas = plan(host, [EngineSpec(CHAT, replicas=2, tensor_parallel=2)])
    assert [p.omp_bind for p in replicas] == ["0|2-3", "8|10-11"]


def test_explicit_cpus_win_and_unknown_cores_are_refused() -> None:
    host = CpuHost((0, 1, 2, 3))
    pinned, planned = plan(host, [EngineSpec(CHAT, cpus=(3,)), EngineSpec(EMBED)])
    assert (pinned.cpus, pinned.omp_bind, pinned.explicit) == ((3,), "3", True)
    assert not set(planned.cpus) & {3}
    with pytest.raises(PlacementRefused, match=r"cpus 7 are not among this host's cores \(0-3\)"):
        plan(host, [EngineSpec(CHAT, cpus=(7,))])


def test_core_lists_read_and_write_linux_form() -> None:
    assert core_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    assert parse_list("0-3,6,8-9\n") == (0, 1, 2, 3, 6, 8, 9)


def test_the_engine_environment_follows_the_placement_and_the_version_env_wins() -> None:
    from models.config import EngineConfig
    from models.engines import vllm_engine

    key = ReplicaKey("smollm2", "v1", 0)
    on_cpu = Placement(key, cpus=(0, 1, 2), omp=((0, 1),))
    assert (
        vllm_engine.environment(EngineConfig(), {}, "cpu", on_cpu)["VLLM_CPU_OMP_THREADS_BIND"]
        == "0-1"
    )
    own = {"VLLM_CPU_OMP_THREADS_BIND": "2"}
    assert (
        vllm_engine.environment(EngineConfig(), own, "cpu", on_cpu)["VLLM_CPU_OMP_THREADS_BIND"]
        == "2"
    )
    on_gpu = Placement(key, gpus=(4, 5), memory_fraction=0.45)
    env = vllm_engine.environment(EngineConfig(), {}, "cuda", on_gpu)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env or "VLLM_CPU_OMP_THREADS_BIND" in os.environ
    cmd = vllm_engine.command(weights=Path("/w"), served_name="s", port=1, task="chat",
                              config=EngineConfig(), extra_args=["--gpu-memory-utilization", "0.3"],
                              host="cuda", placement=on_gpu)  # fmt: skip
    # ours first, the version's own after it (vLLM takes the last)
    assert cmd[-4:] == ["--gpu-memory-utilization", "0.45", "--gpu-memory-utilization", "0.3"]


def test_weir_placement_plans_the_configured_versions_on_this_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from serving.cli.main import main

    assert main(["placement", "--plan"]) == 0
    shown = capsys.readouterr().out
    assert "smollm2@135m-instruct#0" in shown
    assert "minilm@l6-v2#0" in shown


def test_weir_placement_rows_from_the_gateways_engines() -> None:
    from serving.cli.placement import rows_of

    on_gpu = Placement(ReplicaKey("smollm2", "v1", 0), gpus=(0, 1), memory_fraction=0.45)
    on_cpu = Placement(ReplicaKey("minilm", "l6", 0), cpus=(2, 3, 4), omp=((2, 3),))
    engines = [
        {"replica": "smollm2@v1#0", "local": True, "placement": on_gpu.view()},
        {"replica": "minilm@l6#0", "local": True, "placement": on_cpu.view()},
        {"replica": "far@v1#0", "local": False, "placement": None},
    ]
    assert rows_of(engines) == [
        ("smollm2@v1#0", "0,1", "0.45", "-", "-"),
        ("minilm@l6#0", "-", "-", "2-4", "2-3"),
        ("far@v1#0", "-", "-", "-", "remote"),
    ]


class FakeNvml:
    """nvidia-ml-py's calls that discovery makes, for 4 GPUs: 0-1 and 2-3 joined by
    NVLink, GPU 3 with 10 GiB in use by something else."""

    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shut = False

    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 4

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        from types import SimpleNamespace

        used = 10 * GIB if handle == 3 else 0
        return SimpleNamespace(total=80 * GIB, free=80 * GIB - used)

    def nvmlDeviceGetPciInfo(self, handle: int) -> object:
        raise self.NVMLError("not supported")

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        return 0 if a // 2 == b // 2 else 1


def test_nvml_discovery_reads_memory_islands_and_the_visible_gpus() -> None:
    from models.engines.placement.discover import _visible, nvml_gpus

    nvml = FakeNvml()
    found = nvml_gpus(None, nvml)
    assert found is not None
    assert [(g.index, g.island, g.free_bytes // GIB) for g in found] == [
        (0, 0, 80), (1, 0, 80), (2, 2, 80), (3, 2, 70)
    ]  # fmt: skip
    assert nvml.shut
    visible = nvml_gpus(_visible("3,1"), nvml)
    assert visible is not None
    assert [g.index for g in visible] == [1, 3]  # physical indices, as the engines get them
    # a TP-2 engine goes on one island
    (pair,) = plan(GpuHost(tuple(found)), [EngineSpec(CHAT, tensor_parallel=2, memory_bytes=GIB)])
    assert pair.gpus in ((0, 1), (2, 3))


def test_cpu_discovery_reads_numa_nodes(tmp_path: Path) -> None:
    from models.engines.placement.discover import numa_of

    nodes = tmp_path
    for node, cores in (("node0", "0-1\n"), ("node1", "2-3\n")):
        (nodes / node).mkdir()
        (nodes / node / "cpulist").write_text(cores)
    assert numa_of((0, 1, 2, 3), nodes) == ((0, 0), (1, 0), (2, 1), (3, 1))
