"""Run the pods that deploy/ describes the way a kubelet would, and drive a real Airflow task in them.

No cluster and no container engine: each container is a process in its own mount namespace
(bubblewrap) that sees only its image's files and its declared volumes at their mountPaths,
runs with its env, args, runAsUser/runAsGroup/fsGroup and a read-only root filesystem when
declared. The containers of a pod share one network namespace (this whole script runs in a
private one made by run.sh) with a pod IPv4 and IPv6 address on a dummy interface, where the
emulated kubelet sends its probes. Native sidecars (initContainers with restartPolicy Always)
start first and their startupProbe gates the next containers, as on Kubernetes >= 1.29.

What the cluster would add is emulated from its documented behaviour, never from our manifests:
  - the EKS pod identity webhook injects AWS credentials into every container whose service
    account has a role, except those the pod annotation eks.amazonaws.com/skip-containers names;
  - ConfigMap volumes hold the objects the README tells the operator to create (rds-ca-bundle
    with the CA of the test Postgres);
  - emptyDir volumes are group-owned by fsGroup with the setgid bit.

The pods: every Deployment and KubernetesExecutor pod template that `kubectl kustomize` renders
from each deploy/k8s directory given, and every Airflow component pod that the official chart
builds from each deploy/helm values file (initContainers from extraInitContainers, the Airflow
container with env and extraVolumeMounts, volumes from extraVolumes, podAnnotations, the chart's
default securityContexts). In each pod that carries the sidecar, the Airflow container's command
is replaced (as the KubernetesExecutor does) by `airflow tasks test` of a DAG whose task logs in
to the real Postgres (TLS, verify-full) with PostgresHook through the sidecar, and reports which
AWS settings DAG code can see.

Usage: podrun.py --devenv JSON --workdir DIR --k8s DIR... --helm FILE... (run.sh sets it up).
Exit 0 when every pod passed; the report on stdout says what failed and why.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
POD_IPV4 = "10.244.0.10"
POD_IPV6 = "fd00:10:244::10"
NAMESPACE = "airflow"
SIDECAR_NAME = "airflow-secrets-sidecar"
CONN_ID = "app_db"

# The task every emulated Airflow container runs (a real DAG, `airflow tasks test`).
DAG = '''
import json, os
import pendulum
try:
    from airflow.sdk import dag, task
except ImportError:
    from airflow.decorators import dag, task

@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def sidecar_pod_e2e():
    @task
    def query():
        # What DAG code could use to call AWS itself, bypassing the sidecar.
        aws = sorted(k for k in os.environ if k.startswith("AWS_") and k not in ("AWS_REGION", "AWS_DEFAULT_REGION"))
        print("E2E_AWS_ENV " + json.dumps(aws), flush=True)
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        row = PostgresHook(postgres_conn_id="%s").get_first(
            "select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())")
        print("E2E_ROW " + json.dumps(list(row)), flush=True)
    query()

sidecar_pod_e2e()
''' % CONN_ID


# The Airflow 3 layout: task processes in a pod without the sidecar, asking the api-server.
LAYOUT_DAG = '''
import json, os
import pendulum
from airflow.sdk import dag, task

@dag(dag_id="sidecar_layout_e2e", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False,
     max_active_tasks=4)
def sidecar_layout_e2e():
    @task
    def how_many(**context):
        return list(range(int(context["dag_run"].conf.get("tasks", 1))))

    @task
    def query(i):
        aws = sorted(k for k in os.environ if k.startswith("AWS_") and k not in ("AWS_REGION", "AWS_DEFAULT_REGION"))
        if aws:
            raise RuntimeError(f"the task pod exposes AWS settings {aws}")
        if os.path.exists("/var/run/airflow-secrets-sidecar"):
            raise RuntimeError("the task pod has the sidecar's token volume")
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        row = PostgresHook(postgres_conn_id="%s").get_first(
            "select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())")
        if list(row) != ["app_user", True]:
            raise RuntimeError(f"logged in as {row}")
        print("E2E_LAYOUT_OK", i, flush=True)

    query.expand(i=how_many())

sidecar_layout_e2e()
''' % CONN_ID


def log(msg):
    print(f"pod-e2e: {msg}", file=sys.stderr, flush=True)


# --- what the pods are made of ------------------------------------------------------------


class Images:
    """The two images, as files: the sidecar image (deploy/Dockerfile's runtime stage on
    distroless/cc: glibc and CA certificates plus the binary) and the Airflow image (an OS
    with Python, Airflow and the backend installed: a venv under build/, at its own path)."""

    def __init__(self, sidecar_bin, airflow_venvs, airflow_home_template):
        self.sidecar_bin = sidecar_bin
        self.airflow_venvs = airflow_venvs  # major version -> venv dir
        self.airflow_home_template = airflow_home_template
        self.sidecar_env, self.sidecar_user = dockerfile_runtime()

    def kind(self, image):
        name = image.rsplit("/", 1)[-1]
        if name.startswith("airflow-secrets-sidecar"):
            return "sidecar"
        if name.startswith("airflow"):
            return "airflow"
        raise SystemExit(f"pod-e2e: no emulation for image {image}")

    def airflow_venv(self, image):
        tag = image.rsplit(":", 1)[-1]
        major = "2" if tag.startswith("2.") else "3"
        return self.airflow_venvs[major]


def dockerfile_runtime():
    """ENV and USER of deploy/Dockerfile's last stage (the sidecar image)."""
    env, user = {}, None
    lines = open(os.path.join(REPO, "deploy", "Dockerfile")).read().replace("\\\n", " ").splitlines()
    stage = []
    for line in lines:
        if line.startswith("FROM "):
            stage = []
        stage.append(line)
    for line in stage:
        if line.startswith("ENV "):
            for pair in line[4:].split():
                k, _, v = pair.partition("=")
                env[k] = v
        elif line.startswith("USER "):
            user = line[5:].strip()
    uid, _, gid = user.partition(":")
    return env, (int(uid), int(gid or uid))


