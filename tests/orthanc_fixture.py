"""Test helpers for a throw-away Orthanc PACS with the DICOMweb plugin.

This is a helper module for pytest (not a test module). It provides:

* :func:`install_orthanc` / :func:`orthanc_available` - locate (or apt-install) the Debian
  ``orthanc`` + ``orthanc-dicomweb`` packages and tell tests whether to skip.
* :class:`OrthancServer` - a context manager that runs ``/usr/sbin/Orthanc`` in the foreground
  with a temporary configuration (temporary storage, free HTTP port, DICOM port off by default,
  no authentication, DICOMweb at ``/dicom-web/``) and stops it on exit.
* :func:`nifti_to_dicom_series` / :func:`read_dicom_series` - convert a 3D NIfTI volume into an
  MR DICOM series with honest geometry, and read such a series back.
* :func:`upload_series` - push DICOM files into Orthanc through its REST API.
* :func:`orthanc_server` - a module-scoped pytest fixture (import it into a test module).

Listening on loopback only
--------------------------
Orthanc 1.10 has no option to choose the address its HTTP (or DICOM) server binds to: it
listens on every interface and merely *rejects* remote clients when ``RemoteAccessAllowed`` is
false. To really listen on 127.0.0.1 only, :class:`OrthancServer` preloads (``LD_PRELOAD``) a
tiny shared library, compiled on first use with the system C compiler, whose ``bind()`` rewrites
the wildcard address (0.0.0.0 / ::) to the loopback address. After start-up the server checks
``/proc`` and refuses to run if any of Orthanc's listening sockets is not on loopback.

Debian paths (bookworm, Orthanc 1.10.1, DICOMweb plugin 1.7):

* binary: ``/usr/sbin/Orthanc``
* plugin: ``/usr/share/orthanc/plugins/libOrthancDicomWeb.so`` (a symlink to
  ``/usr/lib/orthanc/libOrthancDicomWeb.so.1.7``)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: Where the Debian package puts the Orthanc server binary.
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
#: Where the Debian ``orthanc-dicomweb`` package puts the plugin (first existing one wins).
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
#: Debian packages providing the server and the DICOMweb plugin.
DEBIAN_PACKAGES = ("orthanc", "orthanc-dicomweb")

#: DICOM "MR Image Storage" SOP class.
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# NIfTI world space is RAS+, DICOM patient space is LPS+: flip the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Source of the LD_PRELOAD library that forces listening sockets onto the loopback interface.
_LOOPBACK_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

typedef int (*casam_bind_fn)(int, const struct sockaddr *, socklen_t);

/* bind() wrapper: a wildcard address (0.0.0.0 or ::) becomes the loopback address. */
int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static casam_bind_fn next_bind = 0;
    if (!next_bind)
        next_bind = (casam_bind_fn) dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t) sizeof(struct sockaddr_in)) {
        struct sockaddr_in v4;
        memcpy(&v4, addr, sizeof v4);
        if (v4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return next_bind(fd, (const struct sockaddr *) &v4, sizeof v4);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t) sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 v6;
        memcpy(&v6, addr, sizeof v6);
        if (IN6_IS_ADDR_UNSPECIFIED(&v6.sin6_addr)) {
            v6.sin6_addr = in6addr_loopback;
            return next_bind(fd, (const struct sockaddr *) &v6, sizeof v6);
        }
    }
    return next_bind(fd, addr, len);
}
"""


class OrthancUnavailable(RuntimeError):
    """Raised when Orthanc, its DICOMweb plugin or the loopback shim cannot be provided."""


# --------------------------------------------------------------------------------------------
# Locating / installing Orthanc
# --------------------------------------------------------------------------------------------


