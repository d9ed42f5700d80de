"""Every check in deploychecks.py can fail: break a copy of deploy/ in one place, see it caught.

Each mutation replaces the first occurrence of a snippet in one file (or appends to it) in a
temporary copy of deploy/k8s, deploy/helm and deploy/Dockerfile, then runs one check on the
copy. The snippet must exist, so a mutation that no longer applies fails loudly instead of
passing silently.
"""

import shutil

import pytest

import deploychecks as dc

DEPLOYMENT = "k8s/base/scheduler-deployment.yaml"
POD_TEMPLATE = "k8s/base/pod_template_file.yaml"
HELM = dc.HELM_VALUES
IAM = "k8s/base/iam-policy.json"

# (id, check, file, old snippet or None to append, new snippet)
MUTATIONS = [
    # native sidecar
    ("deployment-sidecar-without-restartPolicy", dc.check_sidecar_is_native_init_container,
     DEPLOYMENT, "          restartPolicy: Always\n", ""),
    ("helm-sidecar-restartPolicy-never", dc.check_sidecar_is_native_init_container,
     HELM, "      restartPolicy: Always\n", "      restartPolicy: Never\n"),
    ("pod-template-without-sidecar", dc.check_sidecar_is_native_init_container,
     POD_TEMPLATE, "    - name: airflow-secrets-sidecar\n", "    - name: some-other-sidecar\n"),
    # probes
    ("readiness-on-livez", dc.check_probes_on_admin_port,
     POD_TEMPLATE, "          path: /readyz\n", "          path: /livez\n"),
    ("liveness-on-readyz", dc.check_probes_on_admin_port,
     DEPLOYMENT, "          livenessProbe:\n            httpGet:\n              path: /livez\n",
     "          livenessProbe:\n            httpGet:\n              path: /readyz\n"),
    ("startup-probe-on-other-port", dc.check_probes_on_admin_port,
     HELM, "          path: /livez\n          port: admin\n", "          path: /livez\n          port: 8080\n"),
    ("no-readiness-probe", dc.check_probes_on_admin_port,
     HELM, "      readinessProbe:\n", "      x-readinessProbe:\n"),
    # securityContext
    ("writable-root-fs", dc.check_sidecar_security_context,
     POD_TEMPLATE, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
    ("privilege-escalation", dc.check_sidecar_security_context,
     DEPLOYMENT, "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"),
    ("capabilities-not-dropped", dc.check_sidecar_security_context,
     HELM, 'drop: ["ALL"]', 'drop: ["NET_RAW"]'),
    ("root-allowed", dc.check_sidecar_security_context,
     HELM, "runAsNonRoot: true", "runAsNonRoot: false"),
    ("seccomp-unconfined", dc.check_sidecar_security_context,
     HELM, "          type: RuntimeDefault\n", "          type: Unconfined\n"),
    # loopback
    ("credential-api-on-all-interfaces", dc.check_credential_api_stays_on_loopback,
     DEPLOYMENT, 'value: "127.0.0.1:9797"', 'value: "0.0.0.0:9797"'),
    ("credential-port-exposed", dc.check_credential_api_stays_on_loopback,
     POD_TEMPLATE, "          containerPort: 9798\n", "          containerPort: 9798\n        - containerPort: 9797\n"),
    ("host-network", dc.check_credential_api_stays_on_loopback,
     DEPLOYMENT, "      serviceAccountName: airflow-scheduler\n",
     "      serviceAccountName: airflow-scheduler\n      hostNetwork: true\n"),
    # token volume
    ("token-volume-on-disk", dc.check_token_volume_in_memory,
     DEPLOYMENT, "            medium: Memory\n", '            medium: ""\n'),
    ("helm-airflow-without-token-mount", dc.check_token_volume_in_memory,
     HELM, "  extraVolumeMounts: &sidecarVolumeMounts\n    - name: sidecar-token\n      mountPath: /var/run/airflow-secrets-sidecar\n",
     "  extraVolumeMounts: &sidecarVolumeMounts\n    - name: sidecar-token\n      mountPath: /tmp/elsewhere\n"),
    ("airflow-token-mount-writable", dc.check_token_volume_in_memory,
     POD_TEMPLATE, "          mountPath: /var/run/airflow-secrets-sidecar\n          readOnly: true\n",
     "          mountPath: /var/run/airflow-secrets-sidecar\n"),
    ("token-not-created", dc.check_token_volume_in_memory,
     HELM, '        - name: SIDECAR_TOKEN_CREATE\n          value: "true"\n',
     '        - name: SIDECAR_TOKEN_CREATE\n          value: "false"\n'),
    # Airflow backend settings
    ("workers-backend-url-off-loopback", dc.check_airflow_backend_config,
     POD_TEMPLATE, '- name: AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS\n          value: \'{"url": "http://127.0.0.1:9797"',
     '- name: AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS\n          value: \'{"url": "http://10.0.0.5:9797"'),
    ("helm-without-secrets-backend", dc.check_airflow_backend_config,
     HELM, "    - name: AIRFLOW__SECRETS__BACKEND\n", "    - name: AIRFLOW__SECRETS__BACKEND_DISABLED\n"),
    # token readable by Airflow
    ("fsgroup-not-airflow-group", dc.check_token_readable_by_airflow,
     DEPLOYMENT, "        fsGroup: 0\n", "        fsGroup: 65532\n"),
    ("helm-chart-gid-changed", dc.check_token_readable_by_airflow,
     HELM, "uid: 50000\n", "uid: 50000\nsecurityContexts:\n  pod:\n    runAsUser: 50000\n"),
    # resources
    ("no-memory-limit", dc.check_sidecar_resources,
     POD_TEMPLATE, "          cpu: 500m\n          memory: 128Mi\n", "          cpu: 500m\n"),
    ("no-cpu-request", dc.check_sidecar_resources,
     HELM, "          cpu: 10m\n", ""),
    # no plaintext secrets
    ("password-env-literal", dc.check_no_plaintext_secrets,
     DEPLOYMENT, "            - name: SIDECAR_LOG_FORMAT\n              value: json\n",
     "            - name: SIDECAR_DB_PASSWORD\n              value: hunter2\n"),
    ("uri-with-password", dc.check_no_plaintext_secrets,
     HELM, "value: airflow/variables", "value: postgresql://airflow:s3cret@db.example.com:5432/airflow"),
    ("secret-object-with-values", dc.check_no_plaintext_secrets,
     "k8s/base/rbac.yaml", None,
     "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: leaked\nstringData:\n  connection: hunter2\n"),
    ("aws-key-in-annotation", dc.check_no_plaintext_secrets,
     POD_TEMPLATE, "    prometheus.io/path: /metrics\n",
     "    prometheus.io/path: /metrics\n    note: AKIAIOSFODNN7EXAMPLE\n"),
    # drift between the copies of the sidecar
    ("pod-template-sidecar-drifts", dc.check_sidecar_identical_everywhere,
     POD_TEMPLATE, "airflow-secrets-sidecar:0.1.0", "airflow-secrets-sidecar:0.0.9"),
    # pod template wiring
    ("pod-template-main-not-base", dc.check_pod_template_wiring,
     POD_TEMPLATE, "    - name: base\n", "    - name: worker\n"),
    ("pod-template-path-wrong", dc.check_pod_template_wiring,
     DEPLOYMENT, "value: /opt/airflow/pod_templates/pod_template_file.yaml",
     "value: /opt/airflow/pod_template_file.yaml"),
    # service accounts
    ("irsa-annotation-invalid", dc.check_service_accounts,
     "k8s/base/serviceaccount.yaml", "role/airflow-secrets-sidecar\n---", "role/\n---"),
    ("pod-identity-keeps-irsa", dc.check_service_accounts,
     "k8s/overlays/pod-identity/kustomization.yaml", "components:\n  - ../../components/pod-identity\n", ""),
    ("helm-scheduler-without-irsa", dc.check_service_accounts,
     HELM, "  serviceAccount:\n    annotations: *irsaAnnotations\n\ntriggerer:", "\ntriggerer:"),
    # metrics
    ("scrape-annotation-wrong-port", dc.check_metrics_scraping,
     POD_TEMPLATE, 'prometheus.io/port: "9798"', 'prometheus.io/port: "9797"'),
    ("servicemonitor-wrong-path", dc.check_metrics_scraping,
     "k8s/components/prometheus-operator/servicemonitor.yaml", "path: /metrics", "path: /stats"),
    ("metrics-service-selects-nothing", dc.check_metrics_scraping,
     "k8s/components/prometheus-operator/service.yaml", '    airflow-secrets-sidecar/enabled: "true"\n',
     '    airflow-secrets-sidecar/enabled: "yes"\n'),
    # IAM policy
    ("iam-extra-action", dc.check_iam_policy,
     IAM, '"secretsmanager:DescribeSecret"', '"secretsmanager:DescribeSecret", "secretsmanager:ListSecrets"'),
    ("iam-kms-not-via-secretsmanager", dc.check_iam_policy,
     IAM, '"kms:ViaService": "secretsmanager.*.amazonaws.com"', '"kms:ViaService": "s3.*.amazonaws.com"'),
    ("iam-any-secret", dc.check_iam_policy,
     IAM, '"arn:aws:secretsmanager:*:*:secret:airflow/*"', '"*"'),
    # Helm components
    ("helm-apiserver-without-sidecar", dc.check_helm_components,
     HELM, "apiServer:\n  extraInitContainers: *sidecarInitContainers\n", "apiServer:\n"),
    ("helm-sidecar-invalid-field", dc.check_helm_pods_match_kubernetes_schema,
     HELM, "      imagePullPolicy: IfNotPresent\n", "      imagePullPolicy: IfNotPresent\n      restartPolicyX: Always\n"),
    # Dockerfile
    ("dockerfile-runs-as-root", dc.check_dockerfile, "Dockerfile", "USER 65532:65532", "USER root"),
    ("dockerfile-unlocked-build", dc.check_dockerfile,
     "Dockerfile", "cargo build --release --locked", "cargo build --release"),
    ("dockerfile-shell-entrypoint", dc.check_dockerfile,
     "Dockerfile", 'ENTRYPOINT ["/usr/local/bin/airflow-secrets-sidecar"]',
     "ENTRYPOINT /usr/local/bin/airflow-secrets-sidecar"),
    ("dockerfile-final-stage-debian", dc.check_dockerfile,
     "Dockerfile", "FROM gcr.io/distroless/cc-debian12:nonroot AS runtime", "FROM debian:bookworm-slim AS runtime"),
]


@pytest.fixture
def deploy_copy(tmp_path):
    dst = tmp_path / "deploy"
    for part in ("k8s", "helm"):
        shutil.copytree(dc.DEPLOY_DIR / part, dst / part)
    shutil.copy(dc.DEPLOY_DIR / "Dockerfile", dst / "Dockerfile")
    return dst


def test_unmutated_copy_passes(deploy_copy):
    b = dc.load_bundle(deploy_copy)
    assert {c.__name__: c(b) for c in dc.CHECKS} == {c.__name__: [] for c in dc.CHECKS}


def test_every_check_has_a_mutation():
    assert {m[1] for m in MUTATIONS} == set(dc.CHECKS)


@pytest.mark.parametrize(("check", "path", "old", "new"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_mutation_is_caught(deploy_copy, check, path, old, new):
    f = deploy_copy / path
    text = f.read_text()
    if old is None:
        text += new
    else:
        assert old in text, f"mutation no longer applies: {old!r} not in {path}"
        text = text.replace(old, new, 1)
    f.write_text(text)
    problems = check(dc.load_bundle(deploy_copy))
    assert problems, f"{check.__name__} did not notice the mutation of {path}"
