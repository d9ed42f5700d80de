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
    """The checks above see the Deployment, the pod template and all five Helm components."""
    wheres = [p.where for p in bundle.pods]
    assert any("Deployment/airflow-scheduler" in w for w in wheres), wheres
    assert any(deploychecks.POD_TEMPLATE_KEY in w for w in wheres), wheres
    for comp in deploychecks.HELM_COMPONENTS:
        assert f"helm: {comp}" in wheres
    assert set(bundle.renders) >= {"deploy/k8s", "overlays/pod-identity", "overlays/prometheus-operator"}
