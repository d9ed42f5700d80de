"""Checks on the deployment files in deploy/ (kustomize, Helm values, IAM policy, Dockerfile).

Each ``check_*`` function takes a :class:`Bundle` (everything rendered and parsed once) and
returns a list of problems; an empty list means the property holds. test_deploy.py asserts
that every check passes on the real files; test_mutations.py breaks a copy of the files in
one place at a time and asserts that the matching check notices, so no check is vacuous.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[1]

SIDECAR = "airflow-secrets-sidecar"
ADMIN_PORT = 9798
API_HOST, API_PORT = "127.0.0.1", 9797
TOKEN_DIR = "/var/run/airflow-secrets-sidecar"
TOKEN_FILE = TOKEN_DIR + "/token"
BACKEND_CLASS = "airflow_secrets_sidecar.SidecarSecretsBackend"
BACKEND_ENV = {
    "AIRFLOW__SECRETS__BACKEND": "AIRFLOW__SECRETS__BACKEND_KWARGS",
    "AIRFLOW__WORKERS__SECRETS_BACKEND": "AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS",
}
POD_TEMPLATE_KEY = "pod_template_file.yaml"
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
# The Helm values files: the Airflow 3 layout (recommended) and the per-pod sidecar layout.
HELM_FILES = ("helm/values-airflow3.yaml", "helm/values-per-pod-sidecar.yaml")
HELM_AIRFLOW3 = "helm/values-airflow3.yaml"
# Chart components that can carry the sidecar (values path -> the Airflow container the chart
# renders in that pod). workers.* is chart 1.21+'s split of the deprecated workers.X keys.
HELM_COMPONENTS = {
    "scheduler": "scheduler",
    "triggerer": "triggerer",
    "dagProcessor": "dag-processor",
    "apiServer": "api-server",
    "webserver": "webserver",
    "workers.celery": "worker",
    "workers.kubernetes": "base",
}
# Components that resolve connections themselves in the Airflow 3 layout (task processes ask the
# api-server through the Execution API).
AIRFLOW3_SIDECAR_COMPONENTS = ("scheduler", "triggerer", "dagProcessor", "apiServer")
HELM_KEYS = ("extraInitContainers", "extraVolumes", "extraVolumeMounts", "env")
SKIP_ANNOTATION = "eks.amazonaws.com/skip-containers"
SCRAPE_LABEL = ("airflow-secrets-sidecar/enabled", "true")
REPO_DIR = DEPLOY_DIR.parent
# The official Airflow image's user and group, and the chart's defaults for them.
AIRFLOW_UID, AIRFLOW_GID = 50000, 0
IAM_ACTIONS = {
    "secretsmanager:GetSecretValue",
    "secretsmanager:DescribeSecret",
    "rds:DescribeDBInstances",
    "rds:DescribeDBClusters",
    "kms:Decrypt",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


# --- loading ------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict]:
    """`kubectl kustomize PATH`, parsed into a list of objects."""
    if shutil.which("kubectl") is None:
        raise RuntimeError("kubectl is not on PATH; deploy/validate.sh explains how to get it")
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@dataclass
class Pod:
    """A pod spec that must carry the sidecar, and where it came from (for messages)."""

    where: str
    metadata: dict
    spec: dict
    # Whether the pod's service account carries an AWS role (IRSA annotation, or a pod identity
    # association in the pod-identity overlay).
    aws_role: bool = False


@dataclass
class Bundle:
    deploy: Path
    renders: dict[str, list[dict]]  # "deploy/k8s", "overlays/<name>" -> rendered objects
    helms: dict[str, dict]  # "helm/values-....yaml" -> values
    iam: dict
    dockerfile: str
    pods: list[Pod] = field(default_factory=list)


_RENDER_CACHE: dict[str, dict[str, list[dict]]] = {}


def render_all(k8s: Path) -> dict[str, list[dict]]:
    """deploy/k8s and each overlay, rendered; memoised on the tree's content (the mutation
    tests load many copies of deploy/ that differ only outside k8s/)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in k8s.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(k8s)).encode() + b"\0" + f.read_bytes() + b"\0")
    key = digest.hexdigest()
    if key not in _RENDER_CACHE:
        renders = {"deploy/k8s": kustomize(k8s)}
        for overlay in sorted((k8s / "overlays").iterdir()):
            if (overlay / "kustomization.yaml").exists():
                renders[f"overlays/{overlay.name}"] = kustomize(overlay)
        _RENDER_CACHE[key] = renders
    return copy.deepcopy(_RENDER_CACHE[key])


def load_bundle(deploy: Path | None = None) -> Bundle:
    deploy = Path(deploy or os.environ.get("DEPLOY_DIR") or DEPLOY_DIR)
    renders = render_all(deploy / "k8s")
    helms = {f: yaml.safe_load((deploy / f).read_text()) for f in HELM_FILES}
    iam = json.loads((deploy / "k8s" / "base" / "iam-policy.json").read_text())
    dockerfile = (deploy / "Dockerfile").read_text()
    b = Bundle(deploy, renders, helms, iam, dockerfile)
    b.pods = collect_pods(b)
    return b


def pod_template_configmaps(docs: list[dict]) -> list[dict]:
    return [
        d
        for d in docs
        if d.get("kind") == "ConfigMap" and POD_TEMPLATE_KEY in (d.get("data") or {})
    ]


def helm_pod_security_context(values: dict, component: dict) -> dict:
    """The pod securityContext the chart renders for an Airflow component."""
    own = (component.get("securityContexts") or {}).get("pod")
    common = (values.get("securityContexts") or {}).get("pod")
    legacy = values.get("securityContext")
    for sc in (own, common, legacy):
        if sc:
            return sc
    return {"runAsUser": values.get("uid", AIRFLOW_UID), "fsGroup": values.get("gid", AIRFLOW_GID)}


