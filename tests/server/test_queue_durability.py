"""The job queue survives crashes: rows before work, FIFO, recovery of running jobs, atomic image files."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests
from PIL import Image

from sdstack.server.db import Database
from sdstack.server.jobs import ImagePlan, JobSpec, JobStore


def spec(prompt="x", **params):
    p = {"prompt": prompt, "negative_prompt": "", "seed": 1, "subseed": 2, **params}
    return JobSpec(kind="txt2img", source="native", params=p, model="/m")


def test_claims_are_fifo_and_recovery_undoes_unfinished_work(tmp_path):
    outputs = tmp_path / "outputs"
    store = JobStore(Database(tmp_path / "db.sqlite3").open())
    assert store.db.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ids = [store.insert(spec(f"job {i}")) for i in range(3)]
    assert [store.position(i) for i in ids] == [0, 1, 2]
    job = store.claim_next()
    assert job["id"] == ids[0] and job["status"] == "running" and job["attempts"] == 1
    # the process "dies" after reserving and writing one file, and leaves a temp file of an atomic save
    day = outputs / "txt2img-images" / "2026-01-01"
    day.mkdir(parents=True)
    store.reserve_images(job, [ImagePlan(0, "txt2img-images/2026-01-01/00000-1.png", 1, 2, "info", 64, 64)], {})
    (day / "00000-1.png").write_bytes(b"half")
    (day / ".00001-2.png.0123456789ab.tmp").write_bytes(b"half")
    (day / "00007-9.png").write_bytes(b"someone else's file")
    assert store.recover(outputs, max_attempts=3) == [ids[0]]
    assert sorted(p.name for p in day.iterdir()) == ["00007-9.png"]
    job = store.get(ids[0])
    assert job["status"] == "queued" and "re-queued" in job["note"] and store.position(ids[0]) == 0
    assert store.claim_next()["id"] == ids[0]          # keeps its place at the head of the queue
    assert store.recover(outputs, max_attempts=2) == [ids[0]]
    assert store.get(ids[0])["status"] == "failed"     # died twice: not retried a third time
    assert [store.claim_next()["id"] for _ in range(2)] == ids[1:]
    assert store.claim_next() is None


# ---------------------------------------------------------------------------------------------- SIGKILL


def _command(port, data):
    from sdstack.cli import cli

    launcher = ["-m", "sdstack", "serve"] if "serve" in cli.commands else ["-m", "sdstack.server"]
    return [sys.executable, *launcher, "--data-dir", str(data), "--port", str(port), "--model", "tiny",
            "--preview-interval", "0.2", "--log-level", "warning"]


def _start(port, data, log):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_command(port, data), env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if requests.get(f"{base}/sdapi/v1/progress", timeout=2).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait(base, job_id, pred, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base}/api/v1/jobs/{job_id}", timeout=5).json()
        if pred(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting on job {job_id}: {job}")


def _a1111_call(base, body):
    try:
        requests.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=120)
    except requests.RequestException:
        pass   # the server is killed under this request; its job must still run after the restart


def _check_outputs(data, db_path, jobs):
    outputs = data / "outputs"
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM images").fetchall()
    assert all(r["state"] == "done" for r in rows)
    on_disk = {p.relative_to(outputs).as_posix() for p in outputs.rglob("*") if p.is_file()}
    assert on_disk == {r["path"] for r in rows}, "missing, extra or temp files"
    for r in rows:
        path = outputs / r["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["file_sha256"]
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.info["parameters"] == r["infotext"] and f"Seed: {r['seed']}," in r["infotext"]
    for job_id, expected in jobs.items():
        got = [r for r in rows if r["job_id"] == job_id]
        assert sorted(r["idx"] for r in got) == list(range(expected)), job_id
    conn.close()


@pytest.mark.timeout(600)
def test_sigkill_with_jobs_queued_and_one_running(tools, tmp_path):
    data = tools.data_dir(tmp_path / "data")
    port = tools.free_port()
    log = open(tmp_path / "server.log", "wb")
    proc, base = _start(port, data, log)
    try:
        jobs = {}   # id -> number of images, in submission order
        long_id = requests.post(f"{base}/api/v1/jobs", json={"prompt": "long job", "steps": 150, "seed": 1},
                                timeout=10).json()["id"]
        jobs[long_id] = 1
        for i in range(3):
            body = {"prompt": f"queued job {i}", "steps": 2, "seed": 10 + i, "batch_size": 2}
            jobs[requests.post(f"{base}/api/v1/jobs", json=body, timeout=10).json()["id"]] = 2
        caller = threading.Thread(target=_a1111_call, daemon=True, args=(base, {
            "prompt": "a1111 job", "steps": 2, "seed": 99, "width": 64, "height": 64, "n_iter": 2}))
        caller.start()
        _wait(base, long_id, lambda j: (j.get("progress") or {}).get("step", 0) >= 3)
        deadline = time.monotonic() + 30
        while requests.get(f"{base}/api/v1/jobs?status=queued", timeout=5).json().__len__() < 4:
            assert time.monotonic() < deadline, "the A1111 request never became a job"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        caller.join(30)
        conn = sqlite3.connect(data / "sdstack-server.sqlite3")
        statuses = dict(conn.execute("SELECT id, status FROM jobs").fetchall())
        a1111_id = next(i for i in statuses if i not in jobs)
        jobs[a1111_id] = 2
        conn.close()
        assert statuses[long_id] == "running" and sorted(statuses.values()).count("queued") == 4

        proc, base = _start(tools.free_port(), data, log)
        for job_id in jobs:
            _wait(base, job_id, lambda j: j["status"] in ("done", "failed", "cancelled"))
        done = {job_id: requests.get(f"{base}/api/v1/jobs/{job_id}", timeout=5).json() for job_id in jobs}
        assert {j["status"] for j in done.values()} == {"done"}
        assert done[long_id]["attempts"] == 2 and "re-queued" in done[long_id]["note"]
        assert all(j["attempts"] == 1 for k, j in done.items() if k != long_id)
        order = [j["id"] for j in sorted(done.values(), key=lambda j: j["started_at"])]
        assert order == list(jobs)      # FIFO; the interrupted job first again after the restart
        assert done[a1111_id]["source"] == "a1111" and done[a1111_id]["params"]["seed"] == 99
    finally:
        _stop(proc)
        log.close()
    _check_outputs(data, data / "sdstack-server.sqlite3", jobs)


def test_graceful_stop_requeues_the_running_job(tools, tmp_path):
    data = tools.data_dir(tmp_path / "data")
    with tools.client(data, model="tiny") as c:
        job_id = c.post("/api/v1/jobs", json={"prompt": "long", "steps": 400, "seed": 1}).json()["id"]
        tools.wait_job(c, job_id, statuses=("running",))
    store = JobStore(Database(data / "sdstack-server.sqlite3").open())
    job = store.get(job_id)
    assert job["status"] == "queued" and "stopped" in job["note"] and store.images(job_id) == []
    assert job["attempts"] == 0   # a clean stop is not a failed attempt
    store.db.close()
    with tools.client(data, model="tiny") as c:
        assert c.delete(f"/api/v1/jobs/{job_id}").status_code == 200
        assert tools.wait_job(c, job_id)["status"] == "cancelled"
    assert not list((data / "outputs").rglob("*.png"))


def test_serve_command_options():
    from click.testing import CliRunner

    from sdstack.server.cli import serve

    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--data-dir", "--api-auth", "--max-pixels", "--model", "--models-in-memory"):
        assert option in result.output
    assert "127.0.0.1" in result.output
    bad = CliRunner().invoke(serve, ["--api-auth", "nopassword"])
    assert bad.exit_code == 2 and "user:password" in bad.output
