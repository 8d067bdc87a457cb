"""Fetching `content_url` / `style_url` without becoming an SSRF proxy.

Off unless the model config sets `limits.allow_urls`. The address check runs
at connect time on the address actually dialled (requests-hardened pins the
resolved IP), so DNS rebinding and redirects cannot reach loopback, private,
link-local or metadata addresses; proxies from the environment are ignored
for the same reason; every redirect hop is re-validated here
(scheme, port, no userinfo, never https to http) and counted; connect, read and total time and the
bytes received are all capped. The total time holds however a server
trickles, headers included: at the deadline a timer shuts the download's
sockets (a per-read timeout alone lets a byte every few seconds go on for
ever). It holds for name resolution too, which no socket timeout covers: the
lookup runs on a helper thread that the download waits for only until its
deadline. The bytes are counted as they are decoded, a chunk at a time, so a
gzip bomb meets the cap before it is inflated.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests_hardened import Config, Manager, ip_filter
from requests_hardened.ip_filter import InvalidIPAddress

from .config import MAX_PENDING_LOOKUPS, MAX_URL_CHARS, Limits
from .errors import BadRequest, Busy, Forbidden, RequestError, TimedOut, TooLarge

SessionFactory = Callable[[], requests.Session]

_PUBLIC_ONLY = Manager(Config(
    ip_filter_enable=True,
    ip_filter_allow_loopback_ips=False,
    never_redirect=True,  # redirects are followed below, one checked hop at a time
    # for a call that passes none; fetch() passes its Limits' own
    default_timeout=(Limits().url_connect_timeout_s, Limits().url_read_timeout_s),
    user_agent_override="style-transfer-fetch",
))
# Ranges requests-hardened lets through (it blocks what Python calls private,
# and a list of its own) that reach no public host: IPv4-compatible
# (::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d) IPv6, which a stack may
# route to the IPv4 address inside, and the deprecated site-local fec0::/10.
# Its filter reads this tuple at every connect.
ip_filter.EXTRA_BLOCKED_NET_RANGES = (*ip_filter.EXTRA_BLOCKED_NET_RANGES, ipaddress.ip_network("::/96"),
                                      ipaddress.ip_network("::ffff:0:0:0/96"), ipaddress.ip_network("fec0::/10"))
ALLOWED_PORTS = (80, 443)
_REDIRECTS = (301, 302, 303, 307, 308)
# Bytes per read of the body, decoded: urllib3 (>= 2.6) inflates a gzip or
# deflate body no further than this per read.
_CHUNK = 64 * 1024


class _Sockets:
    """The sockets one download opens, shut at its deadline from a timer
    thread. A read blocked on a socket then returns at once, whatever its
    timeout, and the download fails (reported as timed out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.shut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)
            if not self.shut:
                return
        _shut(sock)  # opened after the deadline

    def shut_all(self) -> None:
        with self._lock:
            self.shut = True
            opened = list(self._open)
        for sock in opened:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _LookupPastDeadline(socket.timeout):
    """A name lookup the download stopped waiting for at its deadline."""


class _LookupsBackedUp(_LookupPastDeadline):
    """MAX_PENDING_LOOKUPS lookups are still running: none is started."""


_lookup = threading.local()  # .deadline: the running fetch's, on its own thread
_pending = threading.BoundedSemaphore(MAX_PENDING_LOOKUPS)
# requests-hardened's own function, even where this module runs twice (a
# reload would otherwise wrap the wrapper, which then calls itself)
_resolve = getattr(ip_filter.get_ip_address, "requests_hardened_original", ip_filter.get_ip_address)


def _resolve_by_deadline(hostname: str, port: int, allow_loopback: bool):
    """requests-hardened's resolve-and-check, waited for no later than the
    calling fetch's deadline. getaddrinfo() takes no timeout and cannot be
    interrupted (the system resolver may retry for 30 s and more), so it runs
    on a daemon thread that is left to finish on its own."""
    deadline = getattr(_lookup, "deadline", None)
    if deadline is None:  # not inside fetch(): as requests-hardened does it
        return _resolve(hostname, port, allow_loopback)
    if not _pending.acquire(blocking=False):
        raise _LookupsBackedUp()
    answer: list = []  # [(True, result)] or [(False, exception)]
    done = threading.Event()

    def run() -> None:
        try:
            answer.append((True, _resolve(hostname, port, allow_loopback)))
        except BaseException as e:  # noqa: BLE001 - raised again on the waiting thread
            answer.append((False, e))
        finally:
            _pending.release()
            done.set()

    try:
        threading.Thread(target=run, name="fetch-lookup", daemon=True).start()
    except BaseException:
        _pending.release()  # run() never will
        raise
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise _LookupPastDeadline()
    ok, value = answer[0]
    if not ok:
        raise value
    return value


# filter_host() calls the module's get_ip_address at every connection it pins
_resolve_by_deadline.requests_hardened_original = _resolve  # type: ignore[attr-defined]
ip_filter.get_ip_address = _resolve_by_deadline


