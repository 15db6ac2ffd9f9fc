"""A real Mosquitto broker for the tests: generated config, a free 127.0.0.1 port,
persistence in a temp folder (so a restarted broker keeps persistent sessions and their
queued QoS 1 messages), and ``restart()`` on the same port.

Registered through ``pytest_plugins`` in tests/conftest.py; the ``mosquitto`` fixture is
session-scoped and fails (does not skip) when Mosquitto is not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install mosquitto mosquitto-clients openssl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}")
                                     else None)
    if path is None:
        raise RuntimeError(f"{binary} is not installed; the MQTT tests need it: {INSTALL_HINT}")
    return path


USER, PASSWORD = "flowrun", "s3cret/pw"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Mosquitto:
    """One broker process; its URLs stay the same across ``restart()``.

    Three listeners: ``url`` (anonymous), ``tls_url`` (TLS with a self-signed certificate for
    127.0.0.1, trusted through ``ca_file``) and ``auth_url`` (``USER``/``PASSWORD`` required).
    """

    def __init__(self, folder: Path, port: int | None = None,
                 extra_config: tuple[str, ...] = ()) -> None:
        self.binary = _require("mosquitto")
        self.pub_binary = _require("mosquitto_pub")
        self.folder = folder
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.tls_port, self.auth_port = free_port(), free_port()
        self.tls_url = f"mqtts://127.0.0.1:{self.tls_port}"
        self.auth_url = f"mqtt://127.0.0.1:{self.auth_port}"
        self.ca_file = folder / "cert.pem"
        self.config = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_config = extra_config
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self._make_credentials()
        self.config.write_text(self._config_text())

    def _make_credentials(self) -> None:
        """A self-signed certificate for 127.0.0.1 (openssl) and a password file."""
        openssl = _require("openssl")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", str(self.folder / "key.pem"), "-out", str(self.ca_file),
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        passwords = self.folder / "passwords"
        subprocess.run([_require("mosquitto_passwd"), "-b", "-c", str(passwords), USER,
                        PASSWORD], check=True, capture_output=True, timeout=60)
        passwords.chmod(0o600)

    def _config_text(self) -> str:
        lines = [
            "per_listener_settings true",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"listener {self.tls_port} 127.0.0.1",
            "allow_anonymous true",
            f"certfile {self.ca_file}",
            f"keyfile {self.folder / 'key.pem'}",
            f"listener {self.auth_port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {self.folder / 'passwords'}",
            "persistence true",
            f"persistence_location {self.folder / 'data'}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            "persistent_client_expiration 1d",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        lines.extend(self.extra_config)
        if os.getuid() == 0:  # as root Mosquitto would switch to user 'mosquitto'
            lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 15) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"mosquitto exited with {code}: {self._log_tail()}")
            if all(_listening(port) for port in (self.port, self.tls_port, self.auth_port)):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self._log_tail()}")

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM (Mosquitto saves its persistence file), then wait for it to exit."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                retain: bool = False) -> None:
        """Publish one message with the real ``mosquitto_pub`` client (payload on stdin)."""
        data = payload.encode() if isinstance(payload, str) else payload
        args = [self.pub_binary, "-h", "127.0.0.1", "-p", str(self.port), "-t", topic,
                "-q", str(qos), "-V", "mqttv5", "-s" if data else "-n"]
        if retain:
            args.append("-r")
        subprocess.run(args, input=data, check=True, timeout=30, capture_output=True)

    def publish_lines(self, topic: str, lines: list[str], *, qos: int = 1) -> None:
        """One message per line, from one ``mosquitto_pub -l`` process."""
        args = [self.pub_binary, "-h", "127.0.0.1", "-p", str(self.port), "-t", topic,
                "-q", str(qos), "-l", "-V", "mqttv5"]
        data = "".join(f"{line}\n" for line in lines).encode()
        subprocess.run(args, input=data, check=True, timeout=60, capture_output=True)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
