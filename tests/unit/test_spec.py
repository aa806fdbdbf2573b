import json

import pytest

from runtime.errors import InvalidInput
from runtime.spec import ContainerSpec, Limits, Schedule, Volume, parse_duration, parse_size, validate_name


@pytest.mark.parametrize("name", ["a", "ctr1", "web.1", "job_2-x", "A" * 63])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../x", "a b", "x" * 64, "ctr\n", "é"])
def test_invalid_names(name):
    with pytest.raises(InvalidInput):
        validate_name(name)


@pytest.mark.parametrize("text,expected", [("512m", 512 << 20), ("1G", 1 << 30), ("1024", 1024), ("64KiB", 64 << 10),
                                           ("1.5g", 3 << 29)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5x", "-1m"])
def test_bad_sizes(text):
    with pytest.raises(InvalidInput):
        parse_size(text)


def test_volume_parsing():
    v = Volume.parse("/srv/data:/data:ro")
    assert (v.host_path, v.container_path, v.read_only) == ("/srv/data", "/data", True)
    assert Volume.parse("/a/:/b/").container_path == "/b"
    assert v.criu_key == "vol_data"


@pytest.mark.parametrize("text", ["data:/data", "/a:b", "/a:/b:rx", "/a", "/a:/x/../etc"])
def test_bad_volumes(text):
    with pytest.raises(InvalidInput):
        Volume.parse(text)


@pytest.mark.parametrize("volume", [
    {"host_path": "/srv", "container_path": "/x/../etc", "read_only": False},  # as Volume.parse refuses it
    {"host_path": "srv", "container_path": "/data", "read_only": False},
    {"host_path": "/srv", "container_path": "data", "read_only": False},
    {"host_path": "/srv", "container_path": "/data:/etc", "read_only": False},
    {"host_path": "/srv\0", "container_path": "/data", "read_only": False},
    {"host_path": 1, "container_path": "/data", "read_only": False},
    {"host_path": "/srv", "container_path": "/data", "read_only": "no"},
    {"host_path": "/srv", "container_path": "/data", "propagation": "shared"},
    ["/srv", "/data"],
])
def test_a_received_spec_s_volumes_are_checked_as_the_command_line_checks_them(volume):
    d = json.loads(ContainerSpec("c", "busybox:latest", "sha256:aa", (), ("sh",)).to_json())
    with pytest.raises(InvalidInput, match="invalid"):
        ContainerSpec.from_json(json.dumps({**d, "volumes": [volume]}))


def test_spec_json_round_trip():
    spec = ContainerSpec("c", "busybox:latest", "sha256:aa", ("sha256:bb", "sha256:cc"), ("sh", "-c", "x"),
                         ("A=1",), "/tmp", (Volume("/h", "/c", True),), Limits(1 << 20, 0.5, 10))
    assert ContainerSpec.from_json(spec.to_json()) == spec
    assert spec.renamed("d").name == "d" and spec.renamed("d").layers == spec.layers


@pytest.mark.parametrize("text,expected", [("2s", 2), ("10m", 600), ("1.5h", 5400), ("30", 30), ("250ms", 0.25),
                                           ("1d", 86400)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0s", "-1s", "5x", "soon", "1 week"])
def test_bad_durations(text):
    with pytest.raises(InvalidInput):
        parse_duration(text)


def test_schedule_and_drain_policy_round_trip_and_default_when_absent():
    spec = ContainerSpec(name="c", image="i", image_id="sha256:x", layers=(), argv=("sh",),
                         schedule=Schedule(every=2.0, keep=5), drain_policy="checkpoint")
    assert ContainerSpec.from_json(spec.to_json()) == spec
    old = json.loads(spec.to_json())
    del old["schedule"], old["drain_policy"]  # a spec written before either existed
    back = ContainerSpec.from_json(json.dumps(old))
    assert back.schedule is None and back.drain_policy is None  # unset: `migrate drain --policy` decides


def test_privileged_round_trips_and_a_spec_written_before_confinement_reads_as_privileged():
    spec = ContainerSpec(name="c", image="i", image_id="sha256:x", layers=(), argv=("sh",))
    assert spec.privileged is False  # new containers are confined
    assert ContainerSpec.from_json(spec.to_json()) == spec
    privileged = ContainerSpec(**{**spec.__dict__, "privileged": True})
    assert ContainerSpec.from_json(privileged.to_json()) == privileged
    old = json.loads(spec.to_json())
    del old["privileged"]
    assert ContainerSpec.from_json(json.dumps(old)).privileged is True  # it ran, and restores, unconfined
