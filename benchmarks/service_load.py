"""`coldfusion serve` under load, on loopback: many contributors uploading at once.

A repository with a tiny BERT (hidden 32, 2 layers: the payloads are small, so the
service's own work is what is measured) is served by `coldfusion serve` in its own
process; `--contributors` threads, each with its own token, each `--uploads` /
`--contributors` times: read the newest version, download its body, perturb it, upload
it (the upload's latency is timed). The service fuses as contributions arrive
(`--when-waiting`). Afterwards the repository is read directly: every acknowledged
contribution must be there (`lost`), no contribution may appear in two fusions
(`fused_twice`), and `verify` must be clean.

The peer, in the same run with the same payloads and threads: a minimal FastAPI/uvicorn
endpoint that streams each upload to a file and answers, with no authentication, checks
or index (what any upload costs on this machine at best). Its p50 and p99 sit beside ours.

    python benchmarks/service_load.py [--contributors 50] [--uploads 500] [--when-waiting 10]
                                      [--replicas 2]   # shared storage: PostgreSQL + S3 (SeaweedFS)

With `--replicas N` the repository lives in a PostgreSQL server and an S3 server started
for the run (as tests/test_shared_storage.py starts them), `N` replicas of `coldfusion serve`
share it, and contributor i talks to replica i mod N.

Prints JSON lines (and appends them to results/service_load.jsonl): per round (`--repeats`,
each on a fresh repository) {"metric": "service_load", "contributors", "uploads",
"acknowledged", "lost", "fused_twice", "p50_upload_s", "p99_upload_s", "p50_vs_peer", ...};
the last is {"metric": "service_load_summary", "lost", "fused_twice", "p50_vs_peer_median", ...}.

    python benchmarks/service_load.py --ingest [--body-mb 500] [--repeats 3]

measures one large upload instead: a synthetic body of RoBERTa-base's layout (125M fp32
parameters, about 500 MB) against a base of the same layout, uploaded to `coldfusion serve`
(fusion off: what is timed is receiving and admission, up to the 201) and to the bare sink
in the same run, `--repeats` times each; the last line is {"metric": "service_ingest",
"body_mb", "ours_mb_s", "sink_mb_s", "ratio"} (the best of the repeats, each side).
"""

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from coldfusion.io.storage.objects import S3Objects
from coldfusion.io.storage.settings import StorageSettings, write_settings

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "service_load.jsonl"