def render_kustomize(directory):
    out = subprocess.run(["kubectl", "kustomize", directory], check=True, stdout=subprocess.PIPE, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def sidecar_in(spec):
    return next((c for c in spec.get("initContainers") or [] if c.get("name") == SIDECAR_NAME), None)


def pods_from_kustomize(directory):
    docs = render_kustomize(directory)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    pods = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pods.append((f"{directory}: {d['kind']}/{d['metadata']['name']}", d["spec"]["template"]))
        elif d["kind"] == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                doc = yaml.safe_load(text) if key.endswith((".yaml", ".yml")) else None
                if isinstance(doc, dict) and doc.get("kind") == "Pod":
                    pods.append((f"{directory}: pod template {d['metadata']['name']}/{key}", doc))
    result = []
    for name, pod in pods:
        sa = accounts.get(pod["spec"].get("serviceAccountName", "default"), {})
        has_role = "eks.amazonaws.com/role-arn" in ((sa.get("metadata") or {}).get("annotations") or {})
        # Pod Identity: the association is made outside Kubernetes; the component says which
        # service accounts get one (see components/pod-identity).
        result.append({"name": name, "pod": pod, "aws_role": has_role or "pod-identity" in directory})
    return result


HELM_COMPONENTS = {
    # values key: (name of the Airflow container the chart renders, Airflow 2 only?)
    "scheduler": "scheduler",
    "triggerer": "triggerer",
    "dagProcessor": "dag-processor",
    "apiServer": "api-server",
    "webserver": "webserver",
    "workers.celery": "worker",
    "workers.kubernetes": "base",
}


def helm_get(values, path):
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def pods_from_helm(values_file):
    """The pod each chart component renders from these values, reduced to what the sidecar
    touches. Chart >= 1.21: workers.kubernetes.X / workers.celery.X win over workers.X."""
    values = yaml.safe_load(open(values_file))
    uid, gid = values.get("uid", 50000), values.get("gid", 0)
    image = f"{values.get('defaultAirflowRepository', 'apache/airflow')}:{values.get('defaultAirflowTag', '3')}"
    pods = []
    for key, container_name in HELM_COMPONENTS.items():
        comp = helm_get(values, key)
        if key.startswith("workers."):
            legacy = values.get("workers") or {}
            comp = dict(legacy, **(comp or {})) if (comp or legacy) else None
            comp = {k: v for k, v in comp.items() if k not in ("celery", "kubernetes")} if comp else None
        if not comp:
            continue
        annotations = dict(values.get("airflowPodAnnotations") or {}, **(comp.get("podAnnotations") or {}))
        sa_annotations = (comp.get("serviceAccount") or {}).get("annotations") or {}
        pod = {
            "metadata": {"annotations": annotations},
            "spec": {
                "securityContext": {"runAsUser": uid, "fsGroup": gid},
                "initContainers": comp.get("extraInitContainers") or [],
                "containers": [
                    {
                        "name": container_name,
                        "image": image,
                        "env": comp.get("env") or [],
                        "volumeMounts": comp.get("extraVolumeMounts") or [],
                        "securityContext": {"runAsUser": uid, "runAsGroup": gid},
                    }
                ]
                + (comp.get("extraContainers") or []),
                "volumes": comp.get("extraVolumes") or [],
            },
        }
        pods.append(
            {
                "name": f"{os.path.relpath(values_file, REPO)}: {key}",
                "pod": pod,
                "aws_role": "eks.amazonaws.com/role-arn" in sa_annotations,
            }
        )
    return pods


# --- the emulated kubelet -----------------------------------------------------------------


class PodRun:
    def __init__(self, entry, images, devenv, workdir):
        self.name = entry["name"]
        self.pod = entry["pod"]
        self.aws_role = entry["aws_role"]
        self.images = images
        self.devenv = devenv
        self.dir = workdir
        self.procs = []
        self.failures = []
        self.notes = []
        # The parts of the Airflow configuration these manifests leave to the operator
        # ("plus the rest of your Airflow configuration"), and cluster DNS for Services.
        self.airflow_env = {}
        self.metastore = "sqlite:////opt/airflow/airflow.db"
        self.hosts = {}
        self.sidecar_env = {}  # test-only overrides (a shorter clock), noted in the report
        spec = self.pod["spec"]
        self.pod_sc = spec.get("securityContext") or {}
        annotations = (self.pod.get("metadata") or {}).get("annotations") or {}
        self.skip_aws = {
            n.strip() for n in annotations.get("eks.amazonaws.com/skip-containers", "").split(",") if n.strip()
        }

    # volumes ---------------------------------------------------------------------------

    def make_volumes(self):
        self.volumes = {}
        fs_group = self.pod_sc.get("fsGroup")
        for v in self.pod["spec"].get("volumes") or []:
            path = os.path.join(self.dir, "volumes", v["name"])
            os.makedirs(path)
            if "emptyDir" in v:
                # kubelet: 0777, and with fsGroup the group plus setgid so files inherit it.
                if fs_group is not None:
                    os.chown(path, 0, fs_group)
                    os.chmod(path, 0o2777)
                else:
                    os.chmod(path, 0o777)
                self.volumes[v["name"]] = (path, False)
            elif "configMap" in v:
                data = self.configmap(v["configMap"]["name"])
                mode = v["configMap"].get("defaultMode", 0o644)
                for key, text in data.items():
                    f = os.path.join(path, key)
                    with open(f, "w") as out:
                        out.write(text)
                    os.chmod(f, mode)
                    if fs_group is not None:
                        os.chown(f, 0, fs_group)
                os.chmod(path, 0o755)
                self.volumes[v["name"]] = (path, True)  # ConfigMap volumes are read-only
            else:
                self.failures.append(f"volume {v['name']}: no emulation for {sorted(v)}")

    def configmap(self, name):
        if name == "rds-ca-bundle":  # what the README tells the operator to create
            return {"global-bundle.pem": open(self.devenv["ca_file"]).read()}
        if name.startswith("airflow-pod-template"):
            return {"pod_template_file.yaml": "# rendered by kustomize\n"}
        self.notes.append(f"ConfigMap {name} is not emulated: mounted empty")
        return {}

    # containers ------------------------------------------------------------------------

    def env_of(self, c, kind, venv=None):
        env = {}
        if kind == "sidecar":
            env.update(self.images.sidecar_env)
            env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        else:
            env.update({"AIRFLOW_HOME": "/opt/airflow", "HOME": "/home/airflow", "PATH": f"{venv}/bin:/usr/bin:/bin"})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif "valueFrom" in e:
                ref = e["valueFrom"]
                if "fieldRef" in ref and ref["fieldRef"]["fieldPath"] == "metadata.namespace":
                    env[e["name"]] = NAMESPACE
                elif "secretKeyRef" in ref and ref["secretKeyRef"]["name"] == "airflow-metadata":
                    env[e["name"]] = self.metastore
                else:
                    self.notes.append(f"{c['name']}: env {e['name']} from {ref} not emulated")
        if kind == "airflow":
            env.update(self.airflow_env)
        else:
            env.update(self.sidecar_env)
        # The EKS pod identity webhook: credentials into every container not skipped (static
        # ones for moto, which stands in for AWS; the endpoint goes with them).
        if self.aws_role and c["name"] not in self.skip_aws:
            env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_ENDPOINT_URL": self.devenv["moto_url"]})
            env.setdefault("AWS_REGION", "us-east-1")
        return env

    def user_of(self, c, kind):
        sc = c.get("securityContext") or {}
        default_uid, default_gid = self.images.sidecar_user if kind == "sidecar" else (50000, 0)
        uid = sc.get("runAsUser", self.pod_sc.get("runAsUser", default_uid))
        gid = sc.get("runAsGroup", self.pod_sc.get("runAsGroup", default_gid if "runAsUser" not in sc else 0))
        groups = []
        if self.pod_sc.get("fsGroup") is not None:
            groups.append(self.pod_sc["fsGroup"])
        groups += self.pod_sc.get("supplementalGroups") or []
        if (sc.get("runAsNonRoot") or self.pod_sc.get("runAsNonRoot")) and uid == 0:
            self.failures.append(f"{c['name']}: runAsNonRoot with uid 0: the kubelet refuses to start it")
        return uid, gid, groups, bool(sc.get("readOnlyRootFilesystem"))

    def bwrap(self, c, kind, command):
        venv = self.images.airflow_venv(c["image"]) if kind == "airflow" else None
        uid, gid, groups, ro_root = self.user_of(c, kind)
        binds = []  # (source, destination, read-only); the root itself is an empty tmpfs
        runtime = "/.runtime/setpriv"  # the container runtime's uid switch (runc does this)
        binds.append((shutil.which("setpriv"), runtime, True))
        # The image's files.
        etc = ["ssl", "hosts", "passwd", "group", "nsswitch.conf", "localtime", "ld.so.cache"]
        if kind == "sidecar":
            # distroless/cc: glibc and CA certificates, then the binary.
            for d in ("/lib", "/lib64", "/usr/lib"):
                if os.path.exists(d):
                    binds.append((d, d, True))
            binds.append((self.images.sidecar_bin, "/usr/local/bin/airflow-secrets-sidecar", True))
        else:
            for d in ("/usr", "/bin", "/lib", "/lib64"):
                if os.path.exists(d):
                    binds.append((d, d, True))
            etc += ["alternatives", "os-release", "mime.types", "timezone"]
            binds.append((venv, venv, True))
            # The Python the venv was made from (the image's interpreter).
            cfg = dict(line.split(" = ", 1) for line in open(os.path.join(venv, "pyvenv.cfg")).read().splitlines()
                       if " = " in line)
            prefix = os.path.dirname(cfg["home"])
            if not prefix.startswith(("/usr", "/bin")):
                binds.append((prefix, prefix, True))
            home = os.path.join(self.dir, "layers", c["name"], "opt-airflow")
            if not os.path.exists(home):  # a second process in the container ("kubectl exec")
                shutil.copytree(self.images.airflow_home_template[venv], home)
                subprocess.run(["chown", "-R", f"{uid}:{gid}", home], check=True)
            binds.append((home, "/opt/airflow", False))  # the image's writable AIRFLOW_HOME
        if kind == "airflow":
            # The official image's user: airflow, uid 50000, primary group 0.
            os.makedirs(os.path.join(self.dir, "layers", c["name"]), exist_ok=True)
            passwd = os.path.join(self.dir, "layers", c["name"], "passwd")
            with open(passwd, "w") as f:
                f.write(open("/etc/passwd").read() + "airflow:x:50000:0::/home/airflow:/bin/bash\n")
            binds.append((passwd, "/etc/passwd", True))
            etc.remove("passwd")
        if self.hosts:
            hosts = os.path.join(self.dir, "layers", c["name"] + "-hosts")
            os.makedirs(os.path.dirname(hosts), exist_ok=True)
            with open(hosts, "w") as f:
                f.write(open("/etc/hosts").read() + "".join(f"{ip} {n}\n" for n, ip in self.hosts.items()))
            binds.append((hosts, "/etc/hosts", True))
            etc.remove("hosts")
        for name in etc:
            if os.path.exists(f"/etc/{name}"):
                binds.append((f"/etc/{name}", f"/etc/{name}", True))
        # Volumes at their mountPaths.
        for m in c.get("volumeMounts") or []:
            if m["name"] not in self.volumes:
                self.failures.append(f"{c['name']}: volumeMount {m['name']} names no volume of the pod")
                continue
            path, always_ro = self.volumes[m["name"]]
            src = os.path.join(path, m["subPath"]) if m.get("subPath") else path
            binds.append((src, m["mountPath"], always_ro or m.get("readOnly", False)))
        args = ["bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--hostname", "pod"]
        # Mount points the runtime creates in the image (0755, root), shallowest first.
        dests = [b[1] for b in binds]
        parents = set()
        for d in dests:
            p = os.path.dirname(d)
            while p not in ("/", ""):
                if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in dests):
                    parents.add(p)
                p = os.path.dirname(p)
        # The Airflow image's own /tmp (1777) and home come first: a bind below /tmp (a
        # work tree cloned under /tmp, as CI may do) must not turn /tmp into a 0755 parent.
        image_dirs = []
        if kind == "airflow":
            image_dirs = [("1777", "/tmp"), ("0777", "/home/airflow")]
            for mode, d in image_dirs:
                args += ["--perms", mode, "--dir", d]
        made = {d for _, d in image_dirs}
        for p in sorted(parents - made, key=lambda x: x.count("/")):
            args += ["--perms", "0755", "--dir", p]
        # As a container runtime: /proc, a minimal /dev and a 1777 /dev/shm (POSIX semaphores).
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
        for src, dst, ro in binds:
            args += ["--ro-bind" if ro else "--bind", src, dst]
        if ro_root:
            args += ["--remount-ro", "/"]
        priv = [runtime, f"--reuid={uid}", f"--regid={gid}",
                f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return args + priv + command, self.env_of(c, kind, venv)

    def start(self, c, kind, command, log_name):
        argv, env = self.bwrap(c, kind, command)
        out = open(os.path.join(self.dir, log_name), "wb")
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p, out.name

    # probes ----------------------------------------------------------------------------

    def probe(self, c, which):
        """One httpGet probe on the pod's IPv4 and IPv6 address: {family: status or error}."""
        probe = c.get(which)
        if not probe or "httpGet" not in probe:
            return None
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port)
        result = {}
        for family, host in (("IPv4", POD_IPV4), ("IPv6", f"[{POD_IPV6}]")):
            try:
                with urllib.request.urlopen(f"http://{host}:{port}{probe['httpGet']['path']}",
                                            timeout=probe.get("timeoutSeconds", 1)) as r:
                    result[family] = r.status
            except urllib.error.HTTPError as e:
                result[family] = e.code
            except OSError as e:
                result[family] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        return result

    def wait_started(self, c, proc, log_file):
        """The startupProbe gates the next containers. The kubelet probes the pod IP; an
        IPv6-only cluster has only the IPv6 one, so both families must answer. When only IPv4
        does, the failure is recorded and the pod goes on as it would on an IPv4 cluster, so
        that one run shows every defect."""
        probe = c.get("startupProbe") or {}
        attempts = probe.get("failureThreshold", 3)
        period = probe.get("periodSeconds", 10)
        last, ipv4_only = None, 0
        for _ in range(attempts):
            if proc.poll() is not None:
                self.failures.append(f"{c['name']} exited with {proc.returncode}: {tail(log_file)}")
                return False
            last = self.probe(c, "startupProbe")
            if last is None or all(v == 200 for v in last.values()):
                return True
            if last.get("IPv4") == 200:
                ipv4_only += 1
                if ipv4_only >= 3:
                    self.failures.append(f"{c['name']}: startupProbe fails on the pod's IPv6 address "
                                         f"(an IPv6-only cluster never starts this pod): {last}")
                    return True
            time.sleep(min(period, 1))
        self.failures.append(f"{c['name']}: startupProbe never passed on the pod IP: {last}")
        return False

    # the pod ---------------------------------------------------------------------------

    def run(self):
        spec = self.pod["spec"]
        sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
        if not any(c["name"] == SIDECAR_NAME for c in sidecars):
            self.notes.append("no sidecar in this pod (nothing to run)")
            return None
        self.make_volumes()
        for c in sidecars:
            kind = self.images.kind(c["image"])
            command = (c.get("command") or ["/usr/local/bin/airflow-secrets-sidecar"]) + (c.get("args") or ["serve"])
            proc, log_file = self.start(c, kind, command, f"{c['name']}.log")
            if not self.wait_started(c, proc, log_file):
                return False
            ready = self.probe(c, "readinessProbe")
            if ready and not all(v == 200 for v in ready.values()):
                self.failures.append(f"{c['name']}: readinessProbe {ready}")
        # The Airflow container: its command replaced by the task, as the executor does.
        for c in spec["containers"]:
            if self.images.kind(c["image"]) != "airflow":
                continue
            proc, log_file = self.start(
                c, "airflow", ["airflow", "tasks", "test", "sidecar_pod_e2e", "query"], f"{c['name']}.log")
            try:
                proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.failures.append(f"{c['name']}: the task did not finish within 240s")
                continue
            self.check_task(c, proc.returncode, open(log_file, errors="replace").read())
        return not self.failures

    def check_task(self, c, rc, out):
        rows = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("E2E_ROW ")]
        aws = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("E2E_AWS_ENV ")]
        if rc != 0 or not rows:
            self.failures.append(f"{c['name']}: the Airflow task failed (exit {rc}): {task_error(out)}")
        elif json.loads(rows[-1]) != ["app_user", True]:
            self.failures.append(f"{c['name']}: PostgresHook logged in as {rows[-1]}, expected app_user over TLS")
        else:
            self.notes.append(f"{c['name']}: PostgresHook logged in as app_user over TLS (verify-full)")
        if aws and json.loads(aws[-1]):
            self.failures.append(f"{c['name']}: DAG code sees AWS credentials {json.loads(aws[-1])}"
                                 " (it could call Secrets Manager without the sidecar)")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def tail(path, n=1500):
    with open(path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")


def task_error(out):
    """The line that says why the task failed, else the end of the output."""
    for needle in ("root certificate file", "OperationalError", "AirflowNotFoundException", "isn't defined",
                   "Error", "error"):
        for line in out.splitlines():
            if needle in line:
                return line.strip()[:600]
    return out[-600:]



# --- the Airflow 3 layout: task pods without the sidecar, through a real api-server ----------


def metrics_of(port):
    """The api-server sidecar's counters: {series text: value}."""
    with urllib.request.urlopen(f"http://{POD_IPV4}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("sidecar_") and " " in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def total(metrics, prefix, **labels):
    return sum(v for k, v in metrics.items() if k.startswith(prefix)
               and all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def run_airflow3_layout(k8s_dir, images, devenv, workdir, af3):
    """The base kustomization's Airflow 3 layout with real Airflow 3.3: the api-server pod (its
    sidecar beside a real `airflow api-server`), and a task pod from the pod template (no
    sidecar, no AWS role) whose task processes run a mapped task with PostgresHook. The
    scheduler and LocalExecutor run in the task pod only to launch real task processes there
    (a KubernetesExecutor would start one such pod per task). Two batches (2 then 8 tasks):
    the sidecar's lookups grow with the tasks, its AWS calls and Postgres logins must not."""
    entries = pods_from_kustomize(k8s_dir)
    api = next((e for e in entries if e["name"].endswith("Deployment/airflow-api-server")), None)
    task = next((e for e in entries if "pod template" in e["name"] and not sidecar_in(e["pod"]["spec"])), None)
    if not api or not task:
        return None, ["the base renders no api-server Deployment or no sidecar-less pod template"], []
    failures, notes = [], []
    # The metastore both pods share (the Secret airflow-metadata): a database on the test Postgres.
    pg = devenv
    admin = subprocess.run([f"{af3}/bin/python", "-c", (
        "import psycopg2,sys; c=psycopg2.connect(host='127.0.0.1', port=%d, user='postgres', password=sys.argv[1],"
        " dbname='postgres', sslmode='disable'); c.autocommit=True; c.cursor().execute('CREATE DATABASE airflow_meta')"
    ) % pg["pg_port"], pg["pg_password"]], capture_output=True, text=True)
    if admin.returncode != 0:
        return False, [f"cannot create the metastore database: {admin.stderr[-500:]}"], []
    metastore = f"postgresql+psycopg2://postgres:{pg['pg_password']}@127.0.0.1:{pg['pg_port']}/airflow_meta?sslmode=disable"
    config = {"AIRFLOW__API_AUTH__JWT_SECRET": "pod-e2e-jwt-secret-" + str(os.getpid()),
              "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metastore}
    env = {"PATH": f"{af3}/bin:/usr/bin:/bin", "AIRFLOW_HOME": os.path.join(workdir, "migrate"), **config}
    os.makedirs(env["AIRFLOW_HOME"])
    mig = subprocess.run([f"{af3}/bin/airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    if mig.returncode != 0:
        return False, [f"airflow db migrate on Postgres failed: {mig.stdout[-1500:]}{mig.stderr[-1500:]}"], []

    api_run = PodRun(api, images, devenv, os.path.join(workdir, "api-server-pod"))
    task_run = PodRun(task, images, devenv, os.path.join(workdir, "task-pod"))
    for r in (api_run, task_run):
        os.makedirs(r.dir)
        r.metastore = metastore
        r.airflow_env = dict(config)
    # A shorter clock for the outage at the end: past max_stale, the old /readyz failed.
    api_run.sidecar_env = {"SIDECAR_MAX_STALE": "3s"}
    notes.append("test clock: the api-server sidecar runs with SIDECAR_MAX_STALE=3s (manifests: default 1h)")
    # Cluster DNS: the api-server Service resolves to the api-server pod (same network here).
    task_run.hosts = {"airflow-api-server": "127.0.0.1"}
    try:
        api_run.make_volumes()
        sc = sidecar_in(api["pod"]["spec"])
        proc, log_file = api_run.start(sc, "sidecar", ["/usr/local/bin/airflow-secrets-sidecar"] + (sc.get("args") or []),
                                       "sidecar.log")
        if not api_run.wait_started(sc, proc, log_file):
            return False, api_run.failures, notes
        admin_port = next(p["containerPort"] for p in sc["ports"] if p["name"] == "admin")
        ac = next(c for c in api["pod"]["spec"]["containers"] if images.kind(c["image"]) == "airflow")
        api_proc, api_log = api_run.start(ac, "airflow", ["airflow"] + (ac.get("args") or []), "api-server.log")
        if not wait_url("http://127.0.0.1:8080/api/v2/version", api_proc, 180):
            return False, [f"the api-server did not answer: {tail(api_log)}"], notes
        task_run.make_volumes()
        tc = task["pod"]["spec"]["containers"][0]
        task_run.airflow_env.update({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                                     "AIRFLOW__CORE__PARALLELISM": "4"})

        def exec_in_task_pod(*argv, name):
            p, out = task_run.start(tc, "airflow", list(argv), name)
            p.wait(timeout=300)
            return p.returncode, tail(out)

        rc, out = exec_in_task_pod("bash", "-c", "airflow dags reserialize && airflow dags unpause sidecar_layout_e2e",
                                   name="reserialize.log")
        if rc != 0:
            return False, [f"dags reserialize/unpause failed: {out}"], notes
        sched, sched_log = task_run.start(tc, "airflow", ["airflow", "scheduler"], "scheduler.log")
        before = metrics_of(admin_port)
        counts = []
        for batch, n in enumerate((2, 8), 1):
            run_id = f"batch{batch}"
            rc, out = exec_in_task_pod("airflow", "dags", "trigger", "sidecar_layout_e2e", "-r", run_id,
                                       "-c", json.dumps({"tasks": n}), name=f"trigger{batch}.log")
            if rc != 0:
                return False, [f"dags trigger failed: {out}"], notes
            state = wait_dag_run(af3, metastore, run_id, sched, 600)
            m = metrics_of(admin_port)
            counts.append({
                "tasks": n, "state": state,
                "lookups": total(m, "sidecar_lookups_total", kind="connection") - total(before, "sidecar_lookups_total", kind="connection"),
                "aws": total(m, "sidecar_aws_calls_total") - total(before, "sidecar_aws_calls_total"),
                "logins": total(m, "sidecar_validations_total") - total(before, "sidecar_validations_total"),
            })
            before = m
            if state != "success":
                failures.append(f"batch {batch} ({n} tasks) ended {state}: scheduler log: {tail(sched_log, 2500)}")
                break
        if not failures:
            # AWS goes away (moto stops): the api-server must stay Ready, or its Service would
            # drop it and running tasks would lose the Execution API; tasks keep getting the
            # cached, still-valid credential.
            stop_moto(devenv)
            # AWS calls fail for longer than max_stale: lookups of an id the sidecar never cached.
            token_file = os.path.join(api_run.dir, "volumes", "sidecar-token", "token")
            for _ in range(2):
                ask_sidecar(token_file, "/connections/never_cached_db")
                time.sleep(4)
            ask_sidecar(token_file, "/connections/never_cached_db")
            rc, out = exec_in_task_pod("airflow", "dags", "trigger", "sidecar_layout_e2e", "-r", "outage",
                                       "-c", json.dumps({"tasks": 2}), name="trigger-outage.log")
            state = wait_dag_run(af3, metastore, "outage", sched, 600) if rc == 0 else f"trigger failed: {out}"
            ready = api_run.probe(sc, "readinessProbe")
            m = metrics_of(admin_port)
            aws_failed = total(m, "sidecar_aws_calls_total") - total(m, "sidecar_aws_calls_total", outcome="ok") \
                - total(m, "sidecar_aws_calls_total", outcome="not_found")
            counts.append({"tasks": 2, "state": state, "aws_down": True, "readyz": ready})
            if state != "success":
                failures.append(f"with AWS down, 2 tasks ended {state}")
            if not ready or any(v != 200 for v in ready.values()):
                failures.append(f"with AWS down the api-server's sidecar is not ready: {ready}")
            notes.append(f"AWS down: tasks {state}, readinessProbe {ready}, failed AWS calls so far {aws_failed:.0f}")
        notes.append("per batch (api-server sidecar counters): " + json.dumps(counts))
        if len(counts) == 2 and not failures:
            b1, b2 = counts
            if b2["lookups"] < b2["tasks"]:
                failures.append(f"batch 2 made {b2['lookups']} lookups for {b2['tasks']} tasks: tasks did not go "
                                "through the api-server's sidecar")
            # A refresh may fall due during the run (validation TTL 60s): at most one per kind.
            if b2["aws"] > 2 or b2["logins"] > 1:
                failures.append(f"AWS calls / logins grew with the tasks: {b2}")
            notes.append(f"{b1['tasks']}+{b2['tasks']} task processes without a sidecar: "
                         f"{b1['lookups'] + b2['lookups']:.0f} connection lookups served by the api-server's sidecar "
                         f"with {b1['aws'] + b2['aws']:.0f} AWS calls and {b1['logins'] + b2['logins']:.0f} Postgres logins")
        return not failures, failures + api_run.failures + task_run.failures, notes
    finally:
        task_run.stop()
        api_run.stop()


def ask_sidecar(token_file, path):
    """One request to the credential API on the pod's loopback, as Airflow would make it."""
    req = urllib.request.Request(f"http://127.0.0.1:9797{path}",
                                 headers={"X-Sidecar-Token": open(token_file).read().strip()})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stop_moto(devenv):
    """Stop moto (AWS for this test) by its PID: the process listening on its port."""
    port = devenv["moto_url"].rsplit(":", 1)[1].strip("/")
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    for pid in set(re.findall(r"pid=(\d+)", out)):
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.strip():
        time.sleep(0.2)


def wait_url(url, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=3):
                return True
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return True
        except OSError:
            pass
        time.sleep(1)
    return False


def wait_dag_run(af3, metastore, run_id, scheduler, timeout):
    """The run's state from the metastore once it is final (or why it never got there)."""
    dsn = metastore.replace("postgresql+psycopg2://", "postgresql://")
    code = ("import psycopg2,sys; c=psycopg2.connect(sys.argv[1]); cur=c.cursor();"
            " cur.execute(\"select state from dag_run where dag_id='sidecar_layout_e2e' and run_id=%s\", (sys.argv[2],));"
            " r=cur.fetchone(); print(r[0] if r else '')")
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            return f"scheduler exited ({scheduler.returncode})"
        state = subprocess.run([f"{af3}/bin/python", "-c", code, dsn, run_id], capture_output=True,
                               text=True).stdout.strip()
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    return f"still {state or 'not created'} after {timeout}s"

def airflow_home_templates(venvs, workdir):
    """An AIRFLOW_HOME per Airflow version (migrated sqlite metastore and the DAG): the part of
    the Airflow image and its configuration that these manifests do not describe."""
    homes = {}
    for venv in sorted(set(venvs.values())):
        home = os.path.join(workdir, "airflow-home-" + os.path.basename(venv))
        os.makedirs(os.path.join(home, "dags"))
        with open(os.path.join(home, "dags", "sidecar_pod_e2e.py"), "w") as f:
            f.write(DAG)
        if "airflow-3" in os.path.basename(venv):
            with open(os.path.join(home, "dags", "sidecar_layout_e2e.py"), "w") as f:
                f.write(LAYOUT_DAG)
        env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "AIRFLOW_HOME": home, "HOME": home,
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        done = subprocess.run([f"{venv}/bin/airflow", "db", "migrate"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"pod-e2e: airflow db migrate failed in {venv}: {done.stdout[-3000:]}")
        # The image's airflow.cfg would point at /opt/airflow: drop the generated one.
        for name in ("airflow.cfg", "logs"):
            p = os.path.join(home, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)
        homes[venv] = home
    return homes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devenv", required=True, help="devenv.py's JSON description")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sidecar-bin", required=True)
    ap.add_argument("--airflow2", required=True)
    ap.add_argument("--airflow3", required=True)
    ap.add_argument("--k8s", nargs="*", default=[])
    ap.add_argument("--helm", nargs="*", default=[])
    ap.add_argument("--layout-k8s", help="run the Airflow 3 layout of this kustomization")
    args = ap.parse_args()
    devenv = json.loads(open(args.devenv).read())
    venvs = {"2": args.airflow2, "3": args.airflow3}
    images = Images(args.sidecar_bin, venvs, airflow_home_templates(venvs, args.workdir))
    entries = []
    for d in args.k8s:
        entries += pods_from_kustomize(d)
    for f in args.helm:
        entries += pods_from_helm(f)
    results, seen = [], {}
    for i, entry in enumerate(entries):
        # Overlays often render the same pod again: run each distinct pod once.
        key = json.dumps([entry["pod"], entry["aws_role"]], sort_keys=True)
        if key in seen:
            results.append((entry["name"], None, [], [f"same pod as {seen[key]}"], 0))
            continue
        seen[key] = entry["name"]
        workdir = os.path.join(args.workdir, f"pod-{i}")
        os.makedirs(workdir)
        run = PodRun(entry, images, devenv, workdir)
        started = time.monotonic()
        log(f"{entry['name']}")
        try:
            ok = run.run()
        finally:
            run.stop()
        results.append((entry["name"], ok, run.failures, run.notes, time.monotonic() - started))
    if args.layout_k8s:
        started = time.monotonic()
        log(f"{args.layout_k8s}: Airflow 3 layout (task pod without the sidecar -> api-server)")
        workdir = os.path.join(args.workdir, "layout")
        os.makedirs(workdir)
        ok, failures, notes = run_airflow3_layout(args.layout_k8s, images, devenv, workdir, args.airflow3)
        results.append((f"{args.layout_k8s}: Airflow 3 layout, task processes without the sidecar", ok,
                        failures, notes, time.monotonic() - started))
    print("\n== pod e2e report")
    ran = 0
    for name, ok, failures, notes, secs in results:
        status = "SAME" if ok is None and notes and notes[0].startswith("same pod") else (
            "SKIP" if ok is None else ("PASS" if ok else "FAIL"))
        ran += ok is not None
        print(f"{status} {name} ({secs:.0f}s)")
        for f in failures:
            print(f"     FAIL: {f}")
        for n in notes:
            print(f"     note: {n}")
    failed = [r for r in results if r[1] is False]
    if not ran:
        print("no pod with the sidecar was found")
        return 1
    print(f"{ran - len(failed)} of {ran} pods with the sidecar passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
