"""URL inputs: only public http(s) addresses, checked where the connection is
made; every hop, byte and second bounded. The production session is tried
against loopback in many spellings and must never reach the local server; a
test-only session that allows loopback exercises the rest of the rules."""
from __future__ import annotations

import dataclasses

import pytest
from image_server import PNG, ImageServer
from manage import wait_for
from requests_hardened import Config, Manager

from nst import Limits, RequestError, parse_request
from nst.fetch import fetch


LIMITS = Limits(allow_urls=True, max_input_bytes=100_000, url_total_timeout_s=1.0, url_read_timeout_s=2.0)
LOOPBACK_OK = Manager(Config(ip_filter_enable=True, ip_filter_allow_loopback_ips=True,
                             never_redirect=True, default_timeout=(2, 2))).get_session


@pytest.fixture(scope="module")
def site():
    with ImageServer() as server:
        yield server


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1", "0x7f000001", "2130706433", "0177.0.0.1", "localhost",
    "[::ffff:127.0.0.1]", "[::1]", "0.0.0.0", "169.254.169.254", "10.0.0.1", "192.168.1.1", "100.64.0.1",
    # IPv4-compatible, IPv4-translated and site-local IPv6: once let through (a connection error, 400)
    "[::7f00:1]", "[::ffff:0:7f00:1]", "[fec0::1]",
])
def test_non_public_addresses_are_refused_before_any_request(site, host):
    before = site.hits
    with pytest.raises(RequestError) as e:
        fetch(site.url("/img.png", host), "content_url", LIMITS, allowed_ports=None)
    assert e.value.code == 403 and e.value.message.startswith("content_url")
    assert site.hits == before


@pytest.mark.parametrize("url, code", [
    ("ftp://example.com/a.png", 400),
    ("file:///etc/passwd", 400),
    ("http://user:secret@example.com/a.png", 400),
    ("http:///a.png", 400),
    ("http://example.com:8080/a.png", 403),
    ("http://[::1/a.png", 400),
])
def test_unusable_urls_are_refused_without_a_connection(url, code):
    with pytest.raises(RequestError) as e:
        fetch(url, "style_url", LIMITS)
    assert e.value.code == code and e.value.message.startswith("style_url")


def test_fetches_an_image(site):
    assert fetch(site.url("/img.png"), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None) == PNG


def test_environment_proxies_are_ignored(site, monkeypatch):
    """A proxy from the environment would make the connection this check sees
    the proxy's, not the target's; the fetch goes direct (here: a proxy that is
    not listening would make it fail)."""
    from local_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert fetch(site.url("/img.png"), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None) == PNG


def test_follows_a_few_redirects_and_counts_them(site):
    get = lambda path: fetch(site.url(path), "content_url", LIMITS,  # noqa: E731
                             session_factory=LOOPBACK_OK, allowed_ports=None)
    assert get("/redirect/2") == PNG  # 3 hops: within url_max_redirects
    with pytest.raises(RequestError) as e:
        get("/redirect/5")
    assert e.value.code == 400 and "redirects" in e.value.message


@pytest.mark.parametrize("path, code", [
    ("/to-file", 400),  # a redirect hop is re-validated: no file:// behind an http URL
    ("/huge", 413),  # counted as received, no Content-Length
    ("/declared-huge", 413),
    ("/slow", 504),  # trickles one byte at a time: the total deadline still holds
    ("/missing", 400),
])
def test_bad_answers_get_their_status(site, path, code):
    with pytest.raises(RequestError) as e:
        fetch(site.url(path), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None)
    assert e.value.code == code, e.value.message
    assert e.value.message.startswith("content_url")


def test_a_server_trickling_its_headers_is_cut_at_the_total_deadline(site):
    """A header byte every 0.2 s never trips the 2 s read timeout; before the
    deadline shut the sockets, this held the worker for the whole minute the
    trickle lasts (for ever, from a server that wanted to) and then read as a
    malformed answer (400)."""
    with pytest.raises(RequestError) as e:
        fetch(site.url("/trickle-headers"), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None)
    assert e.value.code == 504, e.value.message
    assert e.value.message == "content_url: the download took longer than 1 s"


