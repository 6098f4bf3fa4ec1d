"""Inputs, logs and outputs really travel between a runner store and an agent store."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from circus.agent.jobs import KEPT_LOG_NOTE
from circus.common.nix.environment import nix_environ
from circus.gateway.runtime import GatewayThread
from circus.gateway.sinks import ReportedResult, make_sinks, wait_result
from tests.agents.conftest import agent_in_own_store, store_has, write_agent_config
from tests.helpers.daemons import wait_until


def instantiate(expr: str) -> str:
    done = subprocess.run(["nix-instantiate", "-E", expr], capture_output=True, text=True,
                          env=nix_environ([]), check=True)
    return done.stdout.strip()


def input_closure(drv: str) -> list[str]:
    done = subprocess.run(["nix-store", "--query", "--requisites", "--include-outputs", drv],
                          capture_output=True, text=True, env=nix_environ([]), check=True)
    return done.stdout.split()


def realise(drv: str) -> list[str]:
    done = subprocess.run(["nix-store", "--realise", drv], capture_output=True, text=True,
                          env=nix_environ([]), check=True)
    return done.stdout.split()


def valid_here(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path],
                          capture_output=True).returncode == 0


async def assign(thread: GatewayThread, drv: str, log_path: Path, **job: Any
                 ) -> ReportedResult | None:
    gateway = thread.gateway
    agent = next(iter(gateway.agents.values()))
    closure = input_closure(drv)
    outputs = subprocess.run(["nix-store", "--query", "--outputs", drv], capture_output=True,
                             text=True, env=nix_environ([]), check=True).stdout.split()
    sinks = make_sinks(1, log_path, 1024 * 1024, nix_environ([]), closure, outputs=outputs)
    assignment = {"buildId": 1, "stepId": 1, "drvPath": drv, "maxLogSize": 1024 * 1024,
                  "maxSilentTime": 0, "buildTimeout": 0, "extraNixArgs": [],
                  "expectedOutputs": [], "inputClosure": closure, **job}
    response = await agent.builder.assign(assignment, sinks.log_sink, sinks.result_sink,
                                          sinks.output_sink, sinks.input_source)
    assert response.accepted, response.reason
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    return await asyncio.wait_for(wait_result(sinks, never), 60)


def test_inputs_and_outputs_travel(gateway: GatewayThread, tmp_path: Path, nonce: str) -> None:
    dep = (f'derivation {{ name = "dep-{nonce[:8]}"; builder = "/bin/sh"; system = '
           f'builtins.currentSystem; args = ["-c" "echo {nonce} > $out"]; }}')
    drv = instantiate(
        f'let dep = {dep}; in derivation {{ name = "top-{nonce[:8]}"; builder = "/bin/sh"; '
        f'system = builtins.currentSystem; args = ["-c" "echo building; read x < ${{dep}}; '
        f'echo $x top > $out"]; }}')
    # the dependency is built on the runner; the agent must receive its output
    dep_drv = next(p for p in input_closure(drv) if p.endswith(f"dep-{nonce[:8]}.drv"))
    dep_out = realise(dep_drv)[0]
    config = write_agent_config(tmp_path / "a1", gateway.port, name="store-agent")
    with agent_in_own_store("agent", tmp_path / "a1", config):
        wait_until(lambda: len(gateway.gateway.agents) == 1, timeout=20, message="agent up")
        result = gateway.call(assign(gateway, drv, tmp_path / "logs" / "top.log"), timeout=90)
    assert result is not None
    assert result.outcome == "success", result.error_message
    assert [o.name for o in result.outputs] == ["out"]
    out_path = result.outputs[0].path
    info = subprocess.run(["nix", "path-info", "--json", out_path], capture_output=True,
                          text=True, env=nix_environ([]), check=True).stdout
    assert json.loads(info)[0]["narHash"] == result.outputs[0].nar_hash
    # the output came back into the runner's store, the input went to the agent's
    assert valid_here(out_path)
    assert Path(out_path).read_text().strip() == f"{nonce} top"
    assert store_has(tmp_path / "a1", dep_out)
    assert out_path in result.imported
    assert "building" in (tmp_path / "logs" / "top.log").read_text()


def test_failure_is_reported_with_its_log(gateway: GatewayThread, tmp_path: Path,
                                          nonce: str) -> None:
    drv = instantiate(
        f'derivation {{ name = "fails-{nonce[:8]}"; builder = "/bin/sh"; '
        f'system = builtins.currentSystem; args = ["-c" "echo about to fail {nonce}; exit 7"]; }}')
    config = write_agent_config(tmp_path / "a2", gateway.port, name="fail-agent")
    with agent_in_own_store("agent", tmp_path / "a2", config):
        wait_until(lambda: len(gateway.gateway.agents) == 1, timeout=20, message="agent up")
        result = gateway.call(assign(gateway, drv, tmp_path / "fail.log"), timeout=90)
    assert result is not None
    assert result.outcome == "buildFailure"
    assert result.outputs == []
    assert "failed with exit code 7" in result.error_message
    assert f"about to fail {nonce}" in (tmp_path / "fail.log").read_text()


def test_a_step_the_agent_built_before_gets_the_log_nix_kept(gateway: GatewayThread,
                                                             tmp_path: Path, nonce: str) -> None:
    """kill -9 of the queue runner: an agent's attempt may finish after its lines went to
    the dead runner; given the step again, the agent finds the outputs valid and builds
    nothing. The second attempt's log (a fresh file here: the first one's is lost)
    still holds the build's lines, from the log Nix kept on the agent."""
    drv = instantiate(
        f'derivation {{ name = "again-{nonce[:8]}"; builder = "/bin/sh"; '
        f'system = builtins.currentSystem; args = ["-c" "echo log of again {nonce}; '
        f'echo done > $out"]; }}')
    outputs = subprocess.run(["nix-store", "--query", "--outputs", drv], capture_output=True,
                             text=True, env=nix_environ([]), check=True).stdout.split()
    config = write_agent_config(tmp_path / "a3", gateway.port, name="again-agent")
    with agent_in_own_store("agent", tmp_path / "a3", config):
        wait_until(lambda: len(gateway.gateway.agents) == 1, timeout=20, message="agent up")
        logs = [tmp_path / "first.log", tmp_path / "second.log"]
        results = [gateway.call(assign(gateway, drv, path, expectedOutputs=outputs),
                                timeout=90) for path in logs]
    assert [r.outcome if r else None for r in results] == ["success", "success"]
    first, second = (path.read_bytes() for path in logs)
    assert f"log of again {nonce}".encode() in first
    assert KEPT_LOG_NOTE not in first
    assert second.endswith(KEPT_LOG_NOTE + f"\nlog of again {nonce}\n".encode())
