"""What the official Apache Airflow Helm chart's values.schema.json declares, for chart 1.22.0,
about every key path that deploy/helm uses (and the deprecated or non-existent ones to refuse).

Written for this project from the chart's schema, templates and release notes (chart/ in
apache/airflow: values.schema.json, files/pod-template-file.kubernetes-helm-yaml,
templates/*/ *-deployment.yaml; release notes 1.20.0, 1.21.0 and 1.22.0). Nothing here is
copied from the chart: it is a table of JSON types per key path. deploychecks
check_helm_values_match_chart walks the values files and refuses any key path not listed here,
any value whose type the schema would refuse, and any deprecated key.
"""

CHART_VERSION = "1.22.0"

# Top level: the schema has additionalProperties: false, so an unknown top-level key (an anchors
# section, say) fails `helm install` validation.
TOP_LEVEL = {
    "defaultAirflowRepository": "string",
    "defaultAirflowTag": "string",
    "airflowVersion": "string",
    "uid": "integer",
    "gid": "integer",
}

# Keys each component section declares (the component objects are additionalProperties: false).
# Arrays hold Kubernetes objects (Container, Volume, VolumeMount, EnvVar) that the schema checks
# against the Kubernetes definitions; deploychecks validates those with kubernetes-validate.
COMPONENT_KEYS = {
    "extraInitContainers": "array",
    "extraContainers": "array",
    "extraVolumes": "array",
    "extraVolumeMounts": "array",
    "env": "array",
    "labels": "object",  # additionalProperties: {type: string}
    "podAnnotations": "object",  # additionalProperties: {type: string}
    "serviceAccount": "object",
    "serviceAccount.annotations": "object",  # additionalProperties: {type: string}
}
COMPONENTS = (
    "scheduler",
    "triggerer",
    "dagProcessor",
    "apiServer",
    "webserver",
    "workers.celery",
    "workers.kubernetes",
)
# Objects whose values the schema types as strings.
STRING_MAPS = ("labels", "podAnnotations", "serviceAccount.annotations")

# Deprecated since chart 1.21 in favour of workers.celery.X / workers.kubernetes.X; the pod
# template reads `workers.kubernetes.X | default workers.X`, so a user value under the new key
# silently replaces ours under the old one.
DEPRECATED = {
    f"workers.{k}"
    for k in (
        "extraInitContainers",
        "extraContainers",
        "extraVolumes",
        "extraVolumeMounts",
        "env",
        "podAnnotations",
        "serviceAccount",
        "labels",
    )
}
# Keys that no released chart has (only on the chart's main branch, unreleased).
NOT_IN_ANY_RELEASE = {"workers.useWorkerDedicatedServiceAccounts"}


def declared() -> dict[str, str]:
    """Every key path deploy/helm may use -> its JSON type."""
    out = dict(TOP_LEVEL)
    for comp in COMPONENTS:
        out[comp] = "object"
        for key, typ in COMPONENT_KEYS.items():
            out[f"{comp}.{key}"] = typ
    out["workers"] = "object"
    return out