def test_a_gzip_bomb_meets_the_cap_before_it_is_inflated(site):
    """50 MB of zeros in a 50 kB gzip body (its Content-Length under the cap):
    counted as it is inflated, 64 kB at a time, it stops at the 100 kB cap
    instead of inflating whole (that took 50 MB here, 25 GB at the production
    cap of 25 MB)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as e:
            fetch(site.url("/gzip-bomb"), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code == 413, e.value.message
    assert peak < 5_000_000, peak


def test_parse_request_fetches_only_when_allowed_and_after_validation(site):
    calls = []

    def fake_fetch(url, field):
        calls.append((url, field))
        return PNG

    fields = {"content_url": "https://example.com/c.png", "style": PNG, "steps": "3"}
    request = parse_request(fields, LIMITS, fetch=fake_fetch)
    assert request.content == PNG and calls == [("https://example.com/c.png", "content_url")]

    with pytest.raises(RequestError) as e:  # a bad parameter: nothing is fetched
        parse_request({**fields, "steps": "0"}, LIMITS, fetch=fake_fetch)
    assert e.value.code == 422 and len(calls) == 1
    with pytest.raises(RequestError) as e:  # URLs off (the default)
        parse_request(fields, Limits(), fetch=fake_fetch)
    assert e.value.code == 422 and e.value.message.startswith("content_url")
    with pytest.raises(RequestError) as e:
        parse_request({**fields, "content": PNG}, LIMITS, fetch=fake_fetch)
    assert e.value.code == 400 and "not both" in e.value.message


def test_a_url_sent_as_a_form_field_or_grpc_input_is_its_text():
    """Multipart fields and gRPC inputs arrive as bytes: the URL fetched is
    their text, as a JSON string would give it; bytes that are not UTF-8
    are refused by name (400, malformed, as a URL that is no string) before
    anything is fetched."""
    calls = []

    def fake_fetch(url, field):
        calls.append((url, field))
        return PNG

    form = {"style_url": bytearray(b" https://example.com/s.png\r\n"), "content": PNG, "steps": b"3"}
    request = parse_request(form, LIMITS, fetch=fake_fetch, multipart=True)
    assert request.styles == [PNG] and request.style_fields == ("style_url",)
    assert calls == [("https://example.com/s.png", "style_url")]
    with pytest.raises(RequestError) as e:
        parse_request({**form, "style_url": b"https://example.com/\xff.png"}, LIMITS, fetch=fake_fetch,
                      multipart=True)
    assert e.value.code == 400 and e.value.message == "style_url: not valid UTF-8 text" and len(calls) == 1


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def loopback_spellings(draw):
    """127.0.0.0/8 written as dotted, integer, hex, octal or IPv4-mapped IPv6."""
    a, b, c = draw(st.integers(0, 255)), draw(st.integers(0, 255)), draw(st.integers(1, 254))
    value = (127 << 24) | (a << 16) | (b << 8) | c
    form = draw(st.sampled_from(["dotted", "int", "hex", "octal", "mapped"]))
    if form == "dotted":
        return f"127.{a}.{b}.{c}"
    if form == "int":
        return str(value)
    if form == "hex":
        return hex(value)
    if form == "octal":
        return f"0177.{a}.{b}.{c}"
    return f"[::ffff:127.{a}.{b}.{c}]"


@settings(max_examples=60, deadline=None)
@given(host=loopback_spellings())
def test_no_spelling_of_loopback_gets_through(site, host):
    before = site.hits
    with pytest.raises(RequestError) as e:
        fetch(site.url("/img.png", host), "content_url", LIMITS, allowed_ports=None)
    assert e.value.code == 403
    assert site.hits == before


def test_a_redirect_never_leaves_https_for_plain_http():
    """An https URL's image could be swapped on the path once a redirect took
    it to http; https to https, and http anywhere http(s), stay followed."""
    from nst.fetch import next_hop

    assert next_hop("https://a.example/x.png", "/y.png", "content_url") == "https://a.example/y.png"
    assert next_hop("https://a.example/x.png", "https://b.example/y", "content_url") == "https://b.example/y"
    assert next_hop("http://a.example/x.png", "https://b.example/y", "content_url") == "https://b.example/y"
    assert next_hop("http://a.example/x.png", "http://b.example/y", "content_url") == "http://b.example/y"
    assert next_hop("https://a.example/x.png", "//b.example/y", "content_url") == "https://b.example/y"
    for location in ("http://b.example/y.png", "HTTP://a.example/x.png"):
        with pytest.raises(RequestError) as e:
            next_hop("https://a.example/x.png", location, "style_url")
        assert e.value.code == 400 and e.value.message.startswith("style_url: a redirect from https")


class _StuckNameServer:
    """getaddrinfo() for `*.stuck.test` blocks until released, as a name
    server that never answers keeps the system resolver retrying (30 s and
    more); every other name resolves as before."""

    def __init__(self, monkeypatch):
        import socket
        import threading

        self.release = threading.Event()
        self.asked = 0
        self.waiting = 0  # lookups blocked right now
        count = threading.Lock()  # lookups run on threads of their own: += alone can lose a count
        real = socket.getaddrinfo

        def getaddrinfo(host, *args, **kwargs):
            if not str(host).endswith(".stuck.test"):
                return real(host, *args, **kwargs)
            with count:
                self.asked += 1
                self.waiting += 1
            self.release.wait(60)
            with count:
                self.waiting -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_lookup_that_never_answers_is_cut_at_the_total_deadline(monkeypatch):
    """No socket timeout covers getaddrinfo(): before the lookup ran on its own
    thread, a stuck name server held the worker until the resolver gave up and
    then read as a connection error (400), whatever url_total_timeout_s said."""
    stuck = _StuckNameServer(monkeypatch)
    try:
        with pytest.raises(RequestError) as e:
            fetch("http://img.stuck.test/a.png", "style_url", LIMITS)
        assert stuck.asked == 1 and stuck.waiting == 1  # answered while the lookup still hangs
        assert e.value.code == 504 and e.value.message == "style_url: the download took longer than 1 s"
    finally:
        stuck.release.set()
    # the thread left behind ends (giving its slot back) once the resolver gives up
    _wait_for_lookups_to_end()


def test_lookups_left_running_are_bounded_and_the_next_url_waits_for_none(site, monkeypatch):
    """Each stuck lookup a download gave up on keeps a thread until the
    resolver gives up; past MAX_PENDING_LOOKUPS of them a URL input is refused
    at once, its lookup never started, and fetching works again once they end."""
    from nst.config import MAX_PENDING_LOOKUPS

    fast = dataclasses.replace(LIMITS, url_total_timeout_s=0.05)
    stuck = _StuckNameServer(monkeypatch)
    try:
        for i in range(MAX_PENDING_LOOKUPS):
            with pytest.raises(RequestError) as e:
                fetch(f"http://img{i}.stuck.test/a.png", "content_url", fast)
            assert e.value.code == 504 and "longer than" in e.value.message
        assert wait_for(lambda: stuck.waiting == MAX_PENDING_LOOKUPS, 10, 0.01)  # each thread reached the resolver
        with pytest.raises(RequestError) as e:
            fetch("http://one-more.stuck.test/a.png", "content_url", fast)
        assert e.value.code == 503  # the server is busy: the request itself is fine
        assert e.value.message == "content_url: too many earlier name lookups are still running; try again later"
        assert stuck.asked == MAX_PENDING_LOOKUPS
    finally:
        stuck.release.set()
    _wait_for_lookups_to_end()
    assert fetch(site.url("/img.png"), "content_url", LIMITS, session_factory=LOOPBACK_OK, allowed_ports=None) == PNG


def _wait_for_lookups_to_end():
    import threading

    assert wait_for(lambda: not any(t.name == "fetch-lookup" for t in threading.enumerate()), 10, 0.01)


def test_a_lookup_slot_is_given_back_when_its_thread_cannot_start(monkeypatch):
    """A process out of threads: the URL input fails, and the slot it took
    is free again (else eight such failures refused every URL for good)."""
    import threading

    from nst.config import MAX_PENDING_LOOKUPS

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    for _ in range(MAX_PENDING_LOOKUPS + 1):
        with pytest.raises(RuntimeError):
            fetch("http://img.example.test/a.png", "content_url", LIMITS)
    monkeypatch.undo()
    from nst import fetch as fetch_module

    assert fetch_module._pending.acquire(blocking=False)  # a slot is free
    fetch_module._pending.release()


def test_loading_the_module_again_keeps_one_wrapper_around_the_original(site):
    """A reload ran the patch again: the wrapper then wrapped itself and every
    lookup recursed until RecursionError."""
    import importlib

    from requests_hardened import ip_filter

    from nst import fetch as fetch_module

    original = fetch_module._resolve
    importlib.reload(fetch_module)
    assert fetch_module._resolve is original and ip_filter.get_ip_address is fetch_module._resolve_by_deadline
    assert fetch_module.fetch(site.url("/img.png"), "content_url", LIMITS, session_factory=LOOPBACK_OK,
                              allowed_ports=None) == PNG