def find_orthanc_binary() -> Optional[Path]:
    """Locates the Orthanc server executable.

    ``$CASAM_ORTHANC_BIN`` wins, then ``/usr/sbin/Orthanc``, then ``Orthanc`` on ``$PATH``.

    Returns:
        The path of an executable file, or None when none is found.
    """
    candidates: List[Optional[str]] = [
        os.environ.get("CASAM_ORTHANC_BIN"),
        str(ORTHANC_BINARY),
        shutil.which("Orthanc"),
    ]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def find_dicomweb_plugin() -> Optional[Path]:
    """Locates the Orthanc DICOMweb plugin shared library.

    ``$CASAM_ORTHANC_DICOMWEB`` wins, then the Debian locations in
    :data:`DICOMWEB_PLUGIN_CANDIDATES`.

    Returns:
        The path of the ``.so`` file, or None when none is found.
    """
    env = os.environ.get("CASAM_ORTHANC_DICOMWEB")
    if env and os.path.isfile(env):
        return Path(env)
    for pattern in DICOMWEB_PLUGIN_CANDIDATES:
        for hit in sorted(glob.glob(pattern)):
            if os.path.isfile(hit):
                return Path(hit)
    return None


def _c_compiler() -> Optional[str]:
    """Returns the C compiler used to build the loopback shim (``$CC``, cc, gcc, clang) or None."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def loopback_shim_path() -> Path:
    """Builds (once, cached in the temp folder) the ``LD_PRELOAD`` library pinning binds to loopback.

    The library's file name contains a hash of its source, so a changed source is rebuilt; the
    build writes to a temporary name and renames it, so concurrent test processes are safe.

    Returns:
        Path of the compiled shared library.

    Raises:
        OrthancUnavailable: no C compiler, or the compilation failed.
    """
    digest = hashlib.sha256(_LOOPBACK_SHIM_SOURCE.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"casam-orthanc-shim-{os.getuid()}"
    lib = cache / f"loopback_bind_{digest}.so"
    if lib.is_file():
        return lib
    cc = _c_compiler()
    if cc is None:
        raise OrthancUnavailable("no C compiler (cc/gcc/clang) to build the loopback-bind shim")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "loopback_bind.c"
        src.write_text(_LOOPBACK_SHIM_SOURCE)
        out = Path(tmp) / "loopback_bind.so"
        proc = subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise OrthancUnavailable(f"building the loopback-bind shim failed:\n{proc.stderr}")
        os.replace(out, lib)
    return lib


def orthanc_unavailable_reason(loopback_only: bool = True) -> Optional[str]:
    """Explains why :class:`OrthancServer` cannot run here, for ``pytest.skip`` messages.

    Args:
        loopback_only: Also require what is needed to pin Orthanc to 127.0.0.1 (a C compiler or
            an already-built shim, and Linux ``/proc``).

    Returns:
        None when everything is present, else a one-line reason.
    """
    if find_orthanc_binary() is None:
        return f"Orthanc binary not found (apt-get install {' '.join(DEBIAN_PACKAGES)})"
    if find_dicomweb_plugin() is None:
        return "Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb)"
    try:
        import requests  # noqa: F401
    except ImportError:
        return "python package 'requests' is not installed"
    if loopback_only:
        if not Path("/proc/net/tcp").exists():
            return "no /proc/net/tcp: cannot check that Orthanc listens on loopback only"
        try:
            loopback_shim_path()
        except OrthancUnavailable as exc:
            return str(exc)
    return None


def orthanc_available(loopback_only: bool = True) -> bool:
    """Tells whether an :class:`OrthancServer` can be started on this machine.

    Args:
        loopback_only: See :func:`orthanc_unavailable_reason`.

    Returns:
        True when the binary, the DICOMweb plugin and (optionally) the loopback shim are present.
    """
    return orthanc_unavailable_reason(loopback_only) is None


def install_orthanc(assume_yes: bool = True) -> Tuple[Path, Path]:
    """Installs the Debian ``orthanc`` and ``orthanc-dicomweb`` packages if they are missing.

    Runs ``apt-get update`` and ``apt-get install``; the packaged systemd service is not needed
    (:class:`OrthancServer` runs its own foreground process).

    Args:
        assume_yes: Pass ``-y`` to apt-get (non-interactive install).

    Returns:
        ``(binary, plugin)``: paths of the Orthanc executable and the DICOMweb plugin.

    Raises:
        OrthancUnavailable: not root, no apt-get, or the packages still cannot be found.
        subprocess.CalledProcessError: apt-get failed.
    """
    binary, plugin = find_orthanc_binary(), find_dicomweb_plugin()
    if binary is not None and plugin is not None:
        return binary, plugin
    apt = shutil.which("apt-get")
    if apt is None:
        raise OrthancUnavailable("apt-get not found: install Orthanc and its DICOMweb plugin by hand")
    if os.geteuid() != 0:
        raise OrthancUnavailable(f"run as root: apt-get install {' '.join(DEBIAN_PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([apt, "update"], check=True, env=env)
    cmd = [apt, "install"] + (["-y"] if assume_yes else []) + list(DEBIAN_PACKAGES)
    subprocess.run(cmd, check=True, env=env)
    binary, plugin = find_orthanc_binary(), find_dicomweb_plugin()
    if binary is None or plugin is None:
        raise OrthancUnavailable("Orthanc packages installed but binary/plugin not found")
    return binary, plugin


# --------------------------------------------------------------------------------------------
# Running Orthanc
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Asks the kernel for a currently free TCP port on 127.0.0.1.

    Returns:
        A port number (free at the time of the call; another process may still take it).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _hex_to_ip(hex_addr: str) -> str:
    """Decodes an address column of ``/proc/net/tcp{,6}`` (host byte order words) to text."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening_addresses(pid: int) -> List[Tuple[str, int]]:
    """Lists the TCP sockets a process is listening on (Linux only, via ``/proc``).

    Args:
        pid: Process id.

    Returns:
        ``(ip, port)`` pairs, e.g. ``[("127.0.0.1", 8042)]``.

    Raises:
        OSError: ``/proc/<pid>`` cannot be read (process gone, or not Linux).
    """
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                    ip_hex, port_hex = local.split(":")
                    found.append((_hex_to_ip(ip_hex), int(port_hex, 16)))
    return found


