"""Pure parts of the queue runner: parsing, the capability rule, logs, processes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from circus.common.nix.failures import Kind, classify
from circus.common.nix.store import parse_dry_run
from circus.queue_runner.builds.products import parse_metrics, parse_products
from circus.queue_runner.local.nixrun import RunOptions, build_argv
from circus.queue_runner.local.procs import builders_of, kill_tree
from circus.queue_runner.routing.capabilities import (
    Capabilities,
    parse_queue_class,
    queue_class_name,
)
from circus.queue_runner.steps.logs import (
    StepLog,
    compress_file,
    final_log,
    log_path_for,
    read_log,
)

A = "/nix/store/" + "a" * 32


def test_queue_class_names_sort_features() -> None:
    assert queue_class_name("x86_64-linux", []) == "x86_64-linux"
    assert queue_class_name("x86_64-linux", ["nixos-test", "kvm", "kvm"]) == \
        "x86_64-linux.kvm+nixos-test"
    assert parse_queue_class("x86_64-linux.kvm+nixos-test") == ("x86_64-linux",
                                                               ["kvm", "nixos-test"])
    assert parse_queue_class("aarch64-linux") == ("aarch64-linux", [])


@pytest.mark.parametrize(("system", "features", "expected"), [
    ("x86_64-linux", [], True),
    ("x86_64-linux", ["kvm"], True),
    ("x86_64-linux", ["kvm", "big-parallel"], True),
    ("x86_64-linux", ["cuda"], False),  # not supported
    ("aarch64-linux", [], False),  # other system
    ("builtin", [], True),  # Nix builds these itself
])
def test_capability_rule(system: str, features: list[str], expected: bool) -> None:
    caps = Capabilities(frozenset({"x86_64-linux"}), frozenset({"kvm", "big-parallel"}))
    assert caps.can_build(system, features) is expected


def test_mandatory_features_reserve_a_machine() -> None:
    caps = Capabilities(frozenset({"x86_64-linux"}), frozenset({"kvm"}),
                        frozenset({"benchmark"}))
    assert not caps.can_build("x86_64-linux", [])
    assert caps.can_build("x86_64-linux", ["benchmark"])
    assert caps.can_build("x86_64-linux", ["benchmark", "kvm"])
    assert caps.base_classes() == ["x86_64-linux.benchmark"]
    assert Capabilities.from_json(caps.to_json()) == caps


def test_dry_run_output_is_parsed() -> None:
    text = (f"these 2 derivations will be built:\n  {A}-x.drv\n  {A[:-1]}b-y.drv\n"
            f"these 1 paths will be fetched (0.01 MiB download, 0.02 MiB unpacked):\n"
            f"  {A}-z\n")
    missing = parse_dry_run(text)
    assert missing.to_build == {f"{A}-x.drv", f"{A[:-1]}b-y.drv"}
    assert missing.to_fetch == {f"{A}-z"}
    assert parse_dry_run("").to_build == set()


@pytest.mark.parametrize(("message", "kind", "code", "sig"), [
    (f"builder for '{A}-x.drv' failed with exit code 3", Kind.failed, 3, None),
    (f"builder for '{A}-x.drv' failed due to signal 9 (Killed)", Kind.signal, None, 9),
    (f"building of '{A}-x.drv!*' from .drv file timed out after 2 seconds", Kind.timeout,
     None, None),
    (f"building of '{A}-x.drv!*' from .drv file killed after writing more than 10 bytes "
     "of log output", Kind.log_limit, None, None),
    (f"1 dependencies of derivation '{A}-x.drv' failed to build", Kind.dependency_failed,
     None, None),
    (f"hash mismatch in fixed-output derivation '{A}-x.drv'", Kind.failed, None, None),
])
def test_nix_error_messages_are_classified(message: str, kind: Kind, code: int | None,
                                           sig: int | None) -> None:
    assert classify(message) == (kind, code, sig)


def test_argv_moves_nix_into_the_build_cgroup() -> None:
    options = RunOptions(env={}, timeout=10, max_silent=5, max_log_size=100,
                         extra_args=["--option", "cores", "1"], system_features=["kvm"],
                         build_cgroup="/sys/fs/cgroup/x")
    argv = build_argv([f"{A}-x.drv"], options)
    tail = argv[argv.index("nix-store"):]
    assert tail[:3] == ["nix-store", "--realise", f"{A}-x.drv"]
    for flag, value in (("--timeout", "10"), ("--max-silent-time", "5"),
                        ("--max-jobs", "1")):
        assert tail[tail.index(flag) + 1] == value
    assert "max-build-log-size" in tail
    assert tail[-3:] == ["--option", "cores", "1"]
    assert "/sys/fs/cgroup/x/cgroup.procs" in argv


def test_products_stay_inside_the_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "doc").mkdir(parents=True)
    (out / "a b.txt").write_text("x")
    (out / "doc" / "index.html").write_text("<html/>")
    (out / "escape").symlink_to("/etc/passwd")
    lines = "\n".join([
        f'file binary-dist "{out}/a b.txt"',
        f"doc manual {out}/doc index.html",
        "file evil /etc/passwd",
        f"file sneaky {out}/escape",
        f"file dots {out}/../../etc/passwd",
        "garbage",
        f"bad-type! x {out}/a b.txt",
    ])
    products = parse_products(lines, [str(out)])
    assert [(p.type, p.name) for p in products] == [("file", "a b.txt"), ("doc", "doc")]
    assert products[0].file_size == 1
    assert products[0].content_type == "text/plain"
    assert products[1].is_directory
    assert products[1].default_path == "index.html"


def test_metrics_parse_and_skip_garbage() -> None:
    metrics = parse_metrics("time 1.5 s\ncount 3\nnan nan\nbad x\n\n-x 1\ncount 4\n")
    assert [(m.name, m.value, m.unit) for m in metrics] == [("time", 1.5, "s"),
                                                           ("count", 4.0, None)]


def test_step_logs_are_capped_and_compressed(tmp_path: Path) -> None:
    path = log_path_for(tmp_path, f"{A}-hello.drv", 7)
    assert path == tmp_path / "aa" / f"{'a' * 32}-hello.drv-7.log"
    step_log = StepLog(path, limit=10)
    step_log.write(b"0123456789abcdef\n")
    step_log.note("error: something")
    assert step_log.over_limit
    final, size = step_log.finalize(compress=True)
    assert final == str(path) + ".zst"
    assert size == 17
    assert not path.exists()
    data = read_log(final)
    assert data.startswith(b"0123456789\n[circus: log truncated")
    assert data.endswith(b"error: something\n")
    step_log.write(b"late line\n")  # after finalize: ignored, no new plain file
    assert not path.exists()
    plain = tmp_path / "p.log"
    plain.write_bytes(b"x" * 100)
    assert read_log(compress_file(plain)) == b"x" * 100


def test_a_step_run_again_after_an_unrecorded_build_keeps_that_builds_log(
        tmp_path: Path) -> None:
    path = log_path_for(tmp_path, f"{A}-hello.drv", 7)
    first = StepLog(path, limit=1000)
    first.write(b"building hello\n")
    built, _ = first.finalize(compress=True)
    # the outcome was never recorded; the second attempt finds the outputs valid
    # and writes nothing of its own
    again, size = StepLog(path, limit=1000).finalize(compress=True)
    assert again == built
    assert size == len(b"building hello\n")
    assert read_log(again) == b"building hello\n"
    assert StepLog(tmp_path / "other.log", limit=10).finalize(compress=True) == (None, 0)


def test_every_attempt_of_a_step_adds_to_its_log_never_replaces_it(tmp_path: Path) -> None:
    """An agent's second attempt finds the outputs valid: its log is nix-store's own
    output alone, and compressing it replaced the build's log (tests/faults)."""
    path = log_path_for(tmp_path, f"{A}-hello.drv", 7)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"building hello\n")
    built = final_log(path, compress=True)
    assert built == path.with_name(path.name + ".zst")
    # the sink of the next attempt creates the file; that attempt writes nothing
    path.touch()
    assert final_log(path, compress=True) == built
    assert not path.exists()
    path.write_bytes(b"/nix/store/...-hello\n")
    assert final_log(path, compress=True) == built
    assert read_log(built) == b"building hello\n/nix/store/...-hello\n"
    assert final_log(tmp_path / "none.log", compress=True) is None


