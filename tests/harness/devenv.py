#!/usr/bin/env python3
"""Local stand-ins for the sidecar's two real peers: a Postgres server and moto.

One implementation serves `make test` (the Rust integration tests and the
Airflow tests spawn it), `make run` (the demo) and `make bench`:

    devenv.py up [--dir DIR]
        Start Postgres (initdb, SCRAM, TLS with a CA made for this run, a free
        loopback port) and moto_server (free loopback port). Print one JSON
        line describing them, then keep them running until standard input
        closes or a SIGTERM/SIGINT arrives; then stop both by PID and delete
        the directory. A test process that dies closes the pipe, so nothing
        outlives it.

    devenv.py demo --sidecar BIN
        `up`, plus a demo role in Postgres, a demo secret in moto, and the
        sidecar itself in the foreground, until Ctrl-C.

Nothing here talks to anything but 127.0.0.1.
"""

import argparse
import datetime
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))

# Names the server certificate covers. moto's RDS hostnames do not resolve;
# tests reach them through SIDECAR_RESOLVE while TLS still verifies the name.
SERVER_NAMES = [
    "localhost",
    "db.demo.internal",
    "*.aaaaaaaaaa.us-east-1.rds.amazonaws.com",
    "*.cluster-aaaaaaaaaa.us-east-1.rds.amazonaws.com",
    "*.cluster-ro-aaaaaaaaaa.us-east-1.rds.amazonaws.com",
]


