"""Installing gtun as the README says, and the Debian package scripts/build-deb makes.

The README's install commands are read from the README itself (the block after its
"the install commands" marker) and run with `/opt`, `/usr/local/bin` and
`/etc/systemd/system` moved into a temporary directory, so that the README stays true.
Both tests need PyPI (or pip's cache) for gtun's dependencies, and are skipped without.
"""

from __future__ import annotations

import marshal
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- the install commands:"
DEBIAN_PYTHON = Path("/usr/bin/python3")  # Debian's own, PEP 668 and all
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI")


def install_commands() -> list[str]:
    """The commands of the README's install block, without comments."""
    text = README.read_text()
    at = text.index(MARKER)
    block = text[text.index("```sh\n", at) + len("```sh\n") :]
    block = block[: block.index("```")]
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def run(cmd: str | list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    shell = isinstance(cmd, str)
    result = subprocess.run(
        cmd,  # type: ignore[call-overload]
        shell=shell,
        executable="/bin/bash" if shell else None,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        **kw,
    )
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_install_block_is_what_the_units_expect() -> None:
    commands = install_commands()
    assert "sudo python3 -m venv /opt/gtun" in commands
    for unit in ("gtun-server@.service", "gtun-client@.service"):
        text = (ROOT / "contrib" / "systemd" / unit).read_text()
        assert "\nExecStart=/opt/gtun/bin/gtun " in text


@needs_pypi
@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="needs Debian's /usr/bin/python3")
def test_the_readme_install_commands_work(tmp_path: Path) -> None:
    source = tmp_path / "gtun"
    shutil.copytree(ROOT, source, ignore=IGNORE)
    moved = {
        "/opt/gtun": tmp_path / "opt" / "gtun",
        "/usr/local/bin": tmp_path / "usr-local-bin",
        "/etc/systemd/system": tmp_path / "etc-systemd-system",
    }
    moved["/usr/local/bin"].mkdir()
    moved["/etc/systemd/system"].mkdir()
    (tmp_path / "opt").mkdir()
    ran = []
    for command in install_commands():
        words = shlex.split(command)
        if words[0] == "sudo":
            words = words[1:]
        if words[:2] == ["apt-get", "install"]:
            # Not installed here: known to this Debian's package lists is what is checked.
            for package in (w for w in words[2:] if not w.startswith("-")):
                run(["apt-cache", "show", "--no-all-versions", package])
            continue
        if words == ["systemctl", "daemon-reload"]:
            continue
        assert words[0] in ("python3", "ln", "install") or words[0].startswith("/opt/gtun/"), (
            f"the README's install block has a command this test does not know: {command}"
        )
        if words[0] == "python3":
            words[0] = str(DEBIAN_PYTHON)
        line = " ".join(w if "*" in w else shlex.quote(w) for w in words)  # globs stay globs
        for path, there in moved.items():
            line = line.replace(path, str(there))
        run(line, cwd=source, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        ran.append(line)
    assert len(ran) == 4, ran  # the virtualenv, pip, the link, the units
    gtun = moved["/usr/local/bin"] / "gtun"
    assert gtun.is_symlink()
    assert "usage: gtun" in run([str(gtun), "--help"]).stdout
    private = run([str(gtun), "genkey"]).stdout
    public = run([str(gtun), "pubkey"], input=private).stdout.strip()
    assert len(public) == 44 and public.endswith("=") and public != private.strip()
    units = sorted(p.name for p in moved["/etc/systemd/system"].iterdir())
    assert units == ["gtun-client@.service", "gtun-server@.service"]
    # gtun ran from the virtualenv, with Debian's Python, not from this checkout.
    where = run(
        [
            str(moved["/opt/gtun"] / "bin" / "python"),
            "-c",
            "import gtun; print(gtun.__file__)",
        ],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout
    assert where.startswith(str(moved["/opt/gtun"] / "lib"))
    # `gtun demo` runs from what was installed: its lab modules and the transfer program.
    demo = (
        "import os, gtun.lab.demo, gtun.lab.net as net; "
        "print(os.path.exists(net.TRANSFER), net.TRANSFER.startswith(os.environ['VENV']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VENV"] = str(moved["/opt/gtun"])
    out = run([str(moved["/opt/gtun"] / "bin" / "python"), "-c", demo], env=env).stdout
    assert out.split() == ["True", "True"]


@needs_pypi
@pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not DEBIAN_PYTHON.exists() or os.geteuid() != 0,
    reason="needs dpkg-deb, Debian's python3 and root (a private mount namespace)",
)
def test_the_debian_package(tmp_path: Path) -> None:
    out = run([str(ROOT / "scripts" / "build-deb"), str(tmp_path / "dist")]).stdout
    deb = Path(out.strip().splitlines()[-1])
    assert deb.parent == tmp_path / "dist" and deb.name.startswith("gtun_0.1.0-1~")
    fields = run(["dpkg-deb", "--field", str(deb)]).stdout
    pyver = run([str(DEBIAN_PYTHON), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    major, minor = pyver.stdout.strip().split(".")
    assert "Package: gtun\n" in fields
    assert f"Depends: python3 (>= {major}.{minor}), python3 (<< {major}.{int(minor) + 1})" in fields
    unpacked = tmp_path / "unpacked"
    run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    assert os.readlink(unpacked / "usr" / "bin" / "gtun") == "/opt/gtun/bin/gtun"
    for unit in ("gtun-server@.service", "gtun-client@.service"):
        shipped = unpacked / "usr" / "lib" / "systemd" / "system" / unit
        assert shipped.read_text() == (ROOT / "contrib" / "systemd" / unit).read_text()
    doc = unpacked / "usr" / "share" / "doc" / "gtun"
    assert (doc / "copyright").read_text() == (ROOT / "LICENSE").read_text()
    assert (unpacked / "etc" / "gtun").stat().st_mode & 0o777 == 0o700
    # The virtualenv was made elsewhere and moved: nothing in it names the build's path.
    venv = unpacked / "opt" / "gtun"
    assert (venv / "bin" / "gtun").read_text().startswith("#!/opt/gtun/bin/python")
    # Pure Python: no mypyc extension built for the tree's own .venv (scripts/build-native).
    assert not [p for p in venv.rglob("*.so") if "site-packages/gtun/" in p.as_posix()]
    leftover = subprocess.run(
        ["grep", "-rlI", "root/opt/gtun", str(venv)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", leftover.stdout
    # Run it where it belongs: the unpacked /opt bound over /opt in a private mount
    # namespace (the machine's /opt is untouched).
    script = (
        f"mount --bind {shlex.quote(str(unpacked / 'opt'))} /opt && "
        "/opt/gtun/bin/gtun --help >/dev/null && "
        "/opt/gtun/bin/gtun genkey | /opt/gtun/bin/gtun pubkey"
    )
    result = run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    public = result.stdout.strip()
    assert len(public) == 44 and public.endswith("=")
    # Compiled at build time (the units keep /opt read-only), naming the installed path.
    site = f"/opt/gtun/lib/python{major}.{minor}/site-packages"
    pyc = venv / site.removeprefix("/opt/gtun/") / "gtun" / "__pycache__"
    pyc = pyc / f"cli.cpython-{major}{minor}.pyc"
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == f"{site}/gtun/cli.py"