def test_builders_are_found_by_their_output_variable_and_killed() -> None:
    out = f"{A}-circus-test-{os.getpid()}"
    env = {**os.environ, "out": out}
    # a builder-like process in its own session, as Nix starts them
    process = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & wait"], env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(builders_of({"out": out})) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = builders_of({"out": out})
        assert process.pid in found
        assert builders_of({"dev": out}) == []  # name and path must both match
        kill_tree(process.pid)
        process.wait(5)
        assert process.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while builders_of({"out": out}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert builders_of({"out": out}) == []  # the child `sleep` is gone too
    finally:
        if process.poll() is None:
            process.kill()


def test_build_cgroup_must_be_a_cgroup(tmp_path: Path) -> None:
    from circus.common.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"queue_runner\.build_cgroup"):
        load_settings(files=[], environ={},
                      overrides={"queue_runner": {"build_cgroup": str(tmp_path)}})
    (tmp_path / "cgroup.procs").write_text("")
    settings = load_settings(files=[], environ={},
                             overrides={"queue_runner": {"build_cgroup": str(tmp_path)}})
    assert settings.queue_runner.build_cgroup == str(tmp_path)


def test_a_full_log_disk_stops_the_log_not_the_build() -> None:
    # /dev/full answers every write with ENOSPC, as a full log filesystem does
    step_log = StepLog(Path("/dev/full"), limit=1000)
    step_log.touch()
    step_log.write(b"building hello\n")
    step_log.note("a note")
    step_log.write(b"more\n")
    assert step_log.broken is not None
    assert step_log.broken.errno == errno.ENOSPC
    assert step_log.finalize(compress=True) == ("/dev/full", len(b"building hello\nmore\n"))
