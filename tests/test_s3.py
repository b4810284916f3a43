"""Object storage for real: a moto S3 server on 127.0.0.1, reached over HTTP by s3fs."""

import pytest

from cam2seg import folds, io
from cam2seg.synthetic import synth
from cam2seg.archive import Archive, ArchiveError


def test_synthetic_archive_round_trip_through_s3(s3, tmp_path):
    s3.mkdir("archive")
    local = str(tmp_path / "local")
    synth.write_archive(local, images=24, height=32, width=128, seed=4, progress=None)
    synth.write_archive("s3://archive/synth", images=24, height=32, width=128, seed=4, progress=None)

    assert io.list_images("s3://archive/synth/train_images") == io.list_images(local + "/train_images")
    a_local, a_s3 = Archive.open(local), Archive.open("s3://archive/synth")
    assert a_s3.image_ids == a_local.image_ids
    assert (a_s3.labels == a_local.labels).all()
    assert a_s3.has_masks
    for iid in a_s3.image_ids[:8]:
        assert (a_s3.read_image(iid) == a_local.read_image(iid)).all()
        assert (a_s3.masks(iid) == a_local.masks(iid)).all()
    wide = Archive.open("s3://archive/synth/labels.csv")
    assert (wide.labels == a_local.labels).all()


def test_s3_write_read_list_and_errors(s3):
    s3.mkdir("bucket")
    io.write_bytes("s3://bucket/run/x/folds.csv", b"ImageId,fold\na.jpg,1\n")
    assert io.exists("s3://bucket/run/x/folds.csv")
    assert folds.load_folds("s3://bucket/run/x/folds.csv") == {"a.jpg": 1}
    for key in ["imgs/b/2.png", "imgs/a.JPG", "imgs/c.txt"]:
        io.write_bytes(f"s3://bucket/{key}", b"x")
    assert io.list_images("s3://bucket/imgs") == ["a.JPG", "b/2.png"]
    with pytest.raises(FileNotFoundError, match="not found"):
        io.list_images("s3://bucket/nothing-here")
    with pytest.raises(ArchiveError, match="no train.csv or labels.csv in archive s3://bucket/nothing-here"):
        Archive.open("s3://bucket/nothing-here")


def test_endpoint_comes_from_environment_not_code(s3, s3_server):
    # The fixture only set AWS_ENDPOINT_URL; the library calls got no endpoint argument.
    fs, _ = io.filesystem("s3://bucket")
    assert fs.client_kwargs.get("endpoint_url") is None
    s3.mkdir("envcheck")
    io.write_bytes("s3://envcheck/k", b"v")
    assert s3.cat_file("envcheck/k") == b"v"


def test_listings_see_what_other_processes_wrote_since(s3):
    """fsspec keeps one filesystem per process and s3fs caches listings in it: new images and
    commits written by another process (here: another filesystem instance) must still show."""
    import s3fs

    from cam2seg import store

    s3.mkdir("fresh")
    io.write_bytes("s3://fresh/images/a.jpg", b"x")
    assert io.list_images("s3://fresh/images") == ["a.jpg"]
    assert store.committed_runs("s3://fresh/labels") == []
    store.commit("s3://fresh/labels", "run-1", {"parts": {"masks": [], "errors": []}})
    assert [m.run_id for m in store.committed_runs("s3://fresh/labels")] == ["run-1"]
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file("fresh/images/b.jpg", b"y")
    other.pipe_file("fresh/labels/_runs/run-2.json", b'{"run_id": "run-2", "parts": {"masks": [], "errors": []}}')
    other.pipe_file("fresh/labels/masks/run=run-2/part-0.parquet", b"z")
    assert io.list_images("s3://fresh/images") == ["a.jpg", "b.jpg"]
    assert [m.run_id for m in store.committed_runs("s3://fresh/labels")] == ["run-1", "run-2"]
    assert io.exists("s3://fresh/labels/masks/run=run-2/part-0.parquet")


def _cli(args, env, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cam2seg.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def dead_endpoints():
    """Two endpoints on 127.0.0.1: one refuses connections (nothing listens), one accepts them into
    its backlog and never answers. Both sockets are closed afterwards."""
    import socket

    # Bound but never listening: connections are refused, and no other process can take the port
    # meanwhile (closing it first let a concurrent test's listener take it: a read timeout instead).
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    refusing_port = refusing.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        yield {"refusing": f"http://127.0.0.1:{refusing_port}", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    finally:
        silent.close()
        refusing.close()


def test_default_s3_timeouts_are_bounded(monkeypatch):
    for var in ("CAM2SEG_S3_CONNECT_TIMEOUT", "CAM2SEG_S3_READ_TIMEOUT", "AWS_MAX_ATTEMPTS", "FSSPEC_S3"):
        monkeypatch.delenv(var, raising=False)
    fs, _ = io.filesystem("s3://bucket/x")
    assert fs.config_kwargs["connect_timeout"] == io.S3_TIMEOUTS["connect_timeout"]
    assert fs.config_kwargs["read_timeout"] == io.S3_TIMEOUTS["read_timeout"]
    assert fs.config_kwargs["retries"] == {"max_attempts": io.S3_ATTEMPTS, "mode": "standard"}
    assert fs.retries == io.S3FS_RETRIES
    # What the caller passes wins; the environment tunes the defaults; nonsense is refused.
    fs, _ = io.filesystem("s3://bucket/x", config_kwargs={"read_timeout": 3})
    assert fs.config_kwargs["read_timeout"] == 3
    monkeypatch.setenv("CAM2SEG_S3_READ_TIMEOUT", "7")
    assert io.filesystem("s3://bucket/y")[0].config_kwargs["read_timeout"] == 7.0
    monkeypatch.setenv("CAM2SEG_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CAM2SEG_S3_READ_TIMEOUT='soon'"):
        io.filesystem("s3://bucket/z")


@pytest.mark.parametrize("kind", ["refusing", "silent"])
def test_unreachable_endpoint_is_one_line_and_exit_2(kind, dead_endpoints, tmp_path):
    import os

    from conftest import s3_env

    env = {**os.environ, **s3_env(dead_endpoints[kind]),
           "CAM2SEG_S3_CONNECT_TIMEOUT": "1", "CAM2SEG_S3_READ_TIMEOUT": "1", "AWS_MAX_ATTEMPTS": "1"}
    env.pop("FSSPEC_S3", None)
    proc = _cli(["stats", "s3://bucket/archive"], env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    want = "Could not connect to the endpoint URL" if kind == "refusing" else "Read timeout on endpoint URL"
    assert lines[0].startswith("cam2seg stats: error: object store unreachable: " + want), lines[0]
    assert dead_endpoints[kind] in lines[0] and "CAM2SEG_S3_READ_TIMEOUT" in lines[0]
    assert "testing" not in proc.stderr + proc.stdout  # the credentials are not echoed
