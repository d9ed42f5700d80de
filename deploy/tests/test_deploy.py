"""The deployment files keep the properties the sidecar's security and availability rely on.

The checks themselves live in deploychecks.py; test_mutations.py proves each one can fail.
"""

import pytest

import deploychecks


@pytest.mark.parametrize("check", deploychecks.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_property(bundle, check):
    problems = check(bundle)
    assert problems == [], f"{check.__doc__ or check.__name__}\n  " + "\n  ".join(problems)


def test_every_kind_of_pod_is_checked(bundle):
    """The checks above see both Deployments, both pod templates (with and without the sidecar)
    and every Helm component of both values files."""
    wheres = [p.where for p in bundle.pods]
    for name in ("deploy/k8s: Deployment/airflow-scheduler", "deploy/k8s: Deployment/airflow-api-server"):
        assert name in wheres, wheres
    templates = [p for p in bundle.pods if deploychecks.POD_TEMPLATE_KEY in p.where]
    assert any(deploychecks.sidecar_of(p) is None for p in templates if p.where.startswith("deploy/k8s:"))
    assert any(deploychecks.sidecar_of(p) for p in templates if p.where.startswith("overlays/per-pod-sidecar:"))
    for comp in deploychecks.AIRFLOW3_SIDECAR_COMPONENTS:
        assert f"{deploychecks.HELM_AIRFLOW3}: {comp}" in wheres
    for comp in deploychecks.HELM_COMPONENTS:
        assert f"helm/values-per-pod-sidecar.yaml: {comp}" in wheres
    assert set(bundle.renders) >= {
        "deploy/k8s", "overlays/pod-identity", "overlays/prometheus-operator", "overlays/per-pod-sidecar"}
