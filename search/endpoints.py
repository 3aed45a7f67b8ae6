"""Whether the Ray cluster and the tracking store a command names answer, before it starts.

Both clients retry for minutes before they give up: `ray.init` on an address nothing answers
at, or where something other than a Ray head answers, tries 20 times, each behind several
connection timeouts, and MLflow retries an HTTP call 7 times with backoff (about 4 minutes
for a refused port, more for a host that does not answer). A wrong address or URI is bad
input, so it is found here in seconds, with one line naming the flag (or the environment
variable it came from), before a folder, a store or a Ray is made.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.parse
import urllib.request
from concurrent.futures import Future
from typing import Any

from iterhead.curricula.errors import ConfigError

ANSWER_S = 5.0  # how long a cluster's head or a tracking server has to accept a connection (and a head to answer)


def address_field(given: str | None) -> str:
    return "--address" if given else "RAY_ADDRESS"


def uri_field(given: str | None) -> str:
    return "MLFLOW_TRACKING_URI" if not given and os.environ.get("MLFLOW_TRACKING_URI") else "--tracking-uri"


def ray_address(address: str | None, field: str) -> str | None:
    """The cluster to join, checked: None for the embedded local Ray (no address, or ``local``,
    which is what Ray calls a new local instance), else the HOST:PORT of a cluster's head that
    accepts a connection. ``auto`` is the cluster `ray start` last recorded on this machine,
    not any Ray process found running here (another driver's embedded Ray, which ends with it)."""
    if not address or address == "local":
        return None
    if "://" in address:
        raise ConfigError(f"{address!r}: give the HOST:PORT of the cluster's head (its GCS port, 6379 by "
                          "default) or auto; Ray Client (ray://) and HTTP addresses are not used", field=field)
    if address == "auto":
        from ray._private.utils import get_ray_address_file, read_ray_address

        address = read_ray_address() or ""
        if not address:  # `ray start --temp-dir DIR` records its cluster in DIR, where no `auto` looks
            raise ConfigError(f"auto: no cluster started with `ray start` is recorded on this machine (in "
                              f"{get_ray_address_file(None)}; one started with --temp-dir is recorded in that "
                              "folder instead); give the HOST:PORT of the cluster's head", field=field)
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 host, [::1]:6379
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{address!r} is not HOST:PORT (the cluster head's GCS port, 6379 by default) or auto",
                          field=field)
    try:
        answer = _grpc_answer(host, int(port))
    except OSError as err:
        raise ConfigError(f"nothing answers at {address} ({err.strerror or type(err).__name__}); is the cluster's "
                          "head up, and is this its GCS port (6379 by default)?", field=field) from None
    except UnicodeError:  # the host name cannot be looked up at all: an empty label (a..b), bytes that are not text
        raise ConfigError(f"{address!r}: {host!r} is not a host name; give the HOST:PORT of the cluster's head",
                          field=field) from None
    if answer == "none":
        raise ConfigError(f"something answers at {address}, but not as a Ray cluster's head (no gRPC there: a "
                          "dashboard's port is not it); give the head's GCS port (6379 by default)", field=field)
    if answer == "other":
        raise ConfigError(f"a gRPC server answers at {address}, but not a Ray cluster head's GCS (a Ray Client "
                          "server, 10001 by default, or another of a node's ports): iterhead joins as a driver, "
                          "not through Ray Client; give the head's GCS port (6379 by default)", field=field)
    return address


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: length, type, flags, stream id, payload."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name_index: int, value: str) -> bytes:
    """An HPACK header field, not indexed, its name from the static table (index < 15), its value plain."""
    data = value.encode()
    return bytes([name_index]) + _length(len(data)) + data


def _length(n: int) -> bytes:
    """HPACK's integer with a 7-bit prefix (the string length; a host name can pass 126 bytes)."""
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    return bytes(out + [n])


SETTINGS, HEADERS, DATA, RST_STREAM, GOAWAY, CONTINUATION = 4, 1, 0, 3, 7, 9  # HTTP/2 frame types
END_STREAM, END_HEADERS, ACK = 1, 4, 1
UNIMPLEMENTED = b"\x0bgrpc-status\x0212"  # grpc-status 12 as gRPC's C core writes it (a literal, not Huffman)
MAX_ANSWER = 2**20  # bytes read at most: an answer to one call is far smaller


def gcs_method() -> str:
    """The path of what `ray.init` asks a head first, 20 times: read from Ray's own service
    description, so a Ray that renames or moves it changes the probe too."""
    from ray.core.generated import gcs_service_pb2

    method = gcs_service_pb2.DESCRIPTOR.services_by_name["NodeInfoGcsService"].methods_by_name["GetClusterId"]
    return f"/{method.containing_service.full_name}/{method.name}"


def _call(host: str, port: int) -> bytes:
    """The client preface, an empty SETTINGS frame, and a gRPC call of `gcs_method` with an empty request."""
    fields = (b"\x83\x86" + _literal(4, gcs_method()) + _literal(1, f"{host}:{port}")  # POST, http, :path, :authority
              + b"\x0f\x10" + bytes([16]) + b"application/grpc" + b"\x00\x02te\x08trailers")  # content-type, te
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(SETTINGS, 0, 0) + _frame(HEADERS, END_HEADERS, 1, fields)
            + _frame(DATA, END_STREAM, 1, bytes(5)))