def log(msg):
    print(f"devenv: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_free_port(launch, wait, what, attempts=5):
    """Start a server on a port picked free; if it exits before it is up,
    start it again on another. Between picking a port and binding it, another
    process's outgoing connection can take the port ("Address already in
    use": seen once in the Rust suite, whose support code retries the same
    way). launch(port) -> process; wait(port, process) raises if it is not up.
    Returns (port, process)."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        proc = launch(port)
        try:
            wait(port, proc)
            return port, proc
        except RuntimeError as e:
            if proc.poll() is None or attempt == attempts:
                raise
            log(f"{what} exited before it was up on port {port} ({e}); starting it on another port")
    raise AssertionError("unreachable")


def wait_for_port(port, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def find_pg_bin():
    """Directory holding initdb and postgres: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    base = "/usr/lib/postgresql"
    if os.path.isdir(base):
        for version in sorted(os.listdir(base), key=lambda v: int(v) if v.isdigit() else 0, reverse=True):
            candidate = os.path.join(base, version, "bin")
            if os.path.exists(os.path.join(candidate, "initdb")):
                return candidate
    raise RuntimeError("initdb not found: install Postgres (apt-get install postgresql) or put its bin/ on PATH")


def make_ca(common_name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, names=None):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if names is None:
        sans = [x509.DNSName(n) for n in SERVER_NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    else:
        sans = [x509.DNSName(n) for n in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(path, cert=None, key=None, mode=0o644):
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        data = cert.public_bytes(serialization.Encoding.PEM)
    else:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Env:
    """The running Postgres and moto of one `up`."""

    def __init__(self, base_dir=None):
        self.owned_dir = base_dir is None
        self.dir = base_dir or tempfile.mkdtemp(prefix="sidecar-devenv-")
        os.makedirs(self.dir, exist_ok=True)
        self.procs = []
        # initdb refuses to run as root: run Postgres as the `postgres` user then.
        self.pg_user = None
        if os.geteuid() == 0:
            self.pg_user = "postgres"
            pw = pwd.getpwnam("postgres")
            self.pg_uid, self.pg_gid = pw.pw_uid, pw.pw_gid
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, self.pg_uid, self.pg_gid)

    def _own(self, path):
        if self.pg_user:
            os.chown(path, self.pg_uid, self.pg_gid)

    def start_postgres(self):
        pg_bin = find_pg_bin()
        tls = os.path.join(self.dir, "tls")
        os.makedirs(tls, exist_ok=True)
        ca_key, ca_cert = make_ca("airflow-secrets-sidecar test CA")
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert)
        _, other_ca = make_ca("unrelated CA")
        self.ca_file = os.path.join(tls, "ca.pem")
        self.other_ca_file = os.path.join(tls, "other-ca.pem")
        cert_file = os.path.join(tls, "server.pem")
        key_file = os.path.join(tls, "server.key")
        write_pem(self.ca_file, cert=ca_cert)
        write_pem(self.other_ca_file, cert=other_ca)
        write_pem(cert_file, cert=srv_cert)
        write_pem(key_file, key=srv_key, mode=0o600)
        self._own(key_file)
        # For the tests' fake servers (a man in the middle): a certificate from
        # the test CA for another name, and a self-signed one for localhost.
        fake = os.path.join(self.dir, "fake-tls")
        os.makedirs(fake, exist_ok=True)
        wrong_key, wrong_cert = make_server_cert(ca_key, ca_cert, names=["evil.example.net"])
        self_key, self_cert = make_ca("localhost")
        self.fake_certs = {}
        for name, key, cert in [("wrong_name", wrong_key, wrong_cert), ("self_signed", self_key, self_cert)]:
            cert_path, key_path = os.path.join(fake, f"{name}.pem"), os.path.join(fake, f"{name}.key")
            write_pem(cert_path, cert=cert)
            write_pem(key_path, key=key, mode=0o600)
            self.fake_certs[f"{name}_cert"] = cert_path
            self.fake_certs[f"{name}_key"] = key_path

        data = os.path.join(self.dir, "pgdata")
        sock = os.path.join(self.dir, "sock")
        os.makedirs(sock, exist_ok=True)
        self._own(sock)
        self.pg_password = secrets.token_urlsafe(18)
        pwfile = os.path.join(self.dir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.pg_password + "\n")
        self._own(pwfile)
        done = subprocess.run(
            [os.path.join(pg_bin, "initdb"), "-D", data, "-U", "postgres", "--pwfile", pwfile,
             "--auth=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            user=self.pg_user, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace').strip()}")
        os.unlink(pwfile)
        # TLS is offered, not forced, so that tests can check sslmode=disable too.
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n")
            # Members of pw_auth log in with a cleartext password, over TLS only.
            f.write("hostssl all +pw_auth 127.0.0.1/32 password\n")
            f.write("host all all 127.0.0.1/32 scram-sha-256\n")
        self.pg_log = os.path.join(self.dir, "postgres.log")
        logf = open(self.pg_log, "ab")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": sock,
            "ssl": "on",
            "ssl_cert_file": cert_file,
            "ssl_key_file": key_file,
            "ssl_ca_file": self.ca_file,
            "password_encryption": "scram-sha-256",
            "log_connections": "on",
            "max_connections": "400",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        def launch(port):
            args = [os.path.join(pg_bin, "postgres"), "-D", data, "-c", f"port={port}"]
            for k, v in settings.items():
                args += ["-c", f"{k}={v}"]
            proc = subprocess.Popen(args, user=self.pg_user, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
            self.procs.append(("postgres", proc, signal.SIGINT))  # SIGINT = fast shutdown
            return proc

        def wait(port, proc):
            wait_for_port(port, proc, "postgres")
            # The port opens a moment before startup finishes: wait for the log line.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with open(self.pg_log, "rb") as f:
                    if b"ready to accept connections" in f.read():
                        return
                if proc.poll() is not None:
                    raise RuntimeError(f"postgres exited early with status {proc.returncode}")
                time.sleep(0.05)

        self.pg_port, proc = on_free_port(launch, wait, "postgres")
        self.pg_pid = proc.pid
        psql_admin(self, "CREATE ROLE pw_auth NOLOGIN;")

    def start_moto(self, record=False):
        moto = os.environ.get("MOTO_SERVER") or shutil.which(
            "moto_server", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        )
        if not moto:
            raise RuntimeError("moto_server not found: run `make venv` (pip install 'moto[server]')")
        logf = open(os.path.join(self.dir, "moto.log"), "ab")
        moto_env = dict(os.environ, MOTO_RECORDER_FILEPATH=os.path.join(self.dir, "moto_recording"))

        def launch(port):
            proc = subprocess.Popen(
                [moto, "-H", "127.0.0.1", "-p", str(port)],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, env=moto_env,
            )
            self.procs.append(("moto_server", proc, signal.SIGTERM))
            return proc

        self.moto_port, proc = on_free_port(launch, lambda port, p: wait_for_port(port, p, "moto_server"), "moto_server")
        self.moto_pid = proc.pid
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        if record:
            # Every AWS call is recorded, so tests can count them per secret.
            urllib.request.urlopen(
                urllib.request.Request(f"{self.moto_url}/moto-api/recorder/start-recording", method="POST"),
                timeout=10,
            ).read()

    def describe(self):
        return {
            "dir": self.dir,
            "pg_host": "127.0.0.1",
            "pg_port": self.pg_port,
            "pg_superuser": "postgres",
            "pg_password": self.pg_password,
            "pg_log": self.pg_log,
            "pg_pid": self.pg_pid,
            "ca_file": self.ca_file,
            "other_ca_file": self.other_ca_file,
            **self.fake_certs,
            "server_names": SERVER_NAMES,
            "moto_url": self.moto_url,
            "moto_pid": self.moto_pid,
        }

    def stop(self):
        for what, proc, sig in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log(f"{what} (pid {proc.pid}) did not stop; killing it")
                    proc.kill()
                    proc.wait()
        self.procs = []
        if self.owned_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def psql_admin(env, sql):
    """Run SQL as the superuser over the private Unix socket (psql is not needed)."""
    pg_bin = find_pg_bin()
    psql = shutil.which("psql") or os.path.join(pg_bin, "psql")
    subprocess.run(
        [psql, "-q", "-v", "ON_ERROR_STOP=1", "-h", os.path.join(env.dir, "sock"), "-p", str(env.pg_port),
         "-U", "postgres", "-d", "postgres"],
        input=sql.encode(), check=True, user=env.pg_user,  # SQL on stdin: never in an error's argv
    )


def seed_demo(env):
    import boto3

    password = secrets.token_urlsafe(18)
    psql_admin(env, f"CREATE ROLE demo_user LOGIN PASSWORD '{password}';")
    psql_admin(env, "CREATE DATABASE demo OWNER demo_user;")
    sm = boto3.client(
        "secretsmanager", endpoint_url=env.moto_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    sm.create_secret(
        Name="airflow/connections/demo_postgres",
        SecretString=json.dumps({
            "conn_type": "postgres", "host": "localhost", "port": env.pg_port,
            "login": "demo_user", "password": password, "schema": "demo",
        }),
    )


def cmd_up(args):
    env = Env(args.dir)
    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        env.start_postgres()
        env.start_moto(record=args.record)
        print(json.dumps(env.describe()), flush=True)
        # Wait for EOF on stdin (the parent went away) or a signal.
        import select

        while not stopping["flag"]:
            ready, _, _ = select.select([sys.stdin], [], [], 0.5)
            if ready and not sys.stdin.buffer.read1(4096):
                break
    finally:
        env.stop()


def cmd_demo(args):
    env = Env(None)
    sidecar = None
    try:
        env.start_postgres()
        env.start_moto()
        seed_demo(env)
        token_file = os.path.join(env.dir, "token")
        with open(token_file, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        listen_port = args.port or 9797
        child_env = dict(os.environ)
        child_env.update({
            "AWS_ENDPOINT_URL": env.moto_url,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "SIDECAR_LISTEN": f"127.0.0.1:{listen_port}",
            "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{args.admin_port or 9798}",
            "SIDECAR_TOKEN_FILE": token_file,
            "SIDECAR_SSLROOTCERT": env.ca_file,
            "SIDECAR_LOG_FORMAT": "text",
        })
        sidecar = subprocess.Popen([args.sidecar, "serve"], env=child_env)
        wait_for_port(listen_port, sidecar, "the sidecar")
        url = f"http://127.0.0.1:{listen_port}/connections/demo_postgres"
        curl = f"curl -s -H \"X-Sidecar-Token: $(cat {token_file})\" {url}"
        req = urllib.request.Request(url, headers={"X-Sidecar-Token": open(token_file).read().strip()})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read().decode()
            stage = resp.headers.get("X-Sidecar-Stage")
        print("\nThe sidecar is serving a connection it has just logged in with:\n", flush=True)
        print(f"  $ {curl}", flush=True)
        print(f"  {body}   (X-Sidecar-Stage: {stage})\n", flush=True)
        print("Postgres, moto and the sidecar run until Ctrl-C.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        sidecar.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if sidecar is not None and sidecar.poll() is None:
            sidecar.terminate()
            sidecar.wait(timeout=15)
        env.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--dir")
    up.add_argument("--record", action="store_true", help="record moto's calls (tests count them)")
    demo = sub.add_parser("demo")
    demo.add_argument("--sidecar", required=True)
    demo.add_argument("--port", type=int)
    demo.add_argument("--admin-port", type=int)
    args = parser.parse_args()
    try:
        {"up": cmd_up, "demo": cmd_demo}[args.cmd](args)
    except Exception as e:  # a clear one-line reason, not a traceback, for a newcomer
        log(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
