"""Many devices in one server, tested with two CPU workers: dispatch, Inspect per device, health."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autopipeline import Client
from autopipeline import ModelState as SdkModelState
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.domain import ModelState
from autopipeline_server.pipelines import resolve_devices
from autopipeline_server.settings import ConfigError, ModelSpec, Settings

from .support import ServerThread, server_info, wait_for

LONG = pb.GenerateRequest(
    task=pb.TASK_TEXT_TO_IMAGE, prompt="long", num_inference_steps=500, width=256, height=256
)


@pytest.fixture(scope="module")
def two_devices(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    settings = Settings(
        models=(ModelSpec("sd15", str(checkpoints["sd15"])),), host="127.0.0.1", port=0, device="cpu,cpu"
    )
    server = ServerThread(settings)
    yield server
    server.stop()


def test_every_device_holds_its_own_warm_copy(two_devices: ServerThread) -> None:
    with grpc.insecure_channel(two_devices.target) as channel:
        response = pb_grpc.AutoPipelineServiceStub(channel).Inspect(pb.InspectRequest())
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sd15"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert [d.device for d in response.server.devices] == ["cpu", "cpu"]
    (model,) = response.models
    assert [(r.device, r.state) for r in model.replicas] == [("cpu", pb.MODEL_STATE_READY)] * 2
    with Client(two_devices.target) as client:
        info = client.inspect()
    assert [(d.device, d.running) for d in info.devices] == [("cpu", 0), ("cpu", 0)]
    assert info.models[0].replicas == [("cpu", SdkModelState.READY), ("cpu", SdkModelState.READY)]
    pipes = [r.registry.entries["sd15"].model for r in two_devices.running.devices.replicas]
    assert pipes[0] is not None and pipes[1] is not None
    assert pipes[0].base.unet is not pipes[1].base.unet, "each device has its own copy"


def test_a_request_goes_to_the_device_with_the_shortest_wait(two_devices: ServerThread) -> None:
    with grpc.insecure_channel(two_devices.target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        first = stub.Generate(LONG)
        next(e for e in first if e.HasField("progress"))
        second = stub.Generate(LONG)
        next(e for e in second if e.HasField("progress"))
        # Both run at once, one on each device, rather than the second waiting behind the first.
        assert [d.running for d in server_info(two_devices).devices] == [1, 1]
        first.cancel()
        second.cancel()
        wait_for(lambda: server_info(two_devices).running == 0)
        done = list(
            stub.Generate(pb.GenerateRequest(task=pb.TASK_TEXT_TO_IMAGE, prompt="x", num_inference_steps=1))
        )
        assert done[-1].HasField("completed")
    info = server_info(two_devices)
    assert info.stats.cancelled_running == sum(d.stats.cancelled_running for d in info.devices) == 2
    assert all(d.stats.cancelled_running == 1 for d in info.devices)


def test_device_lists_are_settings() -> None:
    assert [str(d) for d in resolve_devices("cpu, cpu")] == ["cpu", "cpu"]
    assert len(resolve_devices("all")) >= 1  # every CUDA device, or the one auto picks without CUDA
    Settings(models=(ModelSpec("a", "/a"),), device="cuda:0,cuda:1").validate()
    Settings(models=(ModelSpec("a", "/a"),), device="all").validate()
    with pytest.raises(ConfigError, match="comma-separated"):
        Settings(models=(ModelSpec("a", "/a"),), device="cuda:0,gpu").validate()


def test_health_serves_while_any_device_serves(two_devices: ServerThread) -> None:
    """A copy that fails on one device (say, out of memory there) leaves the model serving on the other."""
    registries = [replica.registry for replica in two_devices.running.devices.replicas]
    entries = [registry.entries["sd15"] for registry in registries]

    def set_state(index: int, state: ModelState) -> None:
        two_devices.loop.call_soon_threadsafe(registries[index]._set, entries[index], state, state.value)

    def health() -> int:
        with grpc.insecure_channel(two_devices.target) as channel:
            request = health_pb2.HealthCheckRequest(service="sd15")
            return health_pb2_grpc.HealthStub(channel).Check(request).status  # type: ignore[no-any-return]

    try:
        set_state(0, ModelState.FAILED)
        set_state(1, ModelState.FAILED)
        wait_for(lambda: health() == health_pb2.HealthCheckResponse.NOT_SERVING)
        set_state(1, ModelState.READY)
        wait_for(lambda: health() == health_pb2.HealthCheckResponse.SERVING)
        with grpc.insecure_channel(two_devices.target) as channel:
            (model,) = pb_grpc.AutoPipelineServiceStub(channel).Inspect(pb.InspectRequest()).models
        assert model.state == pb.MODEL_STATE_READY, "shown from the device where it is ready"
        assert [r.state for r in model.replicas] == [pb.MODEL_STATE_FAILED, pb.MODEL_STATE_READY]
    finally:
        set_state(0, ModelState.READY)
        set_state(1, ModelState.READY)
        wait_for(lambda: health() == health_pb2.HealthCheckResponse.SERVING)
