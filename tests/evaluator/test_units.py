"""Small pieces: URL checks, attribute names, .drv scanning, COPY escaping."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import EvaluationStatus, TriggerKind
from circus.common.models import Build, Evaluation, EvaluationError, JobName, Jobset, Project
from circus.evaluator.execution import _split_attr
from circus.evaluator.git import GitError, check_url, url_scheme
from circus.evaluator.importer import BuildImporter
from circus.evaluator.jobs import (
    DrvFacts,
    Job,
    JobError,
    attr_name,
    job_from_record,
    plain_job,
    scan_derivation,
)

ALLOWED = ["https", "http", "ssh", "git", "file"]


@pytest.mark.parametrize(("url", "scheme"), [
    ("https://example.org/repo.git", "https"),
    ("git+https://example.org/repo.git", "https"),
    ("ssh://git@example.org/repo.git", "ssh"),
    ("git@example.org:owner/repo.git", "ssh"),
    ("file:///srv/repo", "file"),
    ("/srv/repo", "file"),
    ("ext::sh -c id", "ext"),
    ("ftp://example.org/repo", "ftp"),
])
def test_url_schemes(url: str, scheme: str) -> None:
    assert url_scheme(url) == scheme


def test_urls_outside_the_allowed_schemes_are_refused() -> None:
    assert check_url("git+https://example.org/r.git", ALLOWED) == "https://example.org/r.git"
    for bad in ("ext::sh -c id", "ftp://example.org/r", "-uhelp", "", "relative/path"):
        with pytest.raises(GitError):
            check_url(bad, ALLOWED)
    with pytest.raises(GitError, match="not allowed"):
        check_url("ssh://host/repo", ["https"])
    with pytest.raises(GitError, match="flake reference"):
        check_url("github:NixOS/nixpkgs", ALLOWED)


def test_attribute_names_follow_nix_eval_jobs() -> None:
    assert attr_name(["a", "b"]) == "a.b"
    assert attr_name(["a", "b.c", "d"]) == 'a."b.c".d'
    assert _split_attr('hydraJobs."x.y".z') == ["hydraJobs", "x.y", "z"]
    assert _split_attr("hydraJobs") == ["hydraJobs"]


def test_records_and_errors_from_nix_eval_jobs() -> None:
    error = job_from_record({"attr": "x", "attrPath": ["x"], "error": "error: boom\n"})
    assert error == JobError("x", "error: boom")
    job = job_from_record({"attr": "a.b", "attrPath": ["a", "b"], "name": "n",
                           "system": "x86_64-linux", "drvPath": "/nix/store/x-n.drv",
                           "outputs": {"out": "/nix/store/x-n", "ca": None},
                           "requiredSystemFeatures": "kvm big-parallel"})
    assert isinstance(job, Job)
    assert job.outputs == {"out": "/nix/store/x-n"}
    assert job.features == ["kvm", "big-parallel"]


def _walker_record(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {"name": "n", "system": "x86_64-linux",
                                 "drvPath": "/nix/store/x-n.drv",
                                 "outputs": {"out": "/nix/store/x-n", "dev": "/nix/store/x-n-dev"},
                                 "meta": {"description": "d", "hydra": {"repeats": 2}}}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


@pytest.mark.parametrize("record", [
    _walker_record(),
    _walker_record(meta={}),
    _walker_record(system=""),
    _walker_record(name=""),  # not plain: the generic path
    _walker_record(outputs={"out": None}),  # content-addressed: not plain
    _walker_record(meta=...),  # not the walker's shape
    _walker_record(drvPath="/nix/store/x-n"),  # RecordError from the generic path
    _walker_record(constituents=["/nix/store/c.drv"], namedConstituents=["j"]),
    _walker_record(requiredSystemFeatures=["kvm"]),
])
def test_the_walkers_plain_records_make_the_jobs_the_generic_reader_makes(
        record: dict[str, object]) -> None:
    path = ["a", "b.c"]
    job = plain_job(path, dict(record))
    try:
        generic = job_from_record({**record, "attrPath": path})
    except ValueError:
        assert job is None
        return
    assert job is None or job == generic
    outputs = record["outputs"]
    assert isinstance(outputs, dict)
    plain = len(record) == 5 and record["name"] != "" and None not in outputs.values()
    assert (job is not None) == plain


def test_drv_scanning() -> None:
    fod = ('Derive([("out","/nix/store/a-f","sha256","abc")],[],[],"x86_64-linux",'
           '"/bin/sh",[],[("requiredSystemFeatures","kvm"),("_hydraAggregate","1")])')
    facts = scan_derivation(fod)
    assert facts == DrvFacts(True, ["kvm"], True, [])
    plain = ('Derive([("out","/nix/store/a-p","","")],[("/nix/store/b-dep.drv",["out"])],'
             '[],"x86_64-linux","/bin/sh",["-c","(\\"/nix/store/c-x.drv\\",[)"],'
             '[("out","/nix/store/a-p")])')
    assert scan_derivation(plain) == DrvFacts(False, [], False, ["/nix/store/b-dep.drv"])
    with pytest.raises(ValueError, match="not a derivation"):
        scan_derivation("{}")


def test_copy_escapes_whatever_job_names_and_meta_hold(
        committed_db: sessionmaker[Session]) -> None:
    with committed_db() as session, session.begin():
        project = Project(name="escapes")
        jobset = Jobset(project=project, name="main")
        session.add_all([project, jobset])
        session.flush()
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.running)
        session.add(evaluation)
    odd = 'we\tird\\name\n"quoted"'
    job = Job(name=odd, attr_path=[odd], nix_name="n", system="x86_64-linux",
              drv_path="/nix/store/aaaa-n.drv", outputs={"out": "/nix/store/aaaa-n"},
              meta={"description": "line one\nline\ttwo \\ end",
                    "license": [{"spdxId": "MIT"}, "custom"],
                    "maintainers": ["x", {"email": "e@x"}], "timeout": "30",
                    "schedulingPriority": True},
              facts=DrvFacts(False, ['feat"ure', "k\\vm"], False, []))
    with committed_db() as session:
        jobset_row = session.get_one(Jobset, jobset.id)
        importer = BuildImporter(session, session.get_one(Evaluation, evaluation.id),
                                 jobset_row, reuse=True, max_retries=2)
        importer.add([job])
        stats = importer.finish([JobError("bad\tjob", "error:\n\tmulti\\line")])
        session.commit()
    assert (stats.new, stats.reused, stats.errors) == (1, 0, 1)
    with committed_db() as session:
        build = session.scalars(select(Build)).one()
        error = session.scalars(select(EvaluationError)).one()
        # the COPY's statement trigger lists the new name for search
        names = list(session.scalars(select(JobName.name)))
    assert build.job_name == odd
    assert names == [odd]
    assert build.meta_description == "line one\nline\ttwo \\ end"
    assert build.meta_license == "MIT, custom"
    assert build.meta_maintainers == "x, e@x"
    assert build.timeout == 30
    assert build.priority == 0
    assert build.max_retries == 2
    assert build.required_features == ['feat"ure', "k\\vm"]
    assert (error.job_name, error.message) == ("bad\tjob", "error:\n\tmulti\\line")
