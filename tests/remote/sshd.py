"""A throwaway OpenSSH server on loopback for the ssh:// tests and scripts/bench_remote.py.

`start_sshd(dir)` makes a host key, client keys and an sshd_config of its own in `dir`
(`UsePAM no`, `StrictModes no`, `PidFile none`, a free high port), starts `sshd -D -e`, and
writes a client config (`ssh -F`) with these hosts:
  rlhf-test     the good one
  rlhf-badkey   a key the server does not accept (refused auth)
  rlhf-notail   a remote PATH without `tail` (its key's forced command sets PATH: the login
                shell's rc files would reset a PATH sent by the client)
  rlhf-kit      a remote PATH with a stand-in `trainerd` (it answers `verify` with its arguments)
`extra_client` is added to every host's block (scripts/bench_remote.py adds a ProxyCommand).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
HAVE_SSHD = all(Path(p).exists() for p in (SSHD, SSH, KEYGEN))


@dataclass
class Sshd:
    port: int
    config: Path  # the client config (ssh -F)
    proc: subprocess.Popen

    @property
    def ssh_env(self) -> dict[str, str]:
        return {"RLHF_SSH": f"{SSH} -F {self.config}"}

    def ssh(self, host: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SSH, "-F", str(self.config), host, command], capture_output=True, text=True, timeout=timeout
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("sshd did not listen")


def start_sshd(d: Path, extra_client: str = "") -> Sshd:
    for name in ("host_key", "id", "bad_id", "notail_id", "kit_id"):
        subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    notail, kit = d / "bin-notail", d / "bin-kit"

    def forced(path: Path) -> str:
        return f'command="PATH={path} exec /bin/sh -c \\"$SSH_ORIGINAL_COMMAND\\"" '

    (d / "authorized_keys").write_text(
        (d / "id.pub").read_text()
        + forced(notail)
        + (d / "notail_id.pub").read_text()
        + forced(kit)
        + (d / "kit_id.pub").read_text()
    )
    for p in (d / "id", d / "bad_id", d / "notail_id", d / "kit_id", d / "host_key"):
        p.chmod(0o600)
    notail.mkdir()
    kit.mkdir()
    for tool in ("sh", "head", "stat", "od", "tr", "sort", "date", "sleep", "cat", "ls", "tail"):
        found = shutil.which(tool)
        if found:
            if tool != "tail":
                (notail / tool).symlink_to(found)
            (kit / tool).symlink_to(found)
    fake = kit / "trainerd"
    fake.write_text(
        '#!/bin/sh\necho "checking on the remote box" >&2\n'
        'printf \'{"passed": true, "status": "passed", "summary": "remote args: %s"}\\n\' "$*"\n'
    )
    fake.chmod(0o755)
    port = _free_port()
    user = getpass.getuser()
    (d / "sshd_config").write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / "host_key"}
AuthorizedKeysFile {d / "authorized_keys"}
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers {user}
LogLevel ERROR
"""
    )
    common = f"""  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentitiesOnly yes
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  LogLevel ERROR
{extra_client}"""
    (d / "ssh_config").write_text(
        f"Host rlhf-test\n{common}  IdentityFile {d / 'id'}\n"
        f"Host rlhf-badkey\n{common}  IdentityFile {d / 'bad_id'}\n"
        f"Host rlhf-notail\n{common}  IdentityFile {d / 'notail_id'}\n"
        f"Host rlhf-kit\n{common}  IdentityFile {d / 'kit_id'}\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(port, proc)
    except BaseException:
        proc.kill()
        raise
    return Sshd(port, d / "ssh_config", proc)


def stop_sshd(s: Sshd) -> None:
    s.proc.terminate()
    try:
        s.proc.wait(5)
    except subprocess.TimeoutExpired:
        s.proc.kill()
