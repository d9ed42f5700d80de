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
POD_TEMPLATE = "k8s/base/pod_template_file.yaml"  # Airflow 3: task pods without the sidecar
PP_TEMPLATE = "k8s/components/per-pod-sidecar/pod_template_file.yaml"
SERVICE_ACCOUNTS = "k8s/base/serviceaccount.yaml"
HELM = dc.HELM_AIRFLOW3
HELM_PP = "helm/values-per-pod-sidecar.yaml"
IAM = "k8s/base/iam-policy.json"
MONITORING = "k8s/components/prometheus-operator/"

# (id, check, file, old snippet or None to append, new snippet)
MUTATIONS = [
    # native sidecar
    ("deployment-sidecar-without-restartPolicy", dc.check_sidecar_is_native_init_container,
     DEPLOYMENT, "          restartPolicy: Always\n", ""),
    ("helm-sidecar-restartPolicy-never", dc.check_sidecar_is_native_init_container,
     HELM, "      restartPolicy: Always\n", "      restartPolicy: Never\n"),
    ("api-server-without-sidecar", dc.check_sidecar_is_native_init_container,
     "k8s/base/api-server-deployment.yaml", "        - name: airflow-secrets-sidecar\n", "        - name: other\n"),
    # probes
    ("readiness-on-livez", dc.check_probes_on_admin_port,
     PP_TEMPLATE, "          path: /readyz\n", "          path: /livez\n"),
    ("liveness-on-readyz", dc.check_probes_on_admin_port,
     DEPLOYMENT, "          livenessProbe:\n            httpGet:\n              path: /livez\n",
     "          livenessProbe:\n            httpGet:\n              path: /readyz\n"),
    ("startup-probe-on-other-port", dc.check_probes_on_admin_port,
     HELM, "          path: /livez\n          port: admin\n", "          path: /livez\n          port: 8080\n"),
    ("no-readiness-probe", dc.check_probes_on_admin_port,
     HELM, "      readinessProbe:\n", "      x-readinessProbe:\n"),
    # securityContext
    ("writable-root-fs", dc.check_sidecar_security_context,
     PP_TEMPLATE, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
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
     PP_TEMPLATE, "          containerPort: 9798\n", "          containerPort: 9798\n        - containerPort: 9797\n"),
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
     PP_TEMPLATE, "          mountPath: /var/run/airflow-secrets-sidecar\n          readOnly: true\n",
     "          mountPath: /var/run/airflow-secrets-sidecar\n"),
    ("token-not-created", dc.check_token_volume_in_memory,
     HELM, '        - name: SIDECAR_TOKEN_CREATE\n          value: "true"\n',
     '        - name: SIDECAR_TOKEN_CREATE\n          value: "false"\n'),
    # Airflow backend settings
    ("workers-backend-url-off-loopback", dc.check_airflow_backend_config,
     PP_TEMPLATE, '- name: AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS\n          value: \'{"url": "http://127.0.0.1:9797"',
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
     PP_TEMPLATE, "          cpu: 500m\n          memory: 64Mi\n", "          cpu: 500m\n"),
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
     POD_TEMPLATE, "    kubectl.kubernetes.io/default-container: base\n",
     "    kubectl.kubernetes.io/default-container: base\n    note: AKIAIOSFODNN7EXAMPLE\n"),
    # drift between the copies of the sidecar
    ("pod-template-sidecar-drifts", dc.check_sidecar_identical_everywhere,
     PP_TEMPLATE, "airflow-secrets-sidecar:0.1.0", "airflow-secrets-sidecar:0.0.9"),
    # pod template wiring
    ("pod-template-main-not-base", dc.check_pod_template_wiring,
     POD_TEMPLATE, "    - name: base\n", "    - name: worker\n"),
    ("pod-template-path-wrong", dc.check_pod_template_wiring,
     DEPLOYMENT, "value: /opt/airflow/pod_templates/pod_template_file.yaml",
     "value: /opt/airflow/pod_template_file.yaml"),
    # service accounts
    ("irsa-annotation-invalid", dc.check_service_accounts,
     SERVICE_ACCOUNTS, "role/airflow-secrets-sidecar\n---", "role/\n---"),
    ("pod-identity-keeps-irsa", dc.check_service_accounts,
     "k8s/overlays/pod-identity/kustomization.yaml", "components:\n  - ../../components/pod-identity\n", ""),
    ("helm-triggerer-without-irsa", dc.check_service_accounts,
     HELM, "  serviceAccount:\n    annotations: *irsaAnnotations\n\ndagProcessor:", "\ndagProcessor:"),
    # metrics
    ("scrape-annotation-wrong-port", dc.check_metrics_scraping,
     PP_TEMPLATE, 'prometheus.io/port: "9798"', 'prometheus.io/port: "9797"'),
    ("helm-without-scrape-label", dc.check_metrics_scraping,
     HELM, '    airflow-secrets-sidecar/enabled: "true"\n', '    airflow-secrets-sidecar/scrape: "true"\n'),
    ("podmonitor-wrong-path", dc.check_metrics_scraping,
     MONITORING + "podmonitor.yaml", "path: /metrics", "path: /stats"),
    ("podmonitor-selects-nothing", dc.check_metrics_scraping,
     MONITORING + "podmonitor.yaml", '      airflow-secrets-sidecar/enabled: "true"\n',
     '      airflow-secrets-sidecar/enabled: "yes"\n'),
    ("scraping-through-a-service", dc.check_metrics_scraping,
     MONITORING + "podmonitor.yaml", None,
     '---\napiVersion: v1\nkind: Service\nmetadata:\n  name: m\nspec:\n  clusterIP: None\n  selector:\n'
     '    airflow-secrets-sidecar/enabled: "true"\n  ports:\n    - port: 9798\n'),
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
    ("helm-airflow3-workers-with-sidecar", dc.check_helm_components,
     HELM, None, "workers:\n  kubernetes:\n    extraInitContainers: *sidecarInitContainers\n"),
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
    # the CA bundle reaches every container that reads answers
    ("scheduler-ca-elsewhere", dc.check_answer_paths_mounted,
     DEPLOYMENT, "(sslmode verify-full).\n            - name: rds-ca\n              mountPath: /etc/airflow-secrets-sidecar/rds-ca\n",
     "(sslmode verify-full).\n            - name: rds-ca\n              mountPath: /etc/ssl/rds-ca\n"),
    ("helm-airflow-without-ca", dc.check_answer_paths_mounted,
     HELM, "    - name: rds-ca\n      mountPath: /etc/airflow-secrets-sidecar/rds-ca\n",
     "    - name: rds-ca\n      mountPath: /opt/ca\n"),
    ("task-pod-without-ca", dc.check_answer_paths_mounted,
     POD_TEMPLATE, "          mountPath: /etc/airflow-secrets-sidecar/rds-ca\n", "          mountPath: /opt/ca\n"),
    ("ca-unreadable-by-airflow", dc.check_answer_paths_mounted,
     PP_TEMPLATE, "      configMap:\n        name: rds-ca-bundle\n",
     "      configMap:\n        name: rds-ca-bundle\n        defaultMode: 0400\n"),
    ("answer-path-override-not-mounted", dc.check_answer_paths_mounted,
     DEPLOYMENT, "            - name: SIDECAR_LOG_FORMAT\n",
     "            - name: SIDECAR_ANSWER_SSLROOTCERT\n              value: /etc/airflow/ca.pem\n"
     "            - name: SIDECAR_LOG_FORMAT\n"),
    # AWS credentials only in the sidecar
    ("skip-containers-missing", dc.check_aws_only_in_sidecar,
     DEPLOYMENT, "        eks.amazonaws.com/skip-containers: scheduler\n", ""),
    ("helm-skip-names-sidecar-not-scheduler", dc.check_aws_only_in_sidecar,
     HELM, "eks.amazonaws.com/skip-containers: wait-for-airflow-migrations,git-sync-init,scheduler,",
     "eks.amazonaws.com/skip-containers: airflow-secrets-sidecar,wait-for-airflow-migrations,git-sync-init,"),
    ("task-pods-get-a-role", dc.check_aws_only_in_sidecar,
     SERVICE_ACCOUNTS, "  name: airflow-worker\n",
     "  name: airflow-worker\n  annotations:\n    eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/x\n"),
    # task pods without the sidecar
    ("per-pod-template-loses-sidecar", dc.check_pods_without_sidecar,
     PP_TEMPLATE, "    - name: airflow-secrets-sidecar\n", "    - name: some-other-sidecar\n"),
    ("task-pod-sets-backend", dc.check_pods_without_sidecar,
     POD_TEMPLATE, "        - name: AIRFLOW__CORE__EXECUTION_API_SERVER_URL\n",
     "        - name: AIRFLOW__SECRETS__BACKEND\n          value: x\n        - name: AIRFLOW__CORE__EXECUTION_API_SERVER_URL\n"),
    ("execution-api-url-wrong", dc.check_pods_without_sidecar,
     POD_TEMPLATE, "http://airflow-api-server:8080/execution/", "http://airflow-webserver:8080/execution/"),
    # dual-stack admin listener
    ("admin-ipv4-only", dc.check_admin_listener_dual_stack,
     DEPLOYMENT, 'value: "[::]:9798"', 'value: "0.0.0.0:9798"'),
    ("dockerfile-admin-ipv4-only", dc.check_admin_listener_dual_stack,
     "Dockerfile", "SIDECAR_ADMIN_LISTEN=[::]:9798", "SIDECAR_ADMIN_LISTEN=0.0.0.0:9798"),
    # Helm values against the chart's schema
    ("helm-deprecated-workers-key", dc.check_helm_values_match_chart,
     HELM_PP, "workers:\n  # CeleryExecutor workers.\n", "workers:\n  extraVolumes: []\n  # CeleryExecutor workers.\n"),
    ("helm-unreleased-key", dc.check_helm_values_match_chart,
     HELM_PP, "workers:\n", "workers:\n  useWorkerDedicatedServiceAccounts: true\n"),
    ("helm-unknown-top-level-key", dc.check_helm_values_match_chart,
     HELM, "uid: 50000\n", "sidecarAnchors: {}\nuid: 50000\n"),
    ("helm-wrong-type", dc.check_helm_values_match_chart, HELM, "uid: 50000\n", 'uid: "50000"\n'),
    ("helm-annotation-not-string", dc.check_helm_values_match_chart,
     HELM, '    prometheus.io/port: "9798"\n', "    prometheus.io/port: 9798\n"),
    # dangling file references
    ("dangling-reference", dc.check_file_references, DEPLOYMENT, None, "# See deploy/README-deploy.md\n"),
    # alerts and dashboard
    ("alert-on-unknown-metric", dc.check_monitoring,
     MONITORING + "prometheusrule.yaml", "sidecar_stale_serves_total[10m]", "sidecar_stale_total[10m]"),
    ("dashboard-unknown-metric", dc.check_monitoring,
     MONITORING + "airflow-secrets-sidecar-dashboard.json", "sidecar_cache_requests_total", "sidecar_cache_total"),
    ("no-rotation-alert", dc.check_monitoring,
     MONITORING + "prometheusrule.yaml", 'verdict=~"rotation_stuck', 'verdict=~"stuck_rotation'),
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
