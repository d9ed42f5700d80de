#!/usr/bin/env python3
"""Start-up prefetch: time-to-first-warm-answer, prefetch on vs off.

A freshly started pod (a KubernetesExecutor task, a rollout) asks for its
connections right after the sidecar is ready. This starts the sidecar with N
configured `[connections.*]` entries (each its own secret, all logging in as
one role) against a real Postgres and moto, and measures per run:

- ready_ms: process start to `/readyz` 200 (prefetch must not delay it);
- warm_ms: process start to every connection cached (prefetch on: the
  "prefetch finished" log line; prefetch_ms is its own elapsed time);
- the first lookup of each connection after that: how many were answered
  from the cache (no `Server-Timing` header: only a lookup that computed its
  answer carries one), their latency, and process start to the last answer
  (all_answered_ms: the time-to-first-warm-answer of all N);
- the AWS calls (moto's recorder, by API) and Postgres logins of the run.

Runs: `off` (prefetch_entries = false), `on` (the default), `on_batch`
(prefetch_batch: 20 values per BatchGetSecretValue), and `on_task_at_ready`
(prefetch on, but the lookups start the moment /readyz answers, racing the
prefetch: what a pod whose task starts at once sees).

`measure(sidecar_bin)` returns a dict and prints a table; bench.py may call
it (optionally with its own running `devenv.Env` as `env=`). Standalone:

    .venv/bin/python tests/bench/prefetch.py --sidecar target/release/airflow-secrets-sidecar

Everything listens on 127.0.0.1 and is stopped by PID.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "harness"))
import devenv  # noqa: E402

N = int(os.environ.get("PREFETCH_BENCH_CONNECTIONS", "20"))


def log(msg):
    print(f"prefetch-bench: {msg}", file=sys.stderr, flush=True)


free_port = devenv.free_port


def http_get(url, token=None, timeout=30):
    req = urllib.request.Request(url, headers={"X-Sidecar-Token": token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def post(url):
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10).read()


class PrefetchBench:
    def __init__(self, sidecar_bin, env=None, n=N):
        self.sidecar_bin = sidecar_bin
        self.own_env = env is None
        self.env = env
        self.n = n
        self.procs = []

    def setup(self):
        if self.own_env:
            self.env = devenv.Env(None)
            self.env.start_postgres()
            self.env.start_moto()
        suffix = secrets.token_hex(4)
        self.role = f"pf_{suffix}"
        self.password = secrets.token_urlsafe(18)
        devenv.psql_admin(self.env, f"CREATE ROLE {self.role} LOGIN PASSWORD '{self.password}';")
        devenv.psql_admin(self.env, f"CREATE DATABASE {self.role} OWNER {self.role};")
        import boto3
        sm = boto3.client("secretsmanager", endpoint_url=self.env.moto_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        self.prefix = f"bench-prefetch/{suffix}"
        self.ids = [f"pf_{i:02d}" for i in range(self.n)]
        value = json.dumps({"conn_type": "postgres", "host": "localhost", "port": self.env.pg_port,
                            "login": self.role, "password": self.password, "schema": self.role})
        for conn_id in self.ids:
            sm.create_secret(Name=f"{self.prefix}/{conn_id}", SecretString=value)
        self.config = os.path.join(self.env.dir, f"prefetch-{suffix}.toml")
        with open(self.config, "w") as f:
            f.write("".join(f"[connections.{conn_id}]\n" for conn_id in self.ids))
        self.token = secrets.token_hex(16)
        self.token_file = os.path.join(self.env.dir, f"prefetch-token-{suffix}")
        with open(self.token_file, "w") as f:
            f.write(self.token)

    def logins(self):
        with open(self.env.pg_log, errors="replace") as f:
            return f.read().count(f"connection authorized: user={self.role} ")

    def recorded(self):
        """AWS calls recorded by moto since the last reset, by API."""
        text = urllib.request.urlopen(f"{self.env.moto_url}/moto-api/recorder/download-recording",
                                      timeout=30).read().decode()
        out = {}
        for line in text.splitlines():
            try:
                call = json.loads(line)
            except ValueError:
                continue
            api = call.get("headers", {}).get("X-Amz-Target", "").split(".")[-1] or "other"
            out[api] = out.get(api, 0) + 1
        return out

    def run_one(self, name, extra_env, wait_for_prefetch):
        recorder = f"{self.env.moto_url}/moto-api/recorder"
        post(f"{recorder}/reset-recording")
        post(f"{recorder}/start-recording")
        logins_before = self.logins()
        port, admin = free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "AWS_ENDPOINT_URL": self.env.moto_url, "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
            "SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "SIDECAR_TOKEN_FILE": self.token_file, "SIDECAR_SSLROOTCERT": self.env.ca_file,
            "SIDECAR_CONFIG": self.config, "SIDECAR_CONNECTIONS_PREFIX": self.prefix,
            "SIDECAR_LOG": "info", "SIDECAR_LOG_FORMAT": "json",
        })
        env.update(extra_env)
        log_path = os.path.join(self.env.dir, f"prefetch-{name}-{port}.log")
        logf = open(log_path, "w")
        started = time.monotonic()
        proc = subprocess.Popen([self.sidecar_bin, "serve"], env=env, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        try:
            result = {"mode": name}
            deadline = started + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited with {proc.returncode}; see {log_path}")
                try:
                    if http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sidecar not ready; see {log_path}")
                time.sleep(0.002)
            result["ready_ms"] = (time.monotonic() - started) * 1000
            if wait_for_prefetch:
                while True:
                    line = finished(log_path)
                    if line:
                        result["warm_ms"] = (time.monotonic() - started) * 1000
                        result["prefetch_ms"] = line.get("elapsed_ms")
                        result["prefetch_ok"] = line.get("ok")
                        result["prefetch_failed"] = line.get("failed")
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"prefetch did not finish; see {log_path}")
                    time.sleep(0.002)
            latencies, hits = [], 0
            for conn_id in self.ids:
                t = time.monotonic()
                status, headers, body = http_get(f"http://127.0.0.1:{port}/connections/{conn_id}", self.token)
                latencies.append((time.monotonic() - t) * 1000)
                if status != 200:
                    raise RuntimeError(f"{conn_id}: {status} {body[:200]!r}")
                hits += "server-timing" not in headers
            result["all_answered_ms"] = (time.monotonic() - started) * 1000
            result["first_lookups"] = len(latencies)
            result["cache_hits"] = hits
            result["first_lookup_p50_ms"] = statistics.median(latencies)
            result["first_lookup_max_ms"] = max(latencies)
            result["first_lookup_sum_ms"] = sum(latencies)
            # Let any prefetch still running finish before counting.
            if not wait_for_prefetch and extra_env.get("SIDECAR_PREFETCH_ENTRIES") != "false":
                end = time.monotonic() + 30
                while not finished(log_path) and time.monotonic() < end:
                    time.sleep(0.01)
            post(f"{recorder}/stop-recording")
            result["aws_calls"] = self.recorded()
            result["logins"] = self.logins() - logins_before
            with open(log_path) as f:
                text = f.read()
            if self.password in text:
                raise RuntimeError(f"the test password leaked into {log_path}")
            return result
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    def run(self):
        runs = [
            ("off", {"SIDECAR_PREFETCH_ENTRIES": "false"}, False),
            ("on", {}, True),
            ("on_batch", {"SIDECAR_PREFETCH_BATCH": "true"}, True),
            ("on_task_at_ready", {}, False),
        ]
        out = {"connections": self.n, "runs": {}}
        for name, extra, wait in runs:
            r = self.run_one(name, extra, wait)
            out["runs"][name] = r
            log(f"{name}: {json.dumps(r)}")
        return out

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        if self.own_env and self.env is not None:
            self.env.stop()


def finished(log_path):
    """The "prefetch finished" log line, if written."""
    with open(log_path, errors="replace") as f:
        for line in f:
            if "prefetch finished" in line:
                try:
                    return json.loads(line)
                except ValueError:
                    return {}
    return None


def rows(result):
    """(measurement, result) rows for a table such as BENCHMARKS.md."""
    n = result["connections"]
    out = []
    for name, r in result["runs"].items():
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["aws_calls"].items()))
        warm = f"; all cached {r['warm_ms']:.0f} ms after start (prefetch {r['prefetch_ms']} ms)" if "warm_ms" in r else ""
        out.append((
            f"start-up with {n} configured connections, prefetch {name.replace('_', ' ')}",
            f"ready {r['ready_ms']:.0f} ms{warm}; first lookup of each: {r['cache_hits']}/{n} from cache, "
            f"p50 {r['first_lookup_p50_ms']:.2f} ms, max {r['first_lookup_max_ms']:.2f} ms; "
            f"all {n} answered {r['all_answered_ms']:.0f} ms after start; AWS calls: {calls}; "
            f"Postgres logins {r['logins']}",
        ))
    return out


def measure(sidecar_bin, env=None, n=N):
    """Run every mode; returns {"connections": n, "runs": {mode: figures}}."""
    bench = PrefetchBench(sidecar_bin, env=env, n=n)
    try:
        bench.setup()
        result = bench.run()
    finally:
        bench.stop()
    print("| measurement | result |\n|---|---|")
    for what, measured in rows(result):
        print(f"| {what} | {measured} |")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecar", default=os.path.join(ROOT, "target", "release", "airflow-secrets-sidecar"))
    parser.add_argument("--connections", type=int, default=N)
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args()
    result = measure(args.sidecar, n=args.connections)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