SINK = '''
import sys, uuid
from pathlib import Path
from fastapi import FastAPI, Request
import uvicorn
app, where = FastAPI(), Path(sys.argv[2])
@app.post("/upload", status_code=201)
async def upload(request: Request):
    path = where / uuid.uuid4().hex
    with open(path, "wb") as f:
        async for chunk in request.stream():
            f.write(chunk)
    return {"id": path.name}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def provenance() -> dict:
    """What a row was measured with: the commit (and whether the tree differed from it), the
    versions, the machine. Bodies are fp32 and nothing is trained: no compute precision applies."""
    import platform

    import coldfusion

    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": bool(git("status", "--porcelain", "src")),
            "coldfusion": coldfusion.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "precision": "fp32 bodies",
            "load_average_1m": round(os.getloadavg()[0], 2)}


def emit(row: dict) -> None:
    row = {**row, **provenance()} if "metric" in row else row
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode})") from None
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def shared_storage(replicas: int):
    """A PostgreSQL and an S3 server for the run (None without replicas), stopped by PID after."""
    if not replicas:
        yield None
        return
    sys.path.insert(0, str(HERE.parent / "tests"))  # the servers the shared-storage tests start
    from servers import S3_KEYS, _stop, start_postgres, start_s3

    postgres, pg_proc, pg_home = start_postgres()
    try:
        s3, s3_proc, s3_home = start_s3()
        try:
            os.environ.update(S3_KEYS)
            S3Objects(s3_home / "cache", "coldfusion", "", s3.endpoint, "us-east-1").ensure_bucket()
            settings = StorageSettings(index=postgres.new_database("load"), objects="s3://coldfusion/load",
                                       s3_endpoint=s3.endpoint)
            yield {"settings": settings, "env": S3_KEYS}
        finally:
            _stop(s3_proc)
            shutil.rmtree(s3_home, ignore_errors=True)
    finally:
        _stop(pg_proc, signal.SIGINT)
        shutil.rmtree(pg_home, ignore_errors=True)


def tiny_repository(root: Path, repo_root: Path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from coldfusion.models.encoder import body_tensors
    from coldfusion.repository import Repository

    model_dir = root / "tiny-bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    model_dir.mkdir(parents=True)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    repo = Repository(repo_root)
    repo.add_version(body_tensors(BertModel.from_pretrained(model_dir)), model_source=str(model_dir))
    return repo


def roberta_base_body(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """RoBERTa-base's body layout (names and shapes, from its config), filled with seeded noise:
    the size of a real body without a download. `scale` < 1 shrinks the vocabulary and the
    layer count, to try the benchmark quickly."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=max(1000, int(50265 * scale)), num_hidden_layers=max(1, round(12 * scale)))
    with torch.device("meta"):
        layout = {k: (v.shape, v.dtype) for k, v in RobertaModel(config, add_pooling_layer=False).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: (0.02 * torch.randn(shape, generator=g)).to(dtype) if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}


def ingest(args) -> None:
    """One large upload, ours against the sink (see the module's docstring)."""
    from coldfusion.repository import Repository
    from coldfusion.service.tokens import ServiceStore

    env = {**os.environ}
    base = roberta_base_body(args.body_mb / 500)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        repo = Repository(root / "repo")
        repo.add_version(base, model_source="synthetic-roberta-base")
        token = ServiceStore(repo.root).issue("alice")
        payloads = []
        for r in range(args.repeats):  # distinct uploads: the same bytes twice would be a duplicate
            g = torch.Generator().manual_seed(r + 1)
            payloads.append(save_safetensors({k: v + 1e-3 * torch.randn(v.shape, generator=g)
                                              if v.is_floating_point() else v for k, v in base.items()}))
        del base
        mb = len(payloads[0]) / 1e6

        def timed(url: str, params: dict | None = None, headers: dict | None = None) -> list[float]:
            seconds = []
            with httpx.Client(timeout=600) as client:
                for data in payloads:
                    started = time.perf_counter()
                    r = client.post(url, content=data, params=params, headers=headers)
                    seconds.append(time.perf_counter() - started)
                    r.raise_for_status()
            return seconds

        port = free_port()
        (root / "sink").mkdir()
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(port), str(root / "sink")], env=env)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/docs", sink)
            sink_s = timed(f"http://127.0.0.1:{port}/upload")
        finally:
            stop(sink)
        shutil.rmtree(root / "sink")
        config = root / "service.yaml"
        config.write_text(yaml.safe_dump({"max_upload_mb": 4 * mb, "fusion": {"enabled": False}}))
        port = free_port()
        log = open(root / "serve.log", "w")
        serve = subprocess.Popen([sys.executable, "-m", "coldfusion", "serve", str(repo.root), "--port", str(port),
                                  "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/v1/versions", serve)
            ours_s = timed(f"http://127.0.0.1:{port}/v1/contributors/alice/contributions",
                           {"base": 1, "task": "t", "examples": 10}, {"Authorization": f"Bearer {token}"})
        finally:
            stop(serve)
            log.close()
        for side, seconds in (("sink", sink_s), ("ours", ours_s)):
            emit({"part": "ingest", "server": side, "body_mb": round(mb, 1), "seconds": [round(s, 3) for s in seconds]})
        ours, peer = mb / min(ours_s), mb / min(sink_s)
        emit({"metric": "service_ingest", "body_mb": round(mb, 1), "ours_mb_s": round(ours, 1),
              "sink_mb_s": round(peer, 1), "ratio": round(ours / peer, 3), "repeats": args.repeats})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(n_contributors: int, n_uploads: int, upload) -> tuple[list[float], list, int]:
    """Run `upload(contributor, k, client)` n_uploads times over n_contributors threads;
    (latencies of the acknowledged uploads, their replies, failures)."""
    latencies, replies, failures, lock = [], [], [0], threading.Lock()
    per = [n_uploads // n_contributors + (1 if i < n_uploads % n_contributors else 0) for i in range(n_contributors)]

    def contributor(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            for k in range(per[i]):
                try:
                    seconds, reply = upload(i, k, client)
                except httpx.HTTPError:
                    with lock:
                        failures[0] += 1
                    continue
                with lock:
                    latencies.append(seconds)
                    replies.append(reply)

    with ThreadPoolExecutor(n_contributors) as pool:
        list(pool.map(contributor, range(n_contributors)))
    return latencies, replies, failures[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contributors", type=int, default=50)
    p.add_argument("--uploads", type=int, default=500)
    p.add_argument("--when-waiting", type=int, default=10, help="the service fuses every this many contributions")
    p.add_argument("--replicas", type=int, default=0, help="0: one service over a local repository; N: N "
                                                            "replicas over PostgreSQL + S3")
    p.add_argument("--out", type=Path, default=None, help="JSON lines are appended here too (default: "
                                                        "results/service_load.jsonl)")
    p.add_argument("--ingest", action="store_true", help="measure one large upload against the sink instead")
    p.add_argument("--body-mb", type=float, default=500.0, help="--ingest: the body's size (500: RoBERTa-base)")
    p.add_argument("--repeats", type=int, default=3, help="--ingest: uploads each side; else: rounds of the load "
                                                          "(sink, then ours, each on a fresh repository)")
    args = p.parse_args()
    global OUT
    OUT = args.out or OUT
    if args.ingest:
        ingest(args)
        return
    rows = [load_round(args) for _ in range(args.repeats)]
    emit({"metric": "service_load_summary", "rounds": len(rows), "uploads_per_round": args.uploads,
          "contributors": args.contributors, "replicas": args.replicas or 1,
          "lost": sum(r["lost"] for r in rows), "fused_twice": sum(r["fused_twice"] for r in rows),
          "p50_vs_peer": [r["p50_vs_peer"] for r in rows],
          "p50_vs_peer_median": statistics.median(r["p50_vs_peer"] for r in rows),
          "p99_vs_peer_median": statistics.median(r["p99_vs_peer"] for r in rows)})


def load_round(args) -> dict:
    """One round: the sink, then our service, under the same load; the round's summary row."""
    from coldfusion.repository import Repository
    from coldfusion.service.tokens import ServiceStore

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch, shared_storage(args.replicas) as storage:
        root = Path(scratch)
        if storage:
            os.environ.update(storage["env"])
            env.update(storage["env"])
            roots = [root / f"replica-{r}" for r in range(args.replicas)]
            for replica in roots:
                write_settings(replica, storage["settings"])
            repo = tiny_repository(root, roots[0])
        else:
            repo = tiny_repository(root, root / "repo")
            roots = [repo.root]
        store = ServiceStore(repo.root)
        tokens = [store.issue(f"c{i:03d}") for i in range(args.contributors)]
        payload_bytes = len(save_safetensors(repo.load_version(1)))
        config = root / "service.yaml"
        config.write_text(yaml.safe_dump({"fusion": {"when_waiting": args.when_waiting, "after_seconds": 2,
                                                     "poll_seconds": 0.2}}))

        # the peer: a bare upload sink, same payloads and threads
        port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(port), str(root)], env=env)
        try:
            sink_url = f"http://127.0.0.1:{port}"
            wait_until_up(sink_url + "/docs", sink)
            body = save_safetensors(repo.load_version(1))

            def sink_upload(i, k, client):
                started = time.perf_counter()
                r = client.post(sink_url + "/upload", content=body)
                r.raise_for_status()
                return time.perf_counter() - started, r.json()

            started = time.perf_counter()
            sink_lat, _, sink_failed = load(args.contributors, args.uploads, sink_upload)
            emit({"part": "peer", "server": "bare FastAPI upload sink", "uploads": len(sink_lat),
                  "failed": sink_failed, "seconds": round(time.perf_counter() - started, 2),
                  "p50_upload_s": round(percentile(sink_lat, 0.5), 4),
                  "p99_upload_s": round(percentile(sink_lat, 0.99), 4)})
        finally:
            stop(sink)

        ports = [free_port() for _ in roots]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        log = open(root / "serve.log", "w")
        serves = [subprocess.Popen([sys.executable, "-m", "coldfusion", "serve", str(replica), "--port", str(port),
                                    "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
                  for replica, port in zip(roots, ports, strict=True)]
        try:
            for url, serve in zip(urls, serves, strict=True):
                wait_until_up(url + "/v1/versions", serve)

            def upload(i, k, client):
                url = urls[i % len(urls)]
                headers = {"Authorization": f"Bearer {tokens[i]}"}
                latest = client.get(url + "/v1/versions/latest").json()
                base = load_safetensors(client.get(url + f"/v1/versions/{latest['id']}/body").content)
                g = torch.Generator().manual_seed(i * 100_003 + k)
                sent = save_safetensors({n: t + 1e-3 * torch.randn(t.shape, generator=g) if t.is_floating_point()
                                         else t for n, t in base.items()})
                started = time.perf_counter()
                r = client.post(url + f"/v1/contributors/c{i:03d}/contributions", content=sent, headers=headers,
                                params={"base": latest["id"], "task": "t", "examples": 10})
                seconds = time.perf_counter() - started
                r.raise_for_status()
                return seconds, r.json()

            started = time.perf_counter()
            latencies, replies, failed = load(args.contributors, args.uploads, upload)
            wall = time.perf_counter() - started
            deadline = time.time() + 120  # the service fuses what still waits
            while Repository(repo.root).uploads_waiting() and time.time() < deadline:
                time.sleep(0.5)
        finally:
            for serve in serves:
                stop(serve)
            log.close()

        final = Repository(repo.root)
        stored = {c.id: c for c in final.contributions()}
        acknowledged = {r["id"] for r in replies}
        lost = len(acknowledged - stored.keys())
        seen: dict[int, int] = {}
        for v in final.versions():
            for cid in (v.fusion or {}).get("contributions", []):
                seen[cid] = seen.get(cid, 0) + 1
        fused_twice = sum(1 for n in seen.values() if n > 1)
        report = final.verify()
        versions = len(final.versions())
        emit({"part": "ours", "uploads": len(latencies), "failed": failed, "seconds": round(wall, 2),
              "versions": versions, "fused": len(seen), "still_waiting": len(final.uploads_waiting()),
              "refused": sum(1 for c in stored.values() if c.rejected), "verify_ok": report.ok,
              "payload_bytes": payload_bytes,
              "p50_vs_peer": round(percentile(latencies, 0.5) / percentile(sink_lat, 0.5), 2),
              "p99_vs_peer": round(percentile(latencies, 0.99) / percentile(sink_lat, 0.99), 2)})
        row = {"metric": "service_load", "replicas": args.replicas or 1,
              "storage": "postgresql+s3" if storage else "local",
              "contributors": args.contributors, "uploads": args.uploads,
              "acknowledged": len(acknowledged), "lost": lost, "fused_twice": fused_twice,
              "p50_upload_s": round(percentile(latencies, 0.5), 4),
              "p99_upload_s": round(percentile(latencies, 0.99), 4),
              "mean_upload_s": round(statistics.fmean(latencies), 4),
              "p50_vs_peer": round(percentile(latencies, 0.5) / percentile(sink_lat, 0.5), 2),
              "p99_vs_peer": round(percentile(latencies, 0.99) / percentile(sink_lat, 0.99), 2)}
        emit(row)
        return row


if __name__ == "__main__":
    main()