def _grpc_answer(host: str, port: int) -> str:
    """How the server at host:port answers (`OSError` if it accepts no connection): ``none`` where it
    does not answer an HTTP/2 preface with a SETTINGS frame (a dashboard, a web server, a silent
    port), ``other`` where it is a gRPC server without the GCS's `gcs_method` (a Ray Client server
    or a raylet answers 12, UNIMPLEMENTED), else ``gcs``. A head's GCS answers the call (or refuses
    it without a token: 16); `ray.init` at either of the first two retried for 20 s to minutes, and
    printed a line a retry. With ``RAY_USE_TLS`` the GCS speaks TLS first, so only the connection
    is checked. Once a server has sent SETTINGS, whatever else it does (silence past `ANSWER_S`,
    a reset, an answer that does not read) counts as the GCS's: the probe never refuses a head."""
    with socket.create_connection((host, port), timeout=ANSWER_S) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return "gcs"
        deadline = time.monotonic() + ANSWER_S
        data, block, first, ended = b"", b"", True, False
        try:
            conn.sendall(_call(host, port))
            while len(data) < MAX_ANSWER and (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                if not (chunk := conn.recv(65536)):
                    break
                data += chunk
                if first and len(data) >= 9 and data[3] != SETTINGS:  # HTTP/1, say
                    return "none"
                while len(data) >= 9 and len(data) >= 9 + (size := int.from_bytes(data[:3], "big")):
                    kind, flags, stream, payload = data[3], data[4], int.from_bytes(data[5:9], "big"), data[9:9 + size]
                    data, first = data[9 + size:], False
                    if kind == SETTINGS and not flags & ACK:
                        conn.sendall(_frame(SETTINGS, ACK, 0))
                    if stream == 1 and kind in (HEADERS, CONTINUATION):  # the status may end in a CONTINUATION
                        block += payload
                        ended = ended or (kind == HEADERS and bool(flags & END_STREAM))
                        if ended and flags & END_HEADERS:
                            return "other" if UNIMPLEMENTED in block else "gcs"
                    if kind in (RST_STREAM, GOAWAY):
                        return "gcs"
        except OSError:  # reset or silent: no gRPC server, unless it said SETTINGS first
            pass
        return "none" if first else "gcs"


def check_store(uri: str, field: str) -> None:
    """An HTTP tracking server's host must accept a connection, and a database store's driver must be
    installed (MLflow would otherwise fail after Ray started, with the driver's traceback)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("http", "https"):
        _check_server(uri, field)
    elif scheme in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        try:
            sqlalchemy.create_engine(uri).dispose()  # loads the driver; connects to nothing
        except ImportError as err:
            package = err.name or "of its database driver"
            raise ConfigError(f"{_without_login(uri)!r} needs the Python package {package!r}, which is not installed",
                              field=field) from None
        except sqlalchemy.exc.ArgumentError as err:
            raise ConfigError(f"{_without_login(uri)!r} is not a database URL: {err}", field=field) from None


def _check_server(uri: str, field: str) -> None:
    """The server's host must accept a TCP connection within `ANSWER_S`. Only that is asked, not
    an HTTP answer: a login in the URI, a client certificate, a path prefix or a slow answer are
    MLflow's to handle, and each would make an HTTP probe refuse a server that works. Where a
    proxy stands between (``http_proxy`` and the like, not bypassed for the host), the server is
    not reached directly, so nothing is checked."""
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise ConfigError(f"{_without_login(uri)!r} is not a URL: {err}", field=field) from None
    if not parts.hostname:
        raise ConfigError(f"{_without_login(uri)!r} names no host", field=field)
    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    try:
        socket.create_connection((parts.hostname, port), timeout=ANSWER_S).close()
    except UnicodeError:  # the idna codec: an empty label (a..b), a label past 63 characters
        raise ConfigError(f"{_without_login(uri)!r}: {parts.hostname!r} is not a host name", field=field) from None
    except OSError as err:
        raise ConfigError(f"no tracking server answers at {_without_login(uri)} ({err.strerror or err}); start it "
                          "(mlflow_server/start.sh) or fix the URI", field=field) from None


# MLflow's error for an answer that is not its JSON (`rest_utils.verify_rest_response`): to calls on
# experiments, which every MLflow server has answered since 1.0, a 404, 405 or 501 says the URI names
# no MLflow server (a wrong port or path); a 200 that is not JSON says so to any call. Other codes
# (401, 403, 5xx from a proxy) may stand before a working server, and stay failures while running.
_NO_SUCH_CALL = re.compile(r"API request to endpoint (/api/2\.0/mlflow/experiments/\S+) failed with error code "
                           r"(404|405|501) ")
_NOT_JSON = "API request to endpoint was successful but the response body was not in a valid JSON format"


def not_a_tracking_server(err: BaseException, uri: str) -> str | None:
    """Why `err`, raised by MLflow on the first call to the HTTP store `uri` (`first_answer`), shows
    that `uri` names no MLflow server (bad input: its one line names the fix); None where it does not."""
    if not getattr(err, FIRST_ANSWER, False) or not uri.startswith(("http://", "https://")) \
            or type(err).__module__.split(".")[0] != "mlflow":
        return None
    text = str(err)
    found = _NO_SUCH_CALL.match(text)
    if found:
        said = f"answered {found[1]} with HTTP {found[2]} and no MLflow reply"
    elif text.startswith(_NOT_JSON):
        said = "answered with a page that is no MLflow reply (a login page, or another web app)"
    else:
        return None
    return (f"{_without_login(uri)} is no MLflow tracking server: it {said}; fix the URI (host, port and path) or "
            "start one (mlflow_server/start.sh)")


FIRST_ANSWER = "iterhead_first_answer"  # set on an error of the store's first answer (`first_answer`)


def first_answer(future: Future) -> Any:
    """`future`'s result, where it holds the store's first answer (no run exists yet). Its error is
    marked: there, an answer showing that the URI names no MLflow server is bad input (exit 2,
    `not_a_tracking_server`); later the same answer (a proxy's login page mid-run) is a failure
    while running (exit 1). The mark stays with the error wherever it is raised again."""
    try:
        return future.result()
    except Exception as err:
        setattr(err, FIRST_ANSWER, True)
        raise


def _without_login(uri: str) -> str:
    """`uri` as it may be printed: a password in it (http://user:password@host) is not shown. Split by
    hand, as `urlsplit` does, since `urlsplit` raises on the malformed URI (http://[::1) an error names."""
    scheme, sep, rest = uri.partition("://")
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    login, at, host = rest[:end].rpartition("@")
    user, colon, _ = login.partition(":")
    if not sep or not at or not colon:
        return uri
    return f"{scheme}://{user}:***@{host}{rest[end:]}"