def _watch(session: requests.Session, sockets: _Sockets) -> None:
    """Make every connection `session` opens register its socket with
    `sockets`. requests-hardened builds the connection pools (it pins the
    checked IP there), so the hook goes on each pool it hands out: a
    subclass of the pool's connection class whose connect() reports the
    socket it made."""
    for adapter in session.adapters.values():
        get_pool = adapter.get_connection_with_tls_context

        def watched_pool(*args, _get_pool=get_pool, **kwargs):
            pool = _get_pool(*args, **kwargs)
            base = pool.ConnectionCls
            if getattr(base, "_watched_by", None) is not sockets:
                class Watched(base):  # type: ignore[misc, valid-type]
                    _watched_by = sockets

                    def connect(self) -> None:
                        super().connect()
                        sockets.add(self.sock)

                pool.ConnectionCls = Watched
            return pool

        adapter.get_connection_with_tls_context = watched_pool


def _check_url(url: str, field: str, allowed_ports: tuple[int, ...] | None) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadRequest(field, f"{field}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise BadRequest(field, f"{field}: only http and https URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise BadRequest(field, f"{field}: URLs with credentials are not fetched")
    if not parts.hostname:
        raise BadRequest(field, f"{field}: the URL has no host")
    if allowed_ports is not None and port is not None and port not in allowed_ports:
        raise Forbidden(field, f"{field}: port {port} is not allowed ({' and '.join(map(str, allowed_ports))} only)")


def fetch(
    url: str,
    field: str,
    limits: Limits,
    *,
    session_factory: SessionFactory = _PUBLIC_ONLY.get_session,
    allowed_ports: tuple[int, ...] | None = ALLOWED_PORTS,
) -> bytes:
    """GET `url` -> its bytes, or a RequestError naming `field`:
    403 forbidden address, 400 unusable URL/answer, 413 too big, 504 too slow."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise BadRequest(field, f"{field}: expected a URL string of at most {MAX_URL_CHARS} characters")
    deadline = time.monotonic() + limits.url_total_timeout_s
    timeout = (limits.url_connect_timeout_s, limits.url_read_timeout_s)
    sockets = _Sockets()
    timer = threading.Timer(limits.url_total_timeout_s, sockets.shut_all)
    timer.daemon = True
    with session_factory() as session:
        # No *_PROXY variables and no ~/.netrc: a proxy would be the address
        # checked at connect time instead of the target's.
        session.trust_env = False
        _watch(session, sockets)
        timer.start()
        _lookup.deadline = deadline
        try:
            return _follow(session, url, field, limits, timeout, allowed_ports, deadline)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            # a socket shut at the deadline fails whatever read it was in
            if isinstance(e.__cause__, _LookupsBackedUp):
                raise Busy(field, f"{field}: too many earlier name lookups are still running; "
                                  "try again later") from None
            if sockets.shut or time.monotonic() > deadline or isinstance(e.__cause__, _LookupPastDeadline):
                raise _too_long(field, limits) from None
            if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
                raise TimedOut(field, f"{field}: the download timed out") from None
            raise BadRequest(field, f"{field}: could not fetch the URL ({type(e).__name__})") from None
        finally:
            timer.cancel()
            _lookup.deadline = None


def _follow(session: requests.Session, url: str, field: str, limits: Limits, timeout: tuple[float, float],
            allowed_ports: tuple[int, ...] | None, deadline: float) -> bytes:
    for _hop in range(limits.url_max_redirects + 1):
        _check_url(url, field, allowed_ports)
        try:
            with session.get(url, stream=True, allow_redirects=False, timeout=timeout) as r:
                if r.status_code in _REDIRECTS and "Location" in r.headers:
                    url = next_hop(url, r.headers["Location"], field)
                    continue
                if r.status_code != 200:
                    raise BadRequest(field, f"{field}: the URL answered HTTP {r.status_code}")
                return _read_capped(r, field, limits, deadline)
        except InvalidIPAddress:
            raise Forbidden(
                field, f"{field}: the address is not public (loopback, private, link-local...)") from None
    raise BadRequest(field, f"{field}: more than {limits.url_max_redirects} redirects")


def next_hop(url: str, location: str, field: str) -> str:
    """Where a redirect from `url` to `location` leads; never from https to
    plain http, where anyone on the path could swap the image (or read the
    address) the https URL was chosen to protect."""
    target = urljoin(url, location)
    if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
        raise BadRequest(field, f"{field}: a redirect from https to another scheme is not followed")
    return target


def _read_capped(response: requests.Response, field: str, limits: Limits, deadline: float) -> bytes:
    """Count the bytes actually received, decoded (Content-Length is only a
    hint, and a gzip body's says nothing of what it inflates to)."""
    cap = limits.max_input_bytes
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        raise TooLarge(field, f"{field}: {declared} bytes, more than the limit of {cap}")
    chunks, size = [], 0
    for chunk in response.iter_content(_CHUNK):
        size += len(chunk)
        if size > cap:
            raise TooLarge(field, f"{field}: more than the limit of {cap} bytes")
        if time.monotonic() > deadline:
            raise _too_long(field, limits)
        chunks.append(chunk)
    if time.monotonic() > deadline:  # shut at the deadline: an end without a length reads as EOF
        raise _too_long(field, limits)
    return b"".join(chunks)


def _too_long(field: str, limits: Limits) -> TimedOut:
    return TimedOut(field, f"{field}: the download took longer than {limits.url_total_timeout_s:g} s")
