"""Security settings (docs/security.md): no pickle anywhere a user could feed us a file or a message,
safetensors-only weights, secrets never in recipes, Redis password and TLS honoured (a real TLS
handshake with a self-signed certificate, through a TLS-terminating proxy in front of a real
redis-server), services bound to 127.0.0.1 by default."""

from __future__ import annotations

import ast
import datetime
import ipaddress
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
import torch
from test_reward_servers import ServerProc

from diffrl.config import ConfigError, describe, load_config
from diffrl.embedded_redis import EmbeddedRedis, connect, redact_url
from diffrl.proto import experience_pb2
from diffrl.proto.bus import ExperienceConsumer, ExperienceProducer, ledger_snapshot
from diffrl.proto.codec import tensor_to_proto
from diffrl.reward_servers.config import RewardServerConfig
from diffrl.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["diffrl", "proto", "models", "actors", "learner", "reward_servers", "benchmarks"]


def sources() -> list[Path]:
    return [p for pkg in PACKAGES if (REPO / pkg).is_dir() for p in sorted((REPO / pkg).rglob("*.py"))
            if not p.name.endswith("_pb2.py")]


# ----------------------------------------------------------------------------- no pickle
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_no_module_unpickles_or_imports_pickle():
    """No import of a pickle-family module; torch.load only with weights_only=True; no np.load with
    allow_pickle=True; no yaml.load without a safe loader; no pandas read_pickle. (DeepSpeed's own
    engine checkpoint uses torch.save/torch.load inside DeepSpeed: documented in learner/checkpoint.py
    and docs/security.md as files only the learner itself reads back.)"""
    problems = []
    for path in sources():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{rel}:{node.lineno} import {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{rel}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = _call_name(node)
                wo = _kw(node, "weights_only")
                if name.endswith("torch.load") and not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
                ap = _kw(node, "allow_pickle")
                if name.endswith("load") and isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{rel}:{node.lineno} {name}(allow_pickle=True)")
                if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and "Safe" not in ast.unparse(node):
                    problems.append(f"{rel}:{node.lineno} {name} without a safe loader")
                if name.endswith("read_pickle") or name.endswith("load_checkpoint") and "engine" not in name:
                    problems.append(f"{rel}:{node.lineno} {name}")
    assert not problems, "\n".join(problems)
    assert "pickle" in (REPO / "learner/checkpoint.py").read_text()  # the DeepSpeed exception is documented
    assert "DeepSpeed" in (REPO / "docs/security.md").read_text()


def test_weights_load_from_safetensors_only(tmp_path):
    """A model folder whose weights are only a pickled .bin is refused, not unpickled."""
    from safetensors.torch import load_file

    from diffrl.models.adapter import FlowModel
    from diffrl.models.tiny_sd3 import TinySD3Arch, build_tiny_sd3

    pipe = build_tiny_sd3(TinySD3Arch(num_layers=1, num_heads=2, head_dim=16, text_hidden=32, text_projection=16),
                          tmp_path / "work")
    pipe.save_pretrained(str(tmp_path / "model"))
    assert FlowModel.from_pretrained(str(tmp_path / "model")).transformer is not None
    folder = tmp_path / "model" / "transformer"
    weights = next(folder.glob("*.safetensors"))
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")  # a pickle
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        FlowModel.from_pretrained(str(tmp_path / "model"))


# ----------------------------------------------------------------------------- secrets
def test_no_config_key_holds_a_secret_and_recipes_cannot_carry_one(tmp_path):
    from diffrl.reward_servers.cli import serve_schema

    for schema in (TrainConfig, serve_schema("shapes")):
        keys = [row[0] for row in describe(schema)]
        secret = [k for k in keys if re.search(r"(token|password|secret|api_key)$", k.split(".")[-1])]
        assert not secret, secret  # token_file (a path) is fine
    for override, field in (("rewards.0.token=abc", "rewards.0.token"), ("redis.password=abc", "redis.password")):
        with pytest.raises(ConfigError) as err:
            load_config(TrainConfig, None, [override])
        assert err.value.field == field
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rewards:\n  - name: shapes\n    token: s3cret\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, recipe)
    assert err.value.field == "rewards.0.token" and "s3cret" not in str(err.value)
    r = subprocess.run([sys.executable, "-m", "diffrl.reward_servers", "serve", "shapes", "--port", "0", "token=abc"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "token" in r.stderr
    # passwords in URLs never reach logs or run-folder files in clear
    assert redact_url("redis://:pa ss@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h:6380/0?ssl_cert_reqs=required") == \
        "rediss://user:***@h:6380/0?ssl_cert_reqs=required"
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["redis.url=http://:hunter2@h:6379"])
    assert err.value.field == "redis.url" and "hunter2" not in str(err.value)


# ----------------------------------------------------------------------------- binds
def listening(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_services_bind_loopback_by_default():
    from diffrl.learner.ray_learner import LearnerSpec

    assert RewardServerConfig().host == "127.0.0.1"
    assert LearnerSpec().master_addr == "127.0.0.1"
    server = ServerProc("compressibility")  # no --host: the config default
    try:
        server.wait_ready()
        assert listening(server.proc.pid) == {"127.0.0.1"}
    finally:
        server.stop()
    with EmbeddedRedis(port=0) as r:
        assert listening(r.pid) == {"127.0.0.1"}
        assert oct(r.socket_path.stat().st_mode & 0o777) == "0o700"  # unix socket: owner only


# ----------------------------------------------------------------------------- Redis password + TLS
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsProxy:
    """TLS termination in front of a plain redis-server (what stunnel or a managed Redis does): the
    client speaks TLS to the proxy, the proxy speaks plain RESP to the real server."""

    def __init__(self, cert: Path, key: Path, upstream_port: int):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.upstream = upstream_port
        self.handshakes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.close()
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(up, tls), daemon=True).start()
        pipe(tls, up)

    def close(self) -> None:
        self.sock.close()


def test_redis_password_and_tls_are_honoured(tmp_path):
    cert, key = _self_signed(tmp_path)
    with EmbeddedRedis(port=0, password="s3cret pw") as server:
        proxy = TlsProxy(cert, key, server.port)
        try:
            base = f"rediss://:s3cret%20pw@localhost:{proxy.port}/0"
            r = connect(f"{base}?ssl_cert_reqs=required&ssl_ca_certs={cert}")
            assert r.connection_pool.connection_class is redis.SSLConnection
            stream = f"tls-{uuid.uuid4().hex[:6]}"
            producer = ExperienceProducer(r, stream=stream)
            consumer = ExperienceConsumer(r, stream=stream)
            g = experience_pb2.Group(group_id="tls:0", prompt="a red circle", created_at=time.time())
            for j in range(2):
                g.samples.add(seed=j, latent=tensor_to_proto(torch.zeros(2, 2))).rewards["shapes"] = float(j)
            producer.publish(g)
            (entry, got), = consumer.read(max_groups=1)
            assert got.group_id == "tls:0" and consumer.ack([entry]) == 1
            assert ledger_snapshot(r, stream)["trained"] == 1 and proxy.handshakes >= 1
            # the certificate is verified: without the CA (self-signed) the handshake fails
            with pytest.raises(redis.ConnectionError, match="(?i)certificate|ssl"):
                connect(f"{base}?ssl_cert_reqs=required").ping()
            # and the password is required behind TLS too
            with pytest.raises(redis.AuthenticationError):
                connect(f"rediss://:wrong@localhost:{proxy.port}/0?ssl_ca_certs={cert}").ping()
            # plain TCP to the TLS port does not work (nothing is accepted in clear)
            with pytest.raises(redis.ConnectionError):
                connect(f"redis://:s3cret%20pw@127.0.0.1:{proxy.port}/0", socket_timeout=2).ping()
        finally:
            proxy.close()
