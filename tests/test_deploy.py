"""deploy/selchat.service and docs/deploy.md: the unit is one systemd accepts, with the
readiness protocol, a reload and the hardening; the nginx configuration the docs show is the
one tests/test_nginx.py runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from test_nginx import nginx_config

UNIT = ROOT / "deploy" / "selchat.service"
DEPLOY = ROOT / "docs" / "deploy.md"


def _settings(text: str) -> dict:
    found: dict = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_says_notify_reload_user_and_hardening() -> None:
    settings = _settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["User"] == ["selchat"] and settings["StateDirectory"] == ["selchat"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")):
        assert settings[key] == [value], key
    assert "--config /etc/selchat/selchat.toml" in settings["ExecStart"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit_and_rates_it_safe() -> None:
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                if line.strip() and "selchat-server is not executable" not in line]
    assert not problems, problems
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                              capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for selchat\.service: ([0-9.]+)", security.stdout)
    if match is None:
        pytest.skip("this systemd-analyze cannot rate a unit file offline")
    assert float(match.group(1)) <= 2.0, security.stdout[-2000:]


def test_the_docs_show_the_nginx_configuration_the_tests_run() -> None:
    docs = DEPLOY.read_text()
    tested = nginx_config(Path("/tmp/x"), web=8080, https=443, cert=Path("c"), key=Path("k"),
                          streams={9090: 9090})
    directives = {line.strip() for line in tested.splitlines()
                  if line.strip().startswith(("proxy_", "map ", "default upgrade", "''", "listen 127"))}
    for directive in sorted(directives):
        if directive.startswith(("listen 127", "proxy_pass 127", "proxy_temp_path")):
            continue  # (the tests' own ports and temporary folder)
        assert directive in docs, directive