def _is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def _deep_update(base: Dict, extra: Dict) -> Dict:
    """Recursively merges ``extra`` into ``base`` (dicts merged, other values replaced)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


class OrthancServer:
    """A temporary Orthanc server with the DICOMweb plugin, for tests.

    Use it as a context manager (or call :meth:`start` / :meth:`stop`)::

        with OrthancServer() as server:
            upload_series(server, files)
            requests.get(server.dicomweb_url + "/studies")

    The server stores everything in a temporary folder (removed on :meth:`stop` unless a
    ``workdir`` was given), listens on 127.0.0.1 only, needs no credentials, and runs in the
    foreground as a child process (never as a daemon). Its log goes to :attr:`log_path`.

    Args:
        workdir: Folder for the config, database and log. Default: a new temporary folder,
            deleted on stop.
        http_port: HTTP port. Default: a free port.
        dicom_port: DICOM (DIMSE) port, or None (default) to disable the DICOM server.
        name: Orthanc's ``Name``.
        aet: DICOM application entity title (only used when ``dicom_port`` is set).
        startup_timeout: Seconds to wait for ``GET /system`` to answer.
        extra_config: Extra Orthanc configuration, merged (recursively) over the defaults.
        loopback_only: Pin the listening sockets to 127.0.0.1 with the ``LD_PRELOAD`` shim and
            verify it after start-up. Only turn this off where the network is otherwise closed.
        binary: Orthanc executable. Default: :func:`find_orthanc_binary`.
        plugin: DICOMweb plugin. Default: :func:`find_dicomweb_plugin`.

    Raises:
        OrthancUnavailable: (from :meth:`start`) binary, plugin or shim missing.
    """

    def __init__(
        self,
        workdir: Optional[PathLike] = None,
        http_port: Optional[int] = None,
        dicom_port: Optional[int] = None,
        name: str = "casam-test",
        aet: str = "CASAMTEST",
        startup_timeout: float = 30.0,
        extra_config: Optional[Dict] = None,
        loopback_only: bool = True,
        binary: Optional[PathLike] = None,
        plugin: Optional[PathLike] = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir: Optional[Path] = Path(workdir) if workdir is not None else None
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.name = name
        self.aet = aet
        self.startup_timeout = float(startup_timeout)
        self.extra_config = dict(extra_config or {})
        self.loopback_only = loopback_only
        self.binary = Path(binary) if binary else find_orthanc_binary()
        self.plugin = Path(plugin) if plugin else find_dicomweb_plugin()
        self.process: Optional[subprocess.Popen] = None
        self._log_fh = None

    # ---- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API, e.g. ``http://127.0.0.1:8042/dicom-web``."""
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        """Path of the generated JSON configuration."""
        assert self.workdir is not None, "server not started"
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Path of the file receiving Orthanc's stdout and stderr."""
        assert self.workdir is not None, "server not started"
        return self.workdir / "orthanc.log"

    # ---- configuration --------------------------------------------------------------------
    def config(self) -> Dict:
        """Builds the Orthanc configuration for this server.

        Returns:
            The configuration as a JSON-serialisable dict.
        """
        assert self.workdir is not None and self.http_port is not None
        storage = str(self.workdir / "db")
        cfg: Dict = {
            "Name": self.name,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": int(self.http_port),
            "HttpDescribeErrors": True,
            "DicomServerEnabled": self.dicom_port is not None,
            "DicomAet": self.aet,
            "DicomPort": int(self.dicom_port) if self.dicom_port is not None else 4242,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "ExecuteLuaEnabled": False,
            "SaveJobs": False,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
            },
        }
        return _deep_update(cfg, json.loads(json.dumps(self.extra_config)))

    # ---- life cycle -----------------------------------------------------------------------
    def start(self) -> "OrthancServer":
        """Writes the configuration, starts Orthanc and waits until ``GET /system`` answers.

        Returns:
            self, started.

        Raises:
            OrthancUnavailable: binary, plugin or loopback shim missing.
            RuntimeError: Orthanc exited, did not answer within ``startup_timeout``, or listens on
                a non-loopback address (the server is stopped before raising).
        """
        if self.process is not None:
            return self
        if self.binary is None or not Path(self.binary).exists():
            raise OrthancUnavailable("Orthanc binary not found")
        if self.plugin is None or not Path(self.plugin).exists():
            raise OrthancUnavailable("Orthanc DICOMweb plugin not found")
        env = dict(os.environ)
        if self.loopback_only:
            shim = str(loopback_shim_path())
            env["LD_PRELOAD"] = " ".join(p for p in (shim, env.get("LD_PRELOAD", "")) if p)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="casam-orthanc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

        fixed_ports = self.http_port is not None
        attempts = 1 if fixed_ports else 3
        last_error = ""
        for _ in range(attempts):
            if not fixed_ports:
                self.http_port = free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            self._log_fh = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [str(self.binary), str(self.config_path)],
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(self.workdir),
            )
            try:
                self._wait_ready()
            except RuntimeError as exc:
                last_error = str(exc)
                self._terminate()
                continue
            if self.loopback_only:
                try:
                    self._check_loopback()
                except RuntimeError:
                    self.stop()
                    raise
            return self
        self._cleanup_workdir()
        raise RuntimeError(last_error)

    def _wait_ready(self) -> None:
        """Polls ``GET /system`` until it answers 200 (raises RuntimeError on exit or timeout)."""
        import requests

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                resp = requests.get(self.url + "/system", timeout=1.0)
                if resp.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"Orthanc did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def _check_loopback(self) -> None:
        """Raises RuntimeError if Orthanc listens on any non-loopback address."""
        assert self.process is not None
        addrs = listening_addresses(self.process.pid)
        bad = [a for a in addrs if not _is_loopback(a[0])]
        if bad or not addrs:
            raise RuntimeError(f"Orthanc must listen on loopback only, listens on {addrs}")

    def listening(self) -> List[Tuple[str, int]]:
        """Lists the ``(ip, port)`` pairs the running Orthanc process listens on.

        Returns:
            Listening TCP addresses (empty when not running).
        """
        if self.process is None or self.process.poll() is not None:
            return []
        return listening_addresses(self.process.pid)

    def log_tail(self, n_chars: int = 4000) -> str:
        """Returns the end of Orthanc's log, for error messages.

        Args:
            n_chars: How many characters to return at most.

        Returns:
            The last ``n_chars`` characters of the log ('' when there is none).
        """
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except (OSError, AssertionError):
            return ""

    def _terminate(self) -> None:
        """Stops the child process (SIGTERM, then SIGKILL after 10 s) and closes the log."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            self.process = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _cleanup_workdir(self) -> None:
        """Removes the temporary workdir if this object created it."""
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def stop(self) -> None:
        """Stops Orthanc and deletes the temporary storage (if this object created it)."""
        self._terminate()
        self._cleanup_workdir()

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- small REST helpers ---------------------------------------------------------------
    def get(self, path: str, **kwargs):
        """``GET`` on the server.

        Args:
            path: Path starting with ``/`` (e.g. ``/system`` or ``/dicom-web/studies``).
            **kwargs: Passed to :func:`requests.get` (``timeout`` defaults to 30 s).

        Returns:
            The :class:`requests.Response`.
        """
        import requests

        kwargs.setdefault("timeout", 30)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs):
        """``POST`` on the server.

        Args:
            path: Path starting with ``/``.
            **kwargs: Passed to :func:`requests.post` (``timeout`` defaults to 30 s).

        Returns:
            The :class:`requests.Response`.
        """
        import requests

        kwargs.setdefault("timeout", 30)
        return requests.post(self.url + path, **kwargs)


def upload_series(server: OrthancServer, files: Iterable[PathLike]) -> List[Dict]:
    """Uploads DICOM files to Orthanc with ``POST /instances``.

    Args:
        server: A started :class:`OrthancServer`.
        files: DICOM Part-10 files.

    Returns:
        Orthanc's answer for each file (``ID``, ``ParentSeries``, ``ParentStudy``, ``Status``...).

    Raises:
        RuntimeError: Orthanc rejected a file (HTTP error or a status other than ``Success`` /
            ``AlreadyStored``).
    """
    import requests

    answers = []
    with requests.Session() as session:
        for path in files:
            data = Path(path).read_bytes()
            resp = session.post(
                server.url + "/instances",
                data=data,
                headers={"Content-Type": "application/dicom"},
                timeout=60,
            )
            if resp.status_code != 200:
                raise RuntimeError(f"upload of {path} failed: HTTP {resp.status_code} {resp.text}")
            answer = resp.json()
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"upload of {path} failed: {answer}")
            answers.append(answer)
    return answers


def split_multipart(content_type: str, body: bytes) -> List[bytes]:
    """Splits a ``multipart/related`` body (e.g. a WADO-RS answer) into its parts' payloads.

    Args:
        content_type: The response's ``Content-Type`` header (must carry a ``boundary``).
        body: The raw response body.

    Returns:
        The payload of each part (part headers removed), in order.

    Raises:
        ValueError: the content type is not multipart or has no boundary.
    """
    if not content_type.lower().startswith("multipart/"):
        raise ValueError(f"not a multipart content type: {content_type}")
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError(f"no boundary in {content_type}")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # closing delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts


# --------------------------------------------------------------------------------------------
# NIfTI -> DICOM
# --------------------------------------------------------------------------------------------


def _encode_pixels(data: np.ndarray, bits_allocated: Optional[int]):
    """Chooses a DICOM integer encoding for a volume.

    Integer-valued data is stored as is (8-bit unsigned when it fits and ``bits_allocated``
    allows, else 16-bit unsigned or signed); other data is linearly rescaled to 16-bit unsigned
    with Rescale Slope / Intercept.

    Returns:
        ``(stored, bits, signed, slope, intercept)``; slope/intercept are None when not needed.

    Raises:
        ValueError: ``bits_allocated`` is not None/8/16, or the data cannot be stored in 8 bits.
    """
    if bits_allocated not in (None, 8, 16):
        raise ValueError("bits_allocated must be None, 8 or 16")
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else None
    if finite is not None and not finite.all():
        data = np.where(finite, data, 0)
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 0.0
    integral = np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.round(data))
    if integral and lo >= 0 and hi <= 255 and bits_allocated in (None, 8):
        return data.astype(np.uint8), 8, False, None, None
    if bits_allocated == 8:
        raise ValueError(f"data range [{lo}, {hi}] does not fit 8-bit unsigned pixels")
    if integral and lo >= 0 and hi <= 65535:
        return data.astype(np.uint16), 16, False, None, None
    if integral and lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), 16, True, None, None
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((data.astype(np.float64) - lo) / slope).astype(np.uint16)
    return stored, 16, False, slope, lo


def _ds_number(value: float) -> str:
    """Formats a float for a DICOM Decimal String (at most 16 characters)."""
    value = float(value) + 0.0  # turns -0.0 into 0.0
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot format {value} as a DICOM decimal string")


def nifti_to_dicom_series(
    nifti_path: PathLike,
    out_dir: PathLike,
    institution_name: str,
    patient_id: str,
    *,
    patient_name: Optional[str] = None,
    study_instance_uid: Optional[str] = None,
    series_instance_uid: Optional[str] = None,
    frame_of_reference_uid: Optional[str] = None,
    study_description: str = "casam test study",
    series_description: Optional[str] = None,
    series_number: int = 1,
    study_date: str = "20000101",
    study_time: str = "120000",
    accession_number: str = "",
    manufacturer: str = "casam",
    bits_allocated: Optional[int] = None,
) -> Tuple[str, str, List[Path]]:
    """Converts a 3D NIfTI volume into an MR DICOM series (one file per slice).

    Geometry: voxel ``(i, j, k)`` of the NIfTI data becomes column ``i``, row ``j`` of slice file
    ``k`` (``InstanceNumber = k + 1``). The NIfTI affine (RAS+) is converted to DICOM patient
    space (LPS+): ``ImageOrientationPatient`` = unit i-axis and j-axis directions,
    ``PixelSpacing`` = [j spacing, i spacing], ``ImagePositionPatient`` = world position of voxel
    ``(0, 0, k)``, ``SliceThickness`` / ``SpacingBetweenSlices`` = length of the k-axis. Reading
    the series back by sorting on ``ImagePositionPatient`` along the slice normal therefore gives
    the NIfTI voxels (with k reversed when the k-axis points against
    ``row x column``; the recovered affine says so, see :func:`read_dicom_series`).

    Pixels: 8-bit unsigned when the data are integers in [0, 255] (unless ``bits_allocated=16``),
    else 16-bit (un)signed integers, else 16-bit with Rescale Slope/Intercept; MONOCHROME2,
    Explicit VR Little Endian, SOP class MR Image Storage.

    Args:
        nifti_path: A 3D NIfTI file (a 4D file with one volume is accepted).
        out_dir: Folder for the ``.dcm`` files (created if missing).
        institution_name: Value of InstitutionName (0008,0080), e.g. ``"TCGA_DU"``.
        patient_id: PatientID (0010,0020).
        patient_name: PatientName; defaults to ``patient_id``.
        study_instance_uid: Reuse a StudyInstanceUID (e.g. to put several series in one study);
            default: a new one.
        series_instance_uid: SeriesInstanceUID; default: a new one.
        frame_of_reference_uid: FrameOfReferenceUID; default: a new one.
        study_description: StudyDescription.
        series_description: SeriesDescription; defaults to the NIfTI file name.
        series_number: SeriesNumber.
        study_date: StudyDate / SeriesDate / ContentDate (``YYYYMMDD``).
        study_time: StudyTime / SeriesTime / ContentTime (``HHMMSS``).
        accession_number: AccessionNumber.
        manufacturer: Manufacturer.
        bits_allocated: Force 8 or 16 bits per pixel; None chooses the smallest that fits.

    Returns:
        ``(study_instance_uid, series_instance_uid, files)`` where ``files`` are the written
        paths in slice order (k = 0, 1, ...).

    Raises:
        ValueError: the image is not 3D, its in-plane axes are not orthogonal (DICOM cannot
            represent that), or the data do not fit ``bits_allocated``.
    """
    import nibabel as nib
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    nifti_path = Path(nifti_path)
    img = nib.load(str(nifti_path))
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"{nifti_path}: expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)

    lin = _RAS_TO_LPS @ affine[:3, :3]
    origin = _RAS_TO_LPS @ affine[:3, 3]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{nifti_path}: degenerate affine {affine.tolist()}")
    row_dir = lin[:, 0] / spacing[0]  # direction of increasing column index (NIfTI i)
    col_dir = lin[:, 1] / spacing[1]  # direction of increasing row index (NIfTI j)
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ValueError(f"{nifti_path}: in-plane axes are not orthogonal, DICOM cannot store it")
    normal = np.cross(row_dir, col_dir)

    stored, bits, signed, slope, intercept = _encode_pixels(data, bits_allocated)
    nx, ny, nz = stored.shape

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    name = nifti_path.name
    for suffix in (".gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    series_desc = series_description if series_description is not None else name

    files: List[Path] = []
    for k in range(nz):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.SpecificCharacterSet = "ISO_IR 100"
        # SOP common / general image
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
        ds.AccessionNumber = accession_number
        ds.Modality = "MR"
        ds.Manufacturer = manufacturer
        ds.InstitutionName = institution_name
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_desc
        # patient
        ds.PatientName = patient_name if patient_name is not None else patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        # study / series / frame of reference
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        # MR image module (type 1/2 attributes)
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = ""
        ds.RepetitionTime = ""
        ds.EchoTrainLength = ""
        # image plane
        position = origin + lin[:, 2] * k
        ds.ImagePositionPatient = [_ds_number(float(v)) for v in position]
        ds.ImageOrientationPatient = [_ds_number(float(v)) for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [_ds_number(float(spacing[1])), _ds_number(float(spacing[0]))]
        ds.SliceThickness = _ds_number(float(spacing[2]))
        ds.SpacingBetweenSlices = _ds_number(float(spacing[2]))
        ds.SliceLocation = _ds_number(float(position @ normal))
        # image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = bits
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        if slope is not None:
            ds.RescaleIntercept = _ds_number(float(intercept))
            ds.RescaleSlope = _ds_number(float(slope))
            ds.RescaleType = "US"
        plane = np.ascontiguousarray(stored[:, :, k].T)  # (rows = j, columns = i)
        ds.PixelData = plane.astype(plane.dtype.newbyteorder("<"), copy=False).tobytes()

        path = out_dir / f"slice_{k + 1:04d}.dcm"
        pydicom.dcmwrite(str(path), ds, write_like_original=False)
        files.append(path)
    return study_uid, series_uid, files


def read_dicom_series(files: Sequence[PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a single-series DICOM stack back into a NIfTI-style volume and RAS affine.

    Slices are sorted by the projection of ``ImagePositionPatient`` on the slice normal
    (``row direction x column direction``), as ITK/GDCM do. Rescale Slope/Intercept are applied
    when present.

    Args:
        files: DICOM files of one series (any order).

    Returns:
        ``(volume, affine)``: ``volume[i, j, s]`` = pixel at column ``i``, row ``j`` of the
        ``s``-th sorted slice, and the 4x4 voxel-to-RAS affine of that array (usable with
        ``nibabel.Nifti1Image``).

    Raises:
        ValueError: no files, or slices with differing orientation / size.
    """
    import pydicom

    datasets = [pydicom.dcmread(str(f)) for f in files]
    if not datasets:
        raise ValueError("no DICOM files")
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    for ds in datasets[1:]:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise ValueError("slices have different ImageOrientationPatient")
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise ValueError("slices have different sizes")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]

    planes = []
    for ds in datasets:
        arr = ds.pixel_array
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if slope != 1 or inter != 0:
            arr = arr.astype(np.float64) * slope + inter
        planes.append(arr)
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, s) -> (i, j, s)

    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    if len(datasets) > 1:
        step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        step = normal * float(getattr(datasets[0], "SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    ras = np.eye(4)
    ras[:3, :] = _RAS_TO_LPS @ lps[:3, :]
    return volume, ras


# --------------------------------------------------------------------------------------------
# pytest fixture
# --------------------------------------------------------------------------------------------

try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - the module is also importable without pytest
    _pytest = None

if _pytest is not None:

    @_pytest.fixture(scope="module")
    def orthanc_server():
        """Module-scoped pytest fixture: a started :class:`OrthancServer` (skips if unavailable).

        Import it into a test module (``from orthanc_fixture import orthanc_server``) and request
        it as an argument.

        Yields:
            The running :class:`OrthancServer`; it is stopped after the module's tests.
        """
        reason = orthanc_unavailable_reason()
        if reason:
            _pytest.skip(reason)
        with OrthancServer() as server:
            yield server
