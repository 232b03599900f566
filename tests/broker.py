"""A Mosquitto of the test's own: a free loopback port, a generated configuration with passwords and an ACL.

Users: `bench` (publishes under cellbench/, reads its commands), `viewer` (reads only), `operator` (reads, and
publishes commands). Nothing of the machine's own broker is used.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

USERS = {"bench": "bench-secret", "viewer": "viewer-secret", "operator": "operator-secret"}
ACL = """\
user bench
topic readwrite cellbench/#

user viewer
topic read cellbench/#

user operator
topic read cellbench/#
topic write cellbench/+/+/cmd/#
"""


def mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        pytest.skip("no mosquitto: sudo apt-get install mosquitto mosquitto-clients (Debian), or run .ci/run as root")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Mosquitto process; `stop()` kills it, `start()` brings it back on the same port."""

    def __init__(self, folder: Path, tls: bool = False, persistent: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.ca_file = make_certificates(folder) if tls else None
        passwd = folder / "passwd"
        passwd.write_text("")
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        for user, password in USERS.items():
            subprocess.run([tool, "-b", str(passwd), user, password], check=True, capture_output=True)
        (folder / "acl").write_text(ACL)
        self.config = folder / "mosquitto.conf"
        # persistent: sessions and their queued QoS 1 messages survive a restart (saved when stopped gently)
        persistence = f"persistence true\npersistence_location {folder}/" if persistent else "persistence false"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                               f"acl_file {folder / 'acl'}\n{persistence}\nlog_dest stderr\n"
                               # as root it would switch to the mosquitto user, who cannot read the test's folder
                               "user root\n"
                               + (f"cafile {self.ca_file}\ncertfile {folder / 'server.crt'}\n"
                                  f"keyfile {folder / 'server.key'}\n" if tls else ""))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.folder / "mosquitto.log", "ab") as log:  # the broker keeps its own descriptor
            self.proc = subprocess.Popen([mosquitto(), "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start: " + (self.folder / "mosquitto.log").read_text()[-500:])

    def stop(self, gently: bool = False) -> None:
        if self.proc is not None:
            if gently:
                self.proc.terminate()
            else:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def password_file(self, user: str) -> Path:
        path = self.folder / f"{user}.password"
        path.write_text(USERS[user] + "\n")
        path.chmod(0o600)
        return path


def make_certificates(folder: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl); returns the CA's file."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=cellbench test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return folder / "ca.crt"