def helm_get(values: dict, path: str):
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def helm_component(values: dict, path: str) -> dict | None:
    """A component's values as the chart reads them: workers.celery.X / workers.kubernetes.X,
    else the deprecated workers.X."""
    own = helm_get(values, path)
    if not path.startswith("workers."):
        return own
    legacy = {k: v for k, v in (values.get("workers") or {}).items() if k not in ("celery", "kubernetes")}
    merged = dict(legacy, **(own or {}))
    return merged or None


def collect_pods(b: Bundle) -> list[Pod]:
    pods: list[Pod] = []
    for name, docs in b.renders.items():
        sas = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}

        def has_role(spec):
            sa = sas.get(spec.get("serviceAccountName", "default")) or {}
            ann = (sa.get("metadata") or {}).get("annotations") or {}
            # Pod Identity binds roles outside Kubernetes: to the accounts of the sidecar pods.
            return IRSA_ANNOTATION in ann or ("pod-identity" in name and sidecar_in(spec))

        for d in docs:
            kind, meta = d.get("kind"), d.get("metadata", {})
            if kind in WORKLOAD_KINDS:
                t = d["spec"]["template"]
                pods.append(Pod(f"{name}: {kind}/{meta.get('name')}", t.get("metadata", {}), t["spec"],
                                has_role(t["spec"])))
            elif kind == "Pod":
                pods.append(Pod(f"{name}: Pod/{meta.get('name')}", meta, d["spec"], has_role(d["spec"])))
        for cm in pod_template_configmaps(docs):
            pt = yaml.safe_load(cm["data"][POD_TEMPLATE_KEY])
            where = f"{name}: ConfigMap/{cm['metadata']['name']} {POD_TEMPLATE_KEY}"
            pods.append(Pod(where, pt.get("metadata", {}), pt["spec"], has_role(pt["spec"])))
    for fname, values in b.helms.items():
        for comp, container in HELM_COMPONENTS.items():
            c = helm_component(values, comp)
            if not c:
                continue
            spec = {
                "securityContext": helm_pod_security_context(values, c),
                "initContainers": copy.deepcopy(c.get("extraInitContainers") or []),
                "containers": [
                    {
                        "name": container,
                        "image": "apache/airflow",
                        "env": copy.deepcopy(c.get("env") or []),
                        "volumeMounts": copy.deepcopy(c.get("extraVolumeMounts") or []),
                    }
                ]
                + copy.deepcopy(c.get("extraContainers") or []),
                "volumes": copy.deepcopy(c.get("extraVolumes") or []),
            }
            ann = ((c.get("serviceAccount") or {}).get("annotations") or {})
            meta = {"annotations": c.get("podAnnotations") or {}, "labels": c.get("labels") or {}}
            pods.append(Pod(f"{fname}: {comp}", meta, spec, IRSA_ANNOTATION in ann))
    return pods


# --- helpers ------------------------------------------------------------------------


def sidecar_in(spec: dict) -> dict | None:
    for c in spec.get("initContainers") or []:
        if c.get("name") == SIDECAR:
            return c
    return None


def sidecar_of(pod: Pod) -> dict | None:
    return sidecar_in(pod.spec)


def airflow_containers(pod: Pod) -> list[dict]:
    return [c for c in pod.spec.get("containers") or [] if c.get("name") != SIDECAR]


def env_of(container: dict) -> dict:
    """name -> literal value, or the valueFrom dict for values taken from elsewhere."""
    out = {}
    for e in container.get("env") or []:
        out[e["name"]] = e["value"] if "value" in e else {"valueFrom": e.get("valueFrom")}
    return out


def effective(container: dict, pod: Pod, key: str):
    """A securityContext field as the kubelet applies it: container first, then pod."""
    csc = container.get("securityContext") or {}
    if key in csc:
        return csc[key]
    return (pod.spec.get("securityContext") or {}).get(key)


