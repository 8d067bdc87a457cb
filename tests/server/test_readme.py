"""The README's shell examples, run as written against the test server.

Only what cannot differ on a test machine is rewritten: the addresses (free
ports), curl's --fail (an HTTP error must fail the test, not land in
out.png) and the step count and size (2 steps at 32 px instead of 100 at
256 px, so the CPU suite stays fast). The example images are the
README's own, full size: a shrunk copy once hid that the JSON example passed
their base64 to curl as one argument, past Linux's 128 KiB limit on one.
`make` and `docker` blocks are covered by `make demo` / `make test` and the
Dockerfile lint; lines that need a
Kubernetes cluster (`kubectl`) by tests/scripts/test_deploy.py, which validates
the manifests they apply and runs `manage.py k8s-secret`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.server


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(("make ", "docker ")) and "kubectl " not in line:
                commands.append(line)
    return commands


def test_readme_has_the_examples_we_run():
    cmds = readme_commands()
    assert any("curl" in c and "-F content=@" in c for c in cmds)
    assert any("application/json" in c for c in cmds)
    assert any("manage.py scale 2" in c for c in cmds)
    assert any("token?type=inference" in c for c in cmds)
    assert any("stylize.py" in c and "--local" in c for c in cmds)
    assert any("8082/metrics" in c and "grep" in c for c in cmds)


def _rewrite(cmd: str, server, examples: Path) -> str:
    mgmt = f"--management {server.management} --inference {server.inference}"
    cmd = cmd.replace("http://127.0.0.1:8080", server.inference)
    cmd = cmd.replace("http://127.0.0.1:8081", server.management)
    cmd = cmd.replace("http://127.0.0.1:8082", server.metrics)
    cmd = cmd.replace("curl ", "curl --fail ")  # an HTTP error fails the script (set -e)
    cmd = cmd.replace(".venv/bin/python", sys.executable)
    cmd = cmd.replace("scripts/manage.py", f"{ROOT}/scripts/manage.py {mgmt}")
    cmd = cmd.replace("scripts/stylize.py", f"{ROOT}/scripts/stylize.py --server {server.inference}")
    cmd = cmd.replace("examples/", f"{examples}/")
    cmd = cmd.replace("-F steps=100 -F max_size=256", "-F steps=2 -F max_size=32")
    cmd = cmd.replace('"steps": 100, "max_size": 256', '"steps": 2, "max_size": 32')
    cmd = cmd.replace("--steps 100 --max-size 256", "--steps 2 --max-size 32")
    if "--local" in cmd:
        cmd += " --steps 2 --max-size 32"
    return cmd


def test_readme_commands_work(server, tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("tubingen.jpg", "starry_night.jpg"):
        shutil.copyfile(ROOT / "examples" / name, examples / name)
    script = "set -euo pipefail\n" + "\n".join(_rewrite(c, server, examples) for c in readme_commands())
    try:
        p = subprocess.run(["bash", "-c", script], cwd=server.workdir, env=server.env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out = Image.open(server.workdir / "out.png")
        assert out.format == "PNG" and max(out.size) == 32
        assert len(server.describe()["workers"]) == 2  # the README scaled to 2
    finally:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "manage.py"), "--management", server.management,
                        "--key-file", str(server.key_file), "scale", "1"], env=server.env, timeout=300)
