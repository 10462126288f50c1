"""Load test of `sdstack serve`: N concurrent A1111 clients posting /sdapi/v1/txt2img against a real server.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_serve_load.py                        # built-in model, N=1,4,16
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_serve_load.py --model runs/shapes-v1/candidate
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_serve_load.py --tiny --clients 1,4 --requests 8   # smoke test

The server is `python -m sdstack serve --no-ui` in a subprocess on a free loopback port with a temp --data-dir
(the model: the built-in shapes-v1; or --model FOLDER, copied into <data-dir>/models/Stable-diffusion; or with
--tiny or no built-in model, a tiny random sd1 model written there). One warm-up request loads the model. Then,
per client count N, --requests requests in total (rounded up to a multiple of N) are sent by N threads, each
sending its share one after another (64x64, --steps 20, DPM++ 2M Karras, CFG 7, a different seed per request).

Per N it prints:
  ok / failed     every request must answer 200 with one image (anything else counts as failed, and the script
                  exits 1)
  img/s           images / (first send -> last answer)
  latency         client-side, send -> answer, p50 / p95
  queue overhead  per job: started_at - max(arrival, finished_at of the job that ran just before it), i.e. the
                  time from arrival to start minus the time it waited behind other jobs; "arrival" = the client's
                  send time (the server records no arrival time of its own: created_at is written after the
                  request was parsed and validated). p50 / p95.
                  Split: admission = created_at - arrival (HTTP + validation + job insert), and
                  server queue = started_at - max(created_at, previous finished_at) (wake-up + claim).
  run             finished_at - started_at (generation + saving the PNG + the job's DB rows), p50
  response        answer received - finished_at (wake the waiting handler, read + base64 the image), p50 / p95
and at the end img/s at the largest N relative to N=1 (the goal: within 10%, i.e. ratio >= 0.9).
Timestamps come from GET /api/v1/jobs/{id} (created_at, started_at, finished_at: UTC, millisecond resolution,
the same clock as the client's time.time() since both run on this machine).

Baseline (skip with --no-baseline): the same generation called in this process with sdstack.engine.generate,
one after another, before the server starts: the engine's img/s with no HTTP, queue or saving around it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a red star on a blue background"


# ------------------------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_model(args, data: Path) -> tuple[str | None, str]:
    """(--model value for `sdstack serve` or None for its default, description)."""
    from sdstack.models.registry import builtin_model_path

    ckpts = data / "models" / "Stable-diffusion"
    if args.model and not args.tiny:
        src = Path(args.model).expanduser().resolve()
        if not (src / "model_index.json").is_file():
            raise SystemExit(f"--model {args.model}: not a diffusers model folder (no model_index.json)")
        shutil.copytree(src, ckpts / src.name)
        return src.name, f"{src} (copied into the data folder)"
    if not args.tiny and builtin_model_path() is not None:
        return None, f"built-in shapes-v1 ({builtin_model_path()})"
    from sdstack.models.tiny import save_diffusers_folder, tiny_bundle

    save_diffusers_folder(tiny_bundle("sd1"), ckpts / "tiny-sd1")
    why = "--tiny" if args.tiny else "the built-in model sdstack/builtin/shapes-v1 is NOT installed"
    return "tiny-sd1", f"tiny random sd1 model ({why})"


class Server:
    def __init__(self, data: Path, model: str | None, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data / "server.log"
        cmd = [sys.executable, "-m", "sdstack", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(data), "--no-ui", "--log-level", "warning"]
        if model:
            cmd += ["--model", model]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, client, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.tail()}")
            try:
                if client.get(f"{self.url}/sdapi/v1/progress", timeout=5).status_code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # only the process this script started, by its pid
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------------------------------------ clients

def body(args, seed: int) -> dict:
    return {"prompt": PROMPT, "negative_prompt": "", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.0,
            "seed": seed, "batch_size": 1, "n_iter": 1, "send_images": True, "save_images": True}


def post_txt2img(client, url: str, payload: dict) -> dict:
    """One request; returns {sent, answered, ok, job_id, error}."""
    rec = {"sent": time.time(), "ok": False, "job_id": None, "error": None}
    try:
        r = client.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=900)
        rec["answered"] = time.time()
        if r.status_code != 200:
            rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
            return rec
        data = r.json()
        info = json.loads(data["info"])
        rec["job_id"] = info.get("sdstack_job_id")
        if len(data.get("images") or []) != 1:
            rec["error"] = f"expected 1 image, got {len(data.get('images') or [])}"
        else:
            rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - counted as a failure
        rec.setdefault("answered", time.time())
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def run_level(args, url: str, n: int, seed0: int) -> tuple[list[dict], float]:
    import httpx

    per_client = -(-args.requests // n)
    records: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)

    def client_thread(k: int):
        with httpx.Client() as client:
            start.wait()
            for j in range(per_client):
                rec = post_txt2img(client, url, body(args, seed0 + k * per_client + j))
                with lock:
                    records.append(rec)

    threads = [threading.Thread(target=client_thread, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.time()
    for t in threads:
        t.join()
    return records, time.time() - t0


# ------------------------------------------------------------------------------------------------ analysis

def ts(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fetch_jobs(client, url: str, records: list[dict]) -> None:
    for rec in records:
        if rec["job_id"]:
            job = client.get(f"{url}/api/v1/jobs/{rec['job_id']}", timeout=30).json()
            rec.update(created=ts(job["created_at"]), started=ts(job["started_at"]),
                       finished=ts(job["finished_at"]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def analyse(records: list[dict], wall: float, prev_finish: float | None) -> tuple[dict, float | None]:
    ok = [r for r in records if r["ok"] and r.get("started") is not None]
    ok.sort(key=lambda r: r["started"])
    overhead, server_q, admission, run, response = [], [], [], [], []
    for r in ok:
        behind = prev_finish if prev_finish is not None else float("-inf")
        overhead.append(r["started"] - max(r["sent"], behind))
        server_q.append(r["started"] - max(r["created"], behind))
        admission.append(r["created"] - r["sent"])
        run.append(r["finished"] - r["started"])
        response.append(r["answered"] - r["finished"])
        prev_finish = r["finished"]
    lat = [r["answered"] - r["sent"] for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    ms = lambda xs, q: 1000 * pct(xs, q)  # noqa: E731
    return {"requests": len(records), "ok": len(records) - len(failed), "failed": len(failed),
            "errors": sorted({r["error"] for r in failed if r["error"]})[:5], "wall_s": wall,
            "img_s": (len(records) - len(failed)) / wall, "lat_p50": ms(lat, 50), "lat_p95": ms(lat, 95),
            "ovh_p50": ms(overhead, 50), "ovh_p95": ms(overhead, 95), "adm_p50": ms(admission, 50),
            "adm_p95": ms(admission, 95), "srvq_p50": ms(server_q, 50), "srvq_p95": ms(server_q, 95),
            "run_p50": ms(run, 50), "resp_p50": ms(response, 50), "resp_p95": ms(response, 95)}, prev_finish


def engine_baseline(args, model: Path, k: int = 5) -> float:
    """img/s of sdstack.engine.generate alone (same params, one after another), in this process."""
    from sdstack.engine.generate import generate
    from sdstack.models.loader import load_model
    from sdstack.params import make_params

    bundle = load_model(model)
    b = body(args, 0)
    keys = ("prompt", "negative_prompt", "steps", "width", "height", "sampler_name", "scheduler", "cfg_scale")
    generate(bundle, make_params(**{kk: b[kk] for kk in keys}, seed=1))
    t = time.perf_counter()
    for i in range(k):
        generate(bundle, make_params(**{kk: b[kk] for kk in keys}, seed=2 + i))
    return k / (time.perf_counter() - t)


def print_table(rows: list[tuple[int, dict]], base_ips: float | None) -> None:
    head = (f"{'N':>4}{'ok':>5}{'fail':>5}{'img/s':>8}{'lat p50':>9}{'lat p95':>9}{'ovh p50':>9}{'ovh p95':>9}"
            f"{'adm p50':>9}{'adm p95':>9}{'srvq p50':>10}{'srvq p95':>10}{'run p50':>9}{'resp p50':>10}"
            f"{'resp p95':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for n, s in rows:
        print(f"{n:>4}{s['ok']:>5}{s['failed']:>5}{s['img_s']:>8.2f}{s['lat_p50']:>9.0f}{s['lat_p95']:>9.0f}"
              f"{s['ovh_p50']:>9.1f}{s['ovh_p95']:>9.1f}{s['adm_p50']:>9.1f}{s['adm_p95']:>9.1f}"
              f"{s['srvq_p50']:>10.1f}{s['srvq_p95']:>10.1f}{s['run_p50']:>9.0f}{s['resp_p50']:>10.1f}"
              f"{s['resp_p95']:>10.1f}")
    print("(times in ms; ovh = queue overhead = started - max(sent, previous job's finished); adm = created - sent;"
          "\n srvq = started - max(created, previous finished); run = finished - started; resp = answer - finished)")
    for n, s in rows:
        for e in s["errors"]:
            print(f"N={n} failure: {e}")
    first, last = rows[0], rows[-1]
    if len(rows) > 1 and first[1]["img_s"] > 0:
        ratio = last[1]["img_s"] / first[1]["img_s"]
        print(f"\nthroughput N={last[0]} / N={first[0]} = {ratio:.3f} "
              f"(goal within 10%: {'met' if ratio >= 0.9 else 'NOT met'})")
    if base_ips:
        best = max(s["img_s"] for _, s in rows)
        print(f"engine alone (generate() in-process, no server): {base_ips:.2f} img/s; best server img/s / engine "
              f"= {best / base_ips:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts [default: 1,4,16]")
    ap.add_argument("--requests", type=int, default=48, help="requests per client count, in total [48]")
    ap.add_argument("--model", default=None, help="diffusers model folder [default: built-in shapes-v1]")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--server-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for the server (0 = torch default: all cores)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process engine baseline")
    ap.add_argument("--keep", action="store_true", help="keep the temp data folder (server.log, outputs, DB)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    try:
        levels = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        ap.error("--clients takes comma-separated integers, e.g. 1,4,16")
    if not levels or min(levels) < 1:
        ap.error("--clients needs positive integers")

    import httpx

    data = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model, how = prepare_model(args, data)
    print(f"model: {how}; data folder {data}")
    base_ips = None
    if not args.no_baseline:
        from sdstack.models.registry import builtin_model_path

        folder = data / "models" / "Stable-diffusion" / model if model else builtin_model_path()
        if args.server_threads:
            import torch

            torch.set_num_threads(args.server_threads)
        base_ips = engine_baseline(args, folder)
    server = Server(data, model, args.server_threads)
    rows, failed = [], 0
    try:
        with httpx.Client() as client:
            server.wait_ready(client)
            warm = post_txt2img(client, server.url, body(args, 1))   # loads the model
            if not warm["ok"]:
                raise RuntimeError(f"warm-up request failed: {warm['error']}\n{server.tail()}")
            prev_finish, seed0 = None, 1000
            for n in levels:
                records, wall = run_level(args, server.url, n, seed0)
                seed0 += len(records)
                fetch_jobs(client, server.url, records)
                stats, prev_finish = analyse(records, wall, prev_finish)
                failed += stats["failed"]
                rows.append((n, stats))
                print(f"N={n:<3} {stats['ok']}/{stats['requests']} ok in {wall:.1f} s: {stats['img_s']:.2f} img/s, "
                      f"queue overhead p50 {stats['ovh_p50']:.1f} ms p95 {stats['ovh_p95']:.1f} ms", flush=True)
    except Exception:
        print(f"--- server log (tail) ---\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    print(f"\n{args.size}x{args.size}, {args.steps} steps DPM++ 2M Karras, CFG 7; {args.requests} requests per level; "
          f"server threads: {args.server_threads or 'torch default'}")
    print_table(rows, base_ips)
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": {str(n): s for n, s in rows}, "engine_img_s": base_ips},
                                              indent=2))
    if failed:
        print(f"FAILED: {failed} request(s) did not complete with 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
