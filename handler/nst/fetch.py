"""Fetching `content_url` / `style_url` without becoming an SSRF proxy.

Off unless the model config sets `limits.allow_urls`. The address check runs
at connect time on the address actually dialled (requests-hardened pins the
resolved IP), so DNS rebinding and redirects cannot reach loopback, private,
link-local or metadata addresses; proxies from the environment are ignored
for the same reason; every redirect hop is re-validated here
(scheme, port, no userinfo) and counted; connect, read and total time and the
bytes received are all capped.
"""
from __future__ import annotations

import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
from requests_hardened import Config, Manager
from requests_hardened.ip_filter import InvalidIPAddress

from .config import Limits
from .errors import BadRequest, Forbidden, RequestError, TimedOut, TooLarge

SessionFactory = Callable[[], requests.Session]

_PUBLIC_ONLY = Manager(Config(
    ip_filter_enable=True,
    ip_filter_allow_loopback_ips=False,
    never_redirect=True,  # redirects are followed below, one checked hop at a time
    default_timeout=(3, 5),
    user_agent_override="style-transfer-fetch",
))
ALLOWED_PORTS = (80, 443)
_REDIRECTS = (301, 302, 303, 307, 308)


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
        raise Forbidden(field, f"{field}: port {port} is not allowed (80 and 443 only)")


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
    if not isinstance(url, str) or len(url) > 2048:
        raise BadRequest(field, f"{field}: expected a URL string of at most 2048 characters")
    deadline = time.monotonic() + limits.url_total_timeout_s
    timeout = (limits.url_connect_timeout_s, limits.url_read_timeout_s)
    with session_factory() as session:
        # No *_PROXY variables and no ~/.netrc: a proxy would be the address
        # checked at connect time instead of the target's.
        session.trust_env = False
        for _hop in range(limits.url_max_redirects + 1):
            _check_url(url, field, allowed_ports)
            try:
                with session.get(url, stream=True, allow_redirects=False, timeout=timeout) as r:
                    if r.status_code in _REDIRECTS and "Location" in r.headers:
                        url = urljoin(url, r.headers["Location"])
                        continue
                    if r.status_code != 200:
                        raise BadRequest(field, f"{field}: the URL answered HTTP {r.status_code}")
                    return _read_capped(r, field, limits.max_input_bytes, deadline)
            except InvalidIPAddress:
                raise Forbidden(
                    field, f"{field}: the address is not public (loopback, private, link-local...)") from None
            except (requests.Timeout, TimeoutError):
                raise TimedOut(field, f"{field}: the download timed out") from None
            except requests.RequestException as e:
                raise BadRequest(field, f"{field}: could not fetch the URL ({type(e).__name__})") from None
        raise BadRequest(field, f"{field}: more than {limits.url_max_redirects} redirects")


def _read_capped(response: requests.Response, field: str, cap: int, deadline: float) -> bytes:
    """Count the bytes actually received (Content-Length is only a hint)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        raise TooLarge(field, f"{field}: {declared} bytes, more than the limit of {cap}")
    chunks, size = [], 0
    for chunk in response.iter_content(None):  # as it arrives: a trickle cannot dodge the deadline
        size += len(chunk)
        if size > cap:
            raise TooLarge(field, f"{field}: more than the limit of {cap} bytes")
        if time.monotonic() > deadline:
            raise TimedOut(field, f"{field}: the download took too long")
        chunks.append(chunk)
    return b"".join(chunks)
