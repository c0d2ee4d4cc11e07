"""The SSRF guard: which URLs and addresses a webhook may go to."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from spool import netguard
from spool.netguard import ResolvedTarget, UnresolvableHost, UnsafeURL, check_url

PRIVATE_BUT_ALLOWABLE = [
    "http://127.0.0.1/",
    "http://127.1/",  # the short form inet_aton accepts
    "http://2130706433/",  # 127.0.0.1 as one integer
    "http://10.0.0.5/hook",
    "http://172.16.3.4/",
    "http://172.31.255.255/",
    "http://192.168.1.1:8080/",
    "http://[::1]:8000/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.1.2.3]/",
    "http://[fd12:3456::1]/",
    "http://169.254.10.20/",
    "http://[fe80::1]/",
    "http://100.64.0.1/",
    "http://localhost:8000/",
]

ALWAYS_REFUSED = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://[::ffff:169.254.169.254]/",
    "http://0.0.0.0:8000/",
    "http://0.1.2.3/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
]


@pytest.mark.parametrize("url", PRIVATE_BUT_ALLOWABLE)
def test_private_addresses_refused_by_default(url: str) -> None:
    with pytest.raises(UnsafeURL) as info:
        check_url(url, allow_private=False)
    assert "SPOOL_WEBHOOK_ALLOW_PRIVATE" in info.value.reason


@pytest.mark.parametrize("url", PRIVATE_BUT_ALLOWABLE)
def test_private_addresses_allowed_when_asked(url: str) -> None:
    targets = check_url(url, allow_private=True)
    assert targets and all(isinstance(t, ResolvedTarget) for t in targets)


@pytest.mark.parametrize("url", ALWAYS_REFUSED)
@pytest.mark.parametrize("allow_private", [False, True])
def test_metadata_unspecified_multicast_reserved_always_refused(
    url: str, allow_private: bool
) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=allow_private)


def test_messages_name_the_reason() -> None:
    with pytest.raises(UnsafeURL, match="169.254.169.254 is a cloud metadata endpoint"):
        check_url("http://169.254.169.254/", allow_private=True)
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("http://127.0.0.1/")
    with pytest.raises(UnsafeURL, match=r"host 'localhost' resolves to .*, which is loopback"):
        check_url("http://localhost/")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        "javascript:alert(1)",
        "example.com/hook",
        "http:///nohost",
        "https://user:pass@example.com/",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://127.0.0.1\\@example.com/",
        "",
        "https://example.com/" + "a" * 3000,
    ],
)
def test_malformed_or_disallowed_urls(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=True)


def test_public_ip_literal_passes_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an IP literal must not be resolved")

    monkeypatch.setattr(netguard.socket, "getaddrinfo", no_dns)
    [target] = check_url("https://93.184.216.34/hooks?a=1#frag")
    assert target == ResolvedTarget("https", "93.184.216.34", 443, "93.184.216.34", "/hooks?a=1")
    [v6] = check_url("http://[2606:4700::1111]:8080")
    assert v6.address == "2606:4700::1111" and v6.path == "/"
    assert v6.host_header == "[2606:4700::1111]:8080"


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Any] = []
        for address in answers[host]:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out

    monkeypatch.setattr(netguard.socket, "getaddrinfo", getaddrinfo)


def test_every_resolved_address_must_be_public(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(
        monkeypatch,
        {
            "hooks.example.com": ["93.184.216.34", "2606:2800:220:1::1"],
            "rebind.example.com": ["93.184.216.34", "10.0.0.1"],
            "mapped.example.com": ["::ffff:169.254.169.254"],
            "sixtofour.example.com": ["2002:7f00:1::1"],
            "nat64.example.com": ["64:ff9b::a00:1"],
        },
    )
    targets = check_url("https://hooks.example.com/in")
    assert [t.address for t in targets] == ["93.184.216.34", "2606:2800:220:1::1"]
    assert {t.host for t in targets} == {"hooks.example.com"}
    assert targets[0].host_header == "hooks.example.com"

    with pytest.raises(UnsafeURL, match="10.0.0.1, which is private"):
        check_url("https://rebind.example.com/")
    with pytest.raises(UnsafeURL, match="metadata"):
        check_url("https://mapped.example.com/", allow_private=True)
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("https://sixtofour.example.com/")
    with pytest.raises(UnsafeURL, match="private"):
        check_url("https://nat64.example.com/")
    with pytest.raises(UnresolvableHost):
        check_url("https://nowhere.example.com/")


def test_idna_hostnames_are_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"xn--bcher-kva.example": ["93.184.216.34"]})
    [target] = check_url("https://bücher.example/")
    assert target.host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("100.64.1.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("192.0.2.1", "special-purpose"),
        ("2001:db8::1", "special-purpose"),
        ("::127.0.0.1", "reserved"),
        ("fe80::1%eth0", "link-local"),
    ],
)
def test_classify(address: str, kind: str | None) -> None:
    import ipaddress

    assert netguard.classify(ipaddress.ip_address(address)) == kind