def resolve_port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def host_port(addr: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", str(addr))
    return (m.group(1), int(m.group(2))) if m else None


def volume(pod: Pod, name: str) -> dict | None:
    for v in pod.spec.get("volumes") or []:
        if v.get("name") == name:
            return v
    return None


def mount_at(container: dict, path: str) -> dict | None:
    for m in container.get("volumeMounts") or []:
        if m.get("mountPath") == path:
            return m
    return None


def quantity(q) -> float:
    """Kubernetes quantity -> number (bytes or cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"unparsable quantity {q!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def walk_strings(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_strings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk_strings(v, f"{path}[{i}]")
    elif isinstance(obj, str):
        yield path, obj


def each_sidecar(b: Bundle):
    for pod in b.pods:
        sc = sidecar_of(pod)
        if sc is not None:
            yield pod, sc


# --- checks -------------------------------------------------------------------------


def check_sidecar_is_native_init_container(b: Bundle) -> list[str]:
    """Every long-running component runs the sidecar as an initContainers entry with
    restartPolicy Always (task pods may go without: check_pods_without_sidecar)."""
    problems = []
    for name, docs in b.renders.items():
        if not pod_template_configmaps(docs):
            problems.append(f"{name}: no ConfigMap carrying {POD_TEMPLATE_KEY}")
        if not any(d.get("kind") in WORKLOAD_KINDS for d in docs):
            problems.append(f"{name}: no workload (Deployment, ...) rendered")
    for pod in b.pods:
        if any(c.get("name") == SIDECAR for c in pod.spec.get("containers") or []):
            problems.append(f"{pod.where}: {SIDECAR} is a regular container, not a native sidecar")
        sc = sidecar_of(pod)
        workload = any(f": {k}/" in pod.where for k in WORKLOAD_KINDS)
        if sc is None:
            if workload:
                problems.append(f"{pod.where}: no {SIDECAR} in initContainers")
            continue
        if sc.get("restartPolicy") != "Always":
            problems.append(f"{pod.where}: {SIDECAR} has restartPolicy {sc.get('restartPolicy')!r}, not Always")
        if not airflow_containers(pod):
            problems.append(f"{pod.where}: no Airflow container beside the sidecar")
    return problems


def check_probes_on_admin_port(b: Bundle) -> list[str]:
    """startup (/livez), readiness (/readyz) and liveness (/livez) probes on the admin port."""
    problems = []
    want = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for pod, sc in each_sidecar(b):
        ports = {p.get("containerPort") for p in sc.get("ports") or []}
        if ADMIN_PORT not in ports:
            problems.append(f"{pod.where}: admin port {ADMIN_PORT} is not a container port")
        admin = host_port(env_of(sc).get("SIDECAR_ADMIN_LISTEN", f"0.0.0.0:{ADMIN_PORT}"))
        if not admin or admin[1] != ADMIN_PORT:
            problems.append(f"{pod.where}: SIDECAR_ADMIN_LISTEN does not listen on {ADMIN_PORT}")
        for probe, path in want.items():
            p = sc.get(probe)
            if not p:
                problems.append(f"{pod.where}: sidecar has no {probe}")
                continue
            get = p.get("httpGet")
            if not get:
                problems.append(f"{pod.where}: {probe} is not an httpGet probe")
                continue
            if resolve_port(sc, get.get("port")) != ADMIN_PORT:
                problems.append(f"{pod.where}: {probe} port {get.get('port')!r} is not the admin port")
            if get.get("path") != path:
                problems.append(f"{pod.where}: {probe} path {get.get('path')!r}, expected {path}")
            if get.get("host"):
                problems.append(f"{pod.where}: {probe} sets host; the kubelet must probe the pod IP")
    return problems


def check_sidecar_security_context(b: Bundle) -> list[str]:
    """runAsNonRoot, read-only root fs, drop ALL, no privilege escalation, RuntimeDefault."""
    problems = []
    for pod, sc in each_sidecar(b):
        csc = sc.get("securityContext") or {}
        w = pod.where
        if effective(sc, pod, "runAsNonRoot") is not True:
            problems.append(f"{w}: sidecar runAsNonRoot is not true")
        if effective(sc, pod, "runAsUser") == 0:
            problems.append(f"{w}: sidecar runs as uid 0")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{w}: sidecar readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{w}: sidecar allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            problems.append(f"{w}: sidecar is privileged")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{w}: sidecar does not drop ALL capabilities")
        if caps.get("add"):
            problems.append(f"{w}: sidecar adds capabilities {caps['add']}")
        seccomp = effective(sc, pod, "seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{w}: sidecar seccompProfile is {seccomp.get('type')!r}, not RuntimeDefault")
    return problems


def check_credential_api_stays_on_loopback(b: Bundle) -> list[str]:
    """SIDECAR_LISTEN is 127.0.0.1:9797, the port is not exposed, no host network."""
    problems = []
    for pod, sc in each_sidecar(b):
        listen = env_of(sc).get("SIDECAR_LISTEN", f"{API_HOST}:{API_PORT}")
        hp = host_port(listen) if isinstance(listen, str) else None
        if hp != (API_HOST, API_PORT):
            problems.append(f"{pod.where}: SIDECAR_LISTEN is {listen!r}, not {API_HOST}:{API_PORT}")
        for c in (pod.spec.get("initContainers") or []) + (pod.spec.get("containers") or []):
            for p in c.get("ports") or []:
                if p.get("containerPort") == API_PORT:
                    problems.append(f"{pod.where}: container {c.get('name')} exposes the credential port")
        if pod.spec.get("hostNetwork"):
            problems.append(f"{pod.where}: hostNetwork would share the credential API's loopback with the node")
    return problems


def check_token_volume_in_memory(b: Bundle) -> list[str]:
    """The token is shared through an emptyDir with medium Memory mounted in both containers."""
    problems = []
    for pod, sc in each_sidecar(b):
        w = pod.where
        env = env_of(sc)
        if env.get("SIDECAR_TOKEN_FILE") != TOKEN_FILE:
            problems.append(f"{w}: SIDECAR_TOKEN_FILE is {env.get('SIDECAR_TOKEN_FILE')!r}, not {TOKEN_FILE}")
        if str(env.get("SIDECAR_TOKEN_CREATE", "")).lower() != "true":
            problems.append(f"{w}: SIDECAR_TOKEN_CREATE is not true (nothing would write the token)")
        m = mount_at(sc, TOKEN_DIR)
        if not m:
            problems.append(f"{w}: sidecar does not mount {TOKEN_DIR}")
            continue
        if m.get("readOnly"):
            problems.append(f"{w}: sidecar mounts {TOKEN_DIR} read-only; it must write the token")
        vol = volume(pod, m["name"])
        if vol is None:
            problems.append(f"{w}: volume {m['name']} is not defined")
        elif (vol.get("emptyDir") or {}).get("medium") != "Memory":
            problems.append(f"{w}: token volume {m['name']} is not an emptyDir with medium Memory")
        for c in airflow_containers(pod):
            am = mount_at(c, TOKEN_DIR)
            if not am or am.get("name") != m["name"]:
                problems.append(f"{w}: container {c['name']} does not mount the token volume at {TOKEN_DIR}")
            elif am.get("readOnly") is not True:
                problems.append(f"{w}: container {c['name']} mounts the token volume writable")
    return problems


def check_airflow_backend_config(b: Bundle) -> list[str]:
    """[secrets] and [workers] backends point at the sidecar on loopback with the token file."""
    problems = []
    for pod, _ in each_sidecar(b):
        for c in airflow_containers(pod):
            env = env_of(c)
            for backend, kwargs_name in BACKEND_ENV.items():
                w = f"{pod.where}: {c['name']}"
                if env.get(backend) != BACKEND_CLASS:
                    problems.append(f"{w}: {backend} is {env.get(backend)!r}, not {BACKEND_CLASS}")
                try:
                    kwargs = json.loads(env.get(kwargs_name))
                except (TypeError, ValueError):
                    problems.append(f"{w}: {kwargs_name} is missing or not JSON")
                    continue
                url = urlsplit(str(kwargs.get("url", "")))
                if (url.scheme, url.hostname, url.port) != ("http", API_HOST, API_PORT):
                    problems.append(f"{w}: {kwargs_name} url {kwargs.get('url')!r} is not the sidecar on loopback")
                if kwargs.get("token_file") != TOKEN_FILE:
                    problems.append(f"{w}: {kwargs_name} token_file is {kwargs.get('token_file')!r}")
    return problems


def check_token_readable_by_airflow(b: Bundle) -> list[str]:
    """The pod fsGroup is the Airflow container's group, so it can read the 0640 token."""
    problems = []
    for pod, _ in each_sidecar(b):
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        if fs_group is None:
            problems.append(f"{pod.where}: no pod fsGroup: the Airflow user cannot read the 0640 token")
            continue
        for c in airflow_containers(pod):
            gid = effective(c, pod, "runAsGroup")
            gid = AIRFLOW_GID if gid is None else gid
            extra = (pod.spec.get("securityContext") or {}).get("supplementalGroups") or []
            if fs_group != gid and fs_group not in extra:
                problems.append(f"{pod.where}: fsGroup {fs_group} is not the group ({gid}) of {c['name']}")
    return problems


def check_sidecar_resources(b: Bundle) -> list[str]:
    problems = []
    for pod, sc in each_sidecar(b):
        res = sc.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in req:
                problems.append(f"{pod.where}: sidecar has no {key} request")
        if "memory" not in lim:
            problems.append(f"{pod.where}: sidecar has no memory limit")
        elif "memory" in req and quantity(lim["memory"]) < quantity(req["memory"]):
            problems.append(f"{pod.where}: sidecar memory limit below its request")
    return problems


SECRET_ENV_NAME = re.compile(
    r"(PASSWORD|PASSWD|SECRET_ACCESS_KEY|SESSION_TOKEN|PRIVATE_KEY|API_KEY|FERNET_KEY|SECRET_KEY|"
    r"(^|_)TOKEN$|(^|_)SECRET$|CREDENTIALS?$)",
    re.I,
)
SECRET_TEXT = [
    (re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:[^\s/@'\"]+@", re.I), "a URI with a password"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"[\"']?(password|passwd|pwd|secret)[\"']?\s*[:=]\s*[\"']?[^\s\"',}]+", re.I), "a password"),
]


def check_no_plaintext_secrets(b: Bundle) -> list[str]:
    """No Secret objects with values, no secret-looking env values, no credentials in text."""
    problems = []
    for name, docs in b.renders.items():
        for d in docs:
            if d.get("kind") == "Secret" and (d.get("data") or d.get("stringData")):
                problems.append(f"{name}: Secret/{d['metadata'].get('name')} carries values in the manifests")
    for pod in b.pods:
        for c in (pod.spec.get("initContainers") or []) + (pod.spec.get("containers") or []):
            for e in c.get("env") or []:
                if "value" in e and SECRET_ENV_NAME.search(e["name"]):
                    problems.append(f"{pod.where}: env {e['name']} of {c.get('name')} has a literal value")
    sources = [(n, d) for n, docs in b.renders.items() for d in docs] + list(b.helms.items())
    for name, obj in sources:
        for path, text in walk_strings(obj):
            for rx, what in SECRET_TEXT:
                if rx.search(text):
                    problems.append(f"{name} {path}: looks like {what}")
    return problems


def check_sidecar_identical_everywhere(b: Bundle) -> list[str]:
    """One sidecar definition: the pod template and the Helm values do not drift from it."""
    problems = []
    found = [(p.where, sc) for p, sc in each_sidecar(b)]
    if not found:
        return ["no sidecar anywhere"]
    ref_where, ref = found[0]
    for where, sc in found[1:]:
        if sc != ref:
            keys = sorted(k for k in set(sc) | set(ref) if sc.get(k) != ref.get(k))
            problems.append(f"{where}: sidecar differs from {ref_where} in {keys}")
    return problems


def check_pod_template_wiring(b: Bundle) -> list[str]:
    """The scheduler mounts the pod template where [kubernetes_executor] says it is."""
    problems = []
    for name, docs in b.renders.items():
        cms = pod_template_configmaps(docs)
        for cm in cms:
            pt = yaml.safe_load(cm["data"][POD_TEMPLATE_KEY])
            names = [c.get("name") for c in pt["spec"].get("containers") or []]
            if "base" not in names:
                problems.append(f"{name}: pod template has no container named base (Airflow needs it)")
        cm_names = {cm["metadata"]["name"] for cm in cms}
        for d in docs:
            if d.get("kind") not in WORKLOAD_KINDS:
                continue
            spec = d["spec"]["template"]["spec"]
            vols = {
                v["name"]: v["configMap"]["name"]
                for v in spec.get("volumes") or []
                if "configMap" in v
            }
            for c in spec.get("containers") or []:
                path = env_of(c).get("AIRFLOW__KUBERNETES_EXECUTOR__POD_TEMPLATE_FILE")
                if path is None:
                    continue
                ok = any(
                    vols.get(m["name"]) in cm_names and path == f"{m['mountPath']}/{POD_TEMPLATE_KEY}"
                    for m in c.get("volumeMounts") or []
                )
                if not ok:
                    problems.append(f"{name}: {path} is not the mounted pod template ConfigMap")
    return problems


def check_service_accounts(b: Bundle) -> list[str]:
    """A valid IRSA role on the accounts of sidecar pods only; none with Pod Identity; pods use
    rendered accounts."""
    problems = []
    arn = re.compile(r"^arn:aws:iam::\d{12}:role/[\w+=,.@/-]+$")
    for name, docs in b.renders.items():
        sas = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
        if not sas:
            problems.append(f"{name}: no ServiceAccount")
        here = [p for p in b.pods if p.where.startswith(name + ":")]
        for pod in here:
            sa = pod.spec.get("serviceAccountName")
            if sa not in sas:
                problems.append(f"{pod.where}: serviceAccountName {sa!r} is not rendered here")
        with_sidecar = {p.spec.get("serviceAccountName") for p in here if sidecar_of(p)}
        for sa_name, sa in sas.items():
            ann = (sa["metadata"].get("annotations") or {}).get(IRSA_ANNOTATION)
            if "pod-identity" in name:
                if ann is not None:
                    problems.append(f"{name}: ServiceAccount/{sa_name} still has the IRSA annotation")
            elif sa_name in with_sidecar and not (isinstance(ann, str) and arn.match(ann)):
                problems.append(f"{name}: ServiceAccount/{sa_name} lacks a valid {IRSA_ANNOTATION}")
            elif sa_name not in with_sidecar and ann is not None:
                problems.append(f"{name}: ServiceAccount/{sa_name} has an AWS role but no pod of it runs the sidecar")
    for fname, values in b.helms.items():
        for comp in HELM_COMPONENTS:
            c = helm_component(values, comp)
            if not c or not c.get("extraInitContainers"):
                continue
            ann = (c.get("serviceAccount") or {}).get("annotations") or {}
            if not (isinstance(ann.get(IRSA_ANNOTATION), str) and arn.match(ann[IRSA_ANNOTATION])):
                problems.append(f"{fname}: {comp}.serviceAccount.annotations lacks {IRSA_ANNOTATION}")
    return problems


def check_metrics_scraping(b: Bundle) -> list[str]:
    """Sidecar pods carry the prometheus.io annotations and the label a PodMonitor selects; the
    PodMonitor scrapes the admin port's /metrics (pods, so NotReady ones stay scraped)."""
    problems = []
    key, value = SCRAPE_LABEL
    for pod, sc in each_sidecar(b):
        ann = pod.metadata.get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true":
            problems.append(f"{pod.where}: prometheus.io/scrape is not \"true\"")
        if ann.get("prometheus.io/port") != str(ADMIN_PORT):
            problems.append(f"{pod.where}: prometheus.io/port is {ann.get('prometheus.io/port')!r}")
        if ann.get("prometheus.io/path", "/metrics") != "/metrics":
            problems.append(f"{pod.where}: prometheus.io/path is {ann.get('prometheus.io/path')!r}")
        if (pod.metadata.get("labels") or {}).get(key) != value:
            problems.append(f"{pod.where}: no label {key}={value} (the PodMonitor would not scrape it)")
    monitors = [(n, d) for n, docs in b.renders.items() for d in docs if d.get("kind") == "PodMonitor"]
    if not monitors:
        problems.append("no overlay renders a PodMonitor")
    for name, pm in monitors:
        if (pm["spec"].get("selector") or {}).get("matchLabels") != {key: value}:
            problems.append(f"{name}: PodMonitor does not select {key}={value}")
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            if ep.get("path", "/metrics") != "/metrics":
                problems.append(f"{name}: PodMonitor path {ep.get('path')!r}")
            for pod, sc in each_sidecar(b):
                if pod.where.startswith(name + ":") and resolve_port(sc, ep.get("port")) != ADMIN_PORT:
                    problems.append(f"{name}: PodMonitor port {ep.get('port')!r} is not the admin port of {pod.where}")
    for name, docs in b.renders.items():
        for d in docs:
            if d.get("kind") == "Service" and key in ((d["spec"].get("selector") or {})) \
                    and not d["spec"].get("publishNotReadyAddresses"):
                problems.append(f"{name}: Service/{d['metadata']['name']} drops NotReady sidecar pods from scraping")
    return problems


def check_iam_policy(b: Bundle) -> list[str]:
    """Exactly the read-only actions, scoped resources, kms:Decrypt only via Secrets Manager."""
    problems = []
    statements = b.iam.get("Statement")
    statements = statements if isinstance(statements, list) else [statements]
    actions = set()
    for st in statements:
        if st.get("Effect") != "Allow" or "NotAction" in st or "NotResource" in st:
            problems.append(f"statement {st.get('Sid')}: only plain Allow statements are expected")
        acts = st.get("Action")
        acts = [acts] if isinstance(acts, str) else list(acts or [])
        res = st.get("Resource")
        res = [res] if isinstance(res, str) else list(res or [])
        actions.update(acts)
        for r in res:
            if r == "*" or r.endswith(":*:*:*"):
                problems.append(f"statement {st.get('Sid')}: unscoped resource {r!r}")
        for a in acts:
            if "*" in a:
                problems.append(f"statement {st.get('Sid')}: wildcard action {a!r}")
            if a.startswith("secretsmanager:"):
                for r in res:
                    if not re.match(r"^arn:aws:secretsmanager:[^:]*:[^:]*:secret:(airflow/|rds!)", r):
                        problems.append(f"{a} on {r!r}: not an airflow/* or rds!* secret")
        if "kms:Decrypt" in acts:
            cond = json.dumps(st.get("Condition") or {})
            if "kms:ViaService" not in cond or "secretsmanager." not in cond:
                problems.append("kms:Decrypt is not conditioned on kms:ViaService secretsmanager")
    if actions != IAM_ACTIONS:
        problems.append(
            f"actions differ from the minimal set: extra {sorted(actions - IAM_ACTIONS)}, "
            f"missing {sorted(IAM_ACTIONS - actions)}"
        )
    return problems


def check_helm_components(b: Bundle) -> list[str]:
    """The Helm values give every component that resolves connections the four additions; the
    Airflow 3 layout leaves workers without the sidecar."""
    problems = []
    for fname, values in b.helms.items():
        wanted = list(AIRFLOW3_SIDECAR_COMPONENTS)
        if fname != HELM_AIRFLOW3:
            wanted += ["webserver", "workers.celery", "workers.kubernetes"]
        for comp in wanted:
            c = helm_component(values, comp)
            if not isinstance(c, dict):
                problems.append(f"{fname}: no {comp} section")
                continue
            for key in HELM_KEYS:
                if not c.get(key):
                    problems.append(f"{fname}: {comp}.{key} is empty")
        if fname == HELM_AIRFLOW3:
            for comp in ("workers.celery", "workers.kubernetes"):
                c = helm_component(values, comp) or {}
                if c.get("extraInitContainers") or c.get("env") or (c.get("serviceAccount") or {}).get("annotations"):
                    problems.append(f"{fname}: {comp} gets the sidecar, backend or a role; Airflow 3 tasks ask the api-server")
    return problems


def check_helm_pods_match_kubernetes_schema(b: Bundle) -> list[str]:
    """The Helm-added pieces form a valid pod (strict schema) for 1.29 and the newest version."""
    from kubernetes_validate import utils as kv

    problems = []
    for pod in b.pods:
        if not pod.where.startswith("helm/"):
            continue
        doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod.spec}
        for version in ("1.29.0", kv.latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{pod.where} (Kubernetes {version}): {path}: {e.message}")
    return problems


def dockerfile_stages(text: str) -> list[list]:
    import dockerfile  # the official Go parser (PyPI "dockerfile")

    stages: list[list] = []
    for cmd in dockerfile.parse_string(text):
        if cmd.cmd.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def check_dockerfile(b: Bundle) -> list[str]:
    """Multi-stage, locked release build, distroless non-root final stage, exec-form entrypoint."""
    try:
        stages = dockerfile_stages(b.dockerfile)
    except Exception as e:  # noqa: BLE001 - any parse error is the finding
        return [f"Dockerfile does not parse: {e}"]
    problems = []
    if len(stages) < 2:
        return ["Dockerfile is not multi-stage"]
    runs = [c.original for s in stages for c in s if c.cmd.upper() == "RUN"]
    if not any(re.search(r"cargo build\b.*--release\b.*--locked|cargo build\b.*--locked\b.*--release", r)
               for r in runs):
        problems.append("no stage runs `cargo build --release --locked`")
    final = stages[-1]
    base = final[0].value[0]
    if not base.startswith("gcr.io/distroless/"):
        problems.append(f"final stage is based on {base}, not distroless")
    users = [c.value[0] for c in final if c.cmd.upper() == "USER"]
    user = users[-1] if users else ("nonroot" if base.endswith(":nonroot") else "root")
    name = user.split(":")[0]
    if name in ("root", "0") or not (name.isdigit() or name == "nonroot"):
        problems.append(f"final stage runs as {user!r}; use a numeric non-root uid")
    if any(c.cmd.upper() == "RUN" for c in final):
        problems.append("final stage has RUN steps; the image has no shell")
    entry = [c for c in final if c.cmd.upper() == "ENTRYPOINT"]
    if not entry or not entry[-1].json:
        problems.append("final stage needs an exec-form (JSON) ENTRYPOINT: there is no shell")
    elif "airflow-secrets-sidecar" not in entry[-1].value[0]:
        problems.append(f"ENTRYPOINT {entry[-1].value} is not the sidecar binary")
    if not any(c.cmd.upper() == "COPY" and any(f.startswith("--from=") for f in c.flags) for c in final):
        problems.append("final stage does not copy the binary from the build stage")
    return problems



# --- checks added for the first real install (CA path, AWS isolation, IPv6, chart, monitoring) ---


def answer_file_paths(sidecar: dict) -> list[str]:
    """File paths the sidecar writes into answers (libpq reads them in the Airflow container):
    sslrootcert, or the path SIDECAR_ANSWER_SSLROOTCERT names for Airflow instead."""
    env = env_of(sidecar)
    paths = []
    root = env.get("SIDECAR_ANSWER_SSLROOTCERT") or env.get("SIDECAR_SSLROOTCERT")
    if isinstance(root, str) and root:
        paths.append(root)
    for k in ("SIDECAR_SSLCERT", "SIDECAR_SSLKEY"):
        if isinstance(env.get(k), str):
            paths.append(env[k])
    return paths


def readable_by(pod: Pod, container: dict, vol: dict, mount: dict) -> str | None:
    """Why `container` cannot read files of a ConfigMap/Secret volume, or None."""
    src = vol.get("configMap") or vol.get("secret")
    if src is None:
        return f"volume {vol['name']} is not a ConfigMap or Secret"
    mode = src.get("defaultMode", 0o644)
    uid = effective(container, pod, "runAsUser")
    uid = AIRFLOW_UID if uid is None else uid
    gid = effective(container, pod, "runAsGroup")
    gid = AIRFLOW_GID if gid is None else gid
    psc = pod.spec.get("securityContext") or {}
    groups = {gid, *(psc.get("supplementalGroups") or [])}
    fs_group = psc.get("fsGroup")
    if fs_group is not None:
        groups.add(fs_group)
    # The kubelet writes these files owned by root, group fsGroup (when set).
    if uid == 0 or mode & 0o004 or (mode & 0o040 and fs_group is not None and fs_group in groups):
        return None
    return f"mode {oct(mode)} of volume {vol['name']} is not readable by uid {uid} groups {sorted(groups)}"


def check_answer_paths_mounted(b: Bundle) -> list[str]:
    """Every file path the sidecar writes into an answer is mounted, from the same volume source
    as in the sidecar and readable by the container's user, in every container that mounts the
    token, and in every sidecar-less task pod of the same layout (answers reach it through the
    api-server)."""
    problems = []

    def covering(c, path):
        ms = [m for m in c.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        return max(ms, key=lambda m: len(m["mountPath"])) if ms else None

    sources = {}
    for pod, sc in each_sidecar(b):
        for path in answer_file_paths(sc):
            layout = pod.where.split(":")[0]
            m = covering(sc, path)
            vol = volume(pod, m["name"]) if m else None
            src = (vol or {}).get("configMap") or (vol or {}).get("secret") or {}
            sources.setdefault(layout, {})[path] = src.get("name") or src.get("secretName")
            for c in airflow_containers(pod):
                if not mount_at(c, TOKEN_DIR):
                    continue
                problems += path_problems(pod, c, path, covering(c, path), sources[layout][path])
    for pod in b.pods:
        if sidecar_of(pod):
            continue
        layout = pod.where.split(":")[0]
        for path, src in (sources.get(layout) or {}).items():
            for c in airflow_containers(pod):
                problems += path_problems(pod, c, path, covering(c, path), src)
    return problems


def path_problems(pod, c, path, m, source_name) -> list[str]:
    w = f"{pod.where}: {c['name']}"
    if m is None:
        return [f"{w}: answers name {path}, which is not mounted in this container (libpq: file does not exist)"]
    vol = volume(pod, m["name"])
    if vol is None:
        return [f"{w}: volume {m['name']} is not defined"]
    src = vol.get("configMap") or vol.get("secret") or {}
    if (src.get("name") or src.get("secretName")) != source_name:
        return [f"{w}: {path} comes from {src} here, not from {source_name} as in the sidecar"]
    why = readable_by(pod, c, vol, m)
    return [f"{w}: {path}: {why}"] if why else []


def check_aws_only_in_sidecar(b: Bundle) -> list[str]:
    """Only the sidecar can get AWS credentials: in every pod whose service account has a role,
    eks.amazonaws.com/skip-containers names every other container (the pod identity webhook then
    injects neither IRSA nor Pod Identity into them); pods without the sidecar have no role."""
    problems = []
    for pod in b.pods:
        names = [c.get("name") for c in (pod.spec.get("initContainers") or []) + (pod.spec.get("containers") or [])]
        if not pod.aws_role:
            continue
        if not sidecar_of(pod):
            problems.append(f"{pod.where}: an AWS role on a pod without the sidecar: its code can call AWS")
            continue
        raw = (pod.metadata.get("annotations") or {}).get(SKIP_ANNOTATION)
        skipped = {n.strip() for n in str(raw or "").split(",") if n.strip()}
        if SIDECAR in skipped:
            problems.append(f"{pod.where}: {SKIP_ANNOTATION} names the sidecar: it would get no AWS credentials")
        for n in names:
            if n != SIDECAR and n not in skipped:
                problems.append(f"{pod.where}: container {n} is not in {SKIP_ANNOTATION}: it gets AWS credentials")
        for c in pod.spec.get("containers") or []:
            for e in c.get("env") or []:
                if e["name"].startswith("AWS_") and e["name"] not in ("AWS_REGION", "AWS_DEFAULT_REGION"):
                    problems.append(f"{pod.where}: {c['name']} sets {e['name']}")
    return problems


def check_pods_without_sidecar(b: Bundle) -> list[str]:
    """A task pod without the sidecar (Airflow 3 layout) has no AWS role, no backend setting and
    no token, and reaches the api-server's Execution API through a rendered Service."""
    problems = []
    for pod in b.pods:
        if sidecar_of(pod):
            continue
        name = pod.where.split(":")[0]
        docs = b.renders.get(name, [])
        if pod.aws_role:
            problems.append(f"{pod.where}: no sidecar but an AWS role")
        for c in airflow_containers(pod):
            env = env_of(c)
            for k in (*BACKEND_ENV, *BACKEND_ENV.values()):
                if k in env:
                    problems.append(f"{pod.where}: {c['name']} sets {k} without a sidecar in the pod")
            if mount_at(c, TOKEN_DIR):
                problems.append(f"{pod.where}: {c['name']} mounts the token without a sidecar")
            url = urlsplit(str(env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "")))
            svc = [d for d in docs if d.get("kind") == "Service" and d["metadata"]["name"] == url.hostname
                   and any(p.get("port") == url.port for p in d["spec"].get("ports") or [])]
            if not svc:
                problems.append(f"{pod.where}: {c['name']}: AIRFLOW__CORE__EXECUTION_API_SERVER_URL "
                                f"{env.get('AIRFLOW__CORE__EXECUTION_API_SERVER_URL')!r} is no rendered Service")
            else:
                target = svc[0]["spec"].get("selector") or {}
                backed = [p for p in b.pods if p.where.startswith(name + ":") and sidecar_of(p)
                          and target and all((p.metadata.get("labels") or {}).get(k) == v for k, v in target.items())]
                if not backed:
                    problems.append(f"{pod.where}: the Execution API Service {url.hostname} selects no pod with the sidecar")
    return problems


def check_admin_listener_dual_stack(b: Bundle) -> list[str]:
    """The admin listener is [::]:9798 (dual-stack; the sidecar falls back to 0.0.0.0 without
    IPv6) in every sidecar and in the image's default."""
    problems = []
    for pod, sc in each_sidecar(b):
        addr = env_of(sc).get("SIDECAR_ADMIN_LISTEN", f"[::]:{ADMIN_PORT}")
        if addr != f"[::]:{ADMIN_PORT}":
            problems.append(f"{pod.where}: SIDECAR_ADMIN_LISTEN is {addr!r}: IPv6-only clusters cannot probe it")
    if not re.search(r"SIDECAR_ADMIN_LISTEN=\[::\]:%d\b" % ADMIN_PORT, b.dockerfile):
        problems.append(f"Dockerfile: SIDECAR_ADMIN_LISTEN is not [::]:{ADMIN_PORT}")
    return problems


def json_type(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {str: "string", list: "array", dict: "object", float: "number", type(None): "null"}[type(v)]


def check_helm_values_match_chart(b: Bundle) -> list[str]:
    """Every key path of the Helm values exists, with that type, in the targeted chart's schema
    (chart_schema.py); no deprecated key, no key that no released chart has."""
    import chart_schema as cs

    declared = cs.declared()
    problems = []
    for fname, values in b.helms.items():
        def walk(node, path):
            if path in cs.DEPRECATED:
                problems.append(f"{fname}: {path} is deprecated since chart 1.21 (workers.celery/kubernetes)")
                return
            if path in cs.NOT_IN_ANY_RELEASE:
                problems.append(f"{fname}: {path} exists in no released chart")
                return
            if path and path not in declared:
                problems.append(f"{fname}: {path} is not declared by chart {cs.CHART_VERSION}'s values.schema.json")
                return
            if path:
                want, got = declared[path], json_type(node)
                if got != want:
                    problems.append(f"{fname}: {path} is {got}, chart {cs.CHART_VERSION} wants {want}")
                    return
                if any(path.endswith(m) for m in cs.STRING_MAPS):
                    for k, v in node.items():
                        if not isinstance(v, str):
                            problems.append(f"{fname}: {path}.{k} is {json_type(v)}, the chart wants string")
                    return
            if isinstance(node, dict) and (not path or declared.get(path) == "object"):
                for k, v in node.items():
                    walk(v, f"{path}.{k}" if path else k)

        walk(values, "")
    return problems


FILE_REFERENCE = re.compile(r"(?<![\w/.-])((?:deploy/|\.\./)[\w./-]*\w|README[\w-]*\.md)")


def check_file_references(b: Bundle) -> list[str]:
    """Every deploy/... path and README named in a comment of the deployment files exists."""
    problems = []
    files = [p for p in b.deploy.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json", "")
             and "tests" not in p.parts and "airflow" != p.parts[len(b.deploy.parts)]]
    for f in files:
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for ref in set(FILE_REFERENCE.findall(text)):
            if ref.startswith("deploy/"):
                target = b.deploy.parent / ref
                if not target.exists() and not (REPO_DIR / ref).exists():
                    problems.append(f"{f.relative_to(b.deploy)}: names {ref}, which does not exist")
            elif ref.startswith("README"):
                if not (REPO_DIR / ref).exists() and not (f.parent / ref).exists():
                    problems.append(f"{f.relative_to(b.deploy)}: names {ref}, which does not exist")
    return problems


def sidecar_metric_names() -> set[str]:
    """The series names src/telemetry/metrics.rs exposes (prefix sidecar_, OpenMetrics suffixes)."""
    src = (REPO_DIR / "src" / "telemetry" / "metrics.rs").read_text()
    names = set()
    for base in re.findall(r'registry\.register\(\s*"(\w+)"', src):
        full = f"sidecar_{base}"
        names |= {full, f"{full}_total", f"{full}_bucket", f"{full}_count", f"{full}_sum", f"{full}_info"}
    return names


def check_monitoring(b: Bundle) -> list[str]:
    """The PrometheusRule and the Grafana dashboard use only metrics the sidecar exposes, and the
    alerts cover what an operator must act on."""
    problems = []
    known = sidecar_metric_names()
    rules = [d for docs in b.renders.values() for d in docs if d.get("kind") == "PrometheusRule"]
    if not rules:
        return ["no overlay renders a PrometheusRule"]
    exprs = []
    for r in rules[:1]:
        for g in r["spec"]["groups"]:
            for rule in g["rules"]:
                exprs.append((rule.get("alert"), rule["expr"]))
    dashboards = [d for docs in b.renders.values() for d in docs if d.get("kind") == "ConfigMap"
                  and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    if not dashboards:
        problems.append("no Grafana dashboard ConfigMap (label grafana_dashboard=1)")
    for cm in dashboards[:1]:
        for key, text in cm["data"].items():
            try:
                dash = json.loads(text)
            except ValueError as e:
                problems.append(f"dashboard {key} is not JSON: {e}")
                continue
            for panel in dash.get("panels") or []:
                for t in panel.get("targets") or []:
                    exprs.append((f"dashboard panel {panel.get('title')!r}", t.get("expr", "")))
    for where, expr in exprs:
        for name in set(re.findall(r"\b(sidecar_\w+)", expr)):
            if name not in known:
                problems.append(f"{where}: {name} is not a metric of src/telemetry/metrics.rs")
    alert_text = "\n".join(e for w, e in exprs if not str(w).startswith("dashboard"))
    for what, needle in (
        ("rotation verdicts needing action", 'sidecar_rotation_checks_total{verdict=~"rotation_stuck'),
        ("stale serves", "sidecar_stale_serves_total"),
        ("AWS failing", 'sidecar_aws_calls_total{outcome!~"ok|not_found"}'),
        ("credentials rejected", 'outcome="credentials_rejected"'),
    ):
        if needle not in alert_text:
            problems.append(f"no alert on {what} ({needle})")
    return problems

CHECKS = [
    check_sidecar_is_native_init_container,
    check_probes_on_admin_port,
    check_sidecar_security_context,
    check_credential_api_stays_on_loopback,
    check_token_volume_in_memory,
    check_airflow_backend_config,
    check_token_readable_by_airflow,
    check_sidecar_resources,
    check_no_plaintext_secrets,
    check_sidecar_identical_everywhere,
    check_pod_template_wiring,
    check_service_accounts,
    check_metrics_scraping,
    check_iam_policy,
    check_helm_components,
    check_helm_pods_match_kubernetes_schema,
    check_dockerfile,
    check_answer_paths_mounted,
    check_aws_only_in_sidecar,
    check_pods_without_sidecar,
    check_admin_listener_dual_stack,
    check_helm_values_match_chart,
    check_file_references,
    check_monitoring,
]
