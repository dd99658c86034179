from __future__ import annotations

import random
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

import pytest

from gtun.core.routing import RouteTable

Network = IPv4Network | IPv6Network


def _ip(text: str) -> bytes:
    return ip_address(text).packed


def test_empty_table() -> None:
    table: RouteTable[str] = RouteTable()
    assert len(table) == 0
    assert not table
    assert table.lookup(_ip("10.0.0.1")) is None
    assert table.lookup(_ip("::1")) is None
    assert table.routes() == []


def test_longest_prefix_wins() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("10.0.0.0/8"), "eight")
    table.insert(ip_network("10.1.0.0/16"), "sixteen")
    table.insert(ip_network("10.1.2.0/24"), "twentyfour")
    table.insert(ip_network("10.1.2.3/32"), "host")
    assert table.lookup(_ip("10.1.2.3")) == "host"
    assert table.lookup(_ip("10.1.2.4")) == "twentyfour"
    assert table.lookup(_ip("10.1.3.4")) == "sixteen"
    assert table.lookup(_ip("10.2.3.4")) == "eight"
    assert table.lookup(_ip("11.0.0.0")) is None
    assert len(table) == 4


def test_default_routes() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("0.0.0.0/0"), "v4 default")
    table.insert(ip_network("::/0"), "v6 default")
    table.insert(ip_network("192.168.0.0/16"), "lan")
    assert table.lookup(_ip("8.8.8.8")) == "v4 default"
    assert table.lookup(_ip("192.168.3.3")) == "lan"
    assert table.lookup(_ip("2001:db8::1")) == "v6 default"
    assert table.lookup(_ip("255.255.255.255")) == "v4 default"


def test_host_routes_v6() -> None:
    table: RouteTable[int] = RouteTable()
    table.insert(ip_network("fd66::/64"), 1)
    table.insert(ip_network("fd66::5/128"), 2)
    assert table.lookup(_ip("fd66::5")) == 2
    assert table.lookup(_ip("fd66::6")) == 1
    assert table.lookup(_ip("fd67::5")) is None
    assert table.lookup_ip(IPv6Address("fd66::5")) == 2


def test_families_are_separate() -> None:
    table: RouteTable[str] = RouteTable()
    # ::/96 holds the same integers as 0.0.0.0/0 but must not match IPv4 addresses.
    table.insert(ip_network("::/96"), "v6")
    assert table.lookup(_ip("1.2.3.4")) is None
    assert table.lookup(_ip("::1.2.3.4")) == "v6"
    table.insert(ip_network("0.0.0.0/0"), "v4")
    assert table.lookup(_ip("1.2.3.4")) == "v4"
    assert table.lookup(_ip("::1.2.3.4")) == "v6"


@pytest.mark.parametrize("length", [0, 3, 5, 15, 17, 32])
def test_other_lengths_find_nothing(length: int) -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("0.0.0.0/0"), "v4")
    table.insert(ip_network("::/0"), "v6")
    assert table.lookup(b"\x00" * length) is None


def test_insert_replaces() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("10.0.0.0/8"), "a")
    table.insert(ip_network("10.0.0.0/8"), "b")
    assert len(table) == 1
    assert table.lookup(_ip("10.9.9.9")) == "b"
    assert table.get(ip_network("10.0.0.0/8")) == "b"
    assert table.get(ip_network("10.0.0.0/9")) is None


def test_remove() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("10.0.0.0/8"), "wide")
    table.insert(ip_network("10.1.0.0/16"), "narrow")
    assert table.remove(ip_network("10.1.0.0/16")) is True
    assert table.remove(ip_network("10.1.0.0/16")) is False
    assert table.remove(ip_network("10.2.0.0/16")) is False
    assert table.lookup(_ip("10.1.0.1")) == "wide"
    assert table.remove(ip_network("10.0.0.0/8")) is True
    assert table.lookup(_ip("10.1.0.1")) is None
    assert len(table) == 0
    assert not table


def test_remove_value() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("10.66.0.2/32"), "alice")
    table.insert(ip_network("192.168.88.0/24"), "alice")
    table.insert(ip_network("fd66::2/128"), "alice")
    table.insert(ip_network("10.66.0.3/32"), "bob")
    table.insert(ip_network("0.0.0.0/0"), "relay")
    assert table.remove_value("alice") == 3
    assert table.remove_value("alice") == 0
    assert table.lookup(_ip("192.168.88.7")) == "relay"
    assert table.lookup(_ip("10.66.0.3")) == "bob"
    assert table.lookup(_ip("fd66::2")) is None
    assert len(table) == 2


def test_routes_listing() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("fd66::/64"), "c")
    table.insert(ip_network("10.1.0.0/16"), "b")
    table.insert(ip_network("10.0.0.0/8"), "a")
    assert table.routes() == [
        (IPv4Network("10.0.0.0/8"), "a"),
        (IPv4Network("10.1.0.0/16"), "b"),
        (IPv6Network("fd66::/64"), "c"),
    ]
    table.clear()
    assert table.routes() == []


def test_accepts_bytearray_and_memoryview() -> None:
    table: RouteTable[str] = RouteTable()
    table.insert(ip_network("10.0.0.0/8"), "a")
    packet = bytearray(b"\x00" * 16 + _ip("10.2.3.4"))
    assert table.lookup(bytes(packet[16:20])) == "a"
    assert table.lookup(memoryview(packet)[16:20]) == "a"


def _brute_force(routes: dict[Network, int], address: IPv4Address | IPv6Address) -> int | None:
    best: Network | None = None
    for network in routes:
        if network.version != address.version or address not in network:
            continue
        if best is None or network.prefixlen > best.prefixlen:
            best = network
    return None if best is None else routes[best]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    table: RouteTable[int] = RouteTable()
    routes: dict[Network, int] = {}

    # Networks cluster under a few bases so that prefixes really overlap.
    bases4 = [rng.getrandbits(32) for _ in range(3)]
    bases6 = [rng.getrandbits(128) for _ in range(3)]

    def random_network() -> Network:
        if rng.random() < 0.5:
            length = rng.randint(0, 32)
            bits = rng.choice(bases4) ^ rng.getrandbits(8)
            return IPv4Network((bits >> (32 - length) << (32 - length), length))
        length = rng.randint(0, 128)
        bits = rng.choice(bases6) ^ rng.getrandbits(16)
        return IPv6Network((bits >> (128 - length) << (128 - length), length))

    def random_address() -> IPv4Address | IPv6Address:
        if rng.random() < 0.5:
            return IPv4Address(rng.choice(bases4) ^ rng.getrandbits(rng.choice([4, 8, 32])))
        return IPv6Address(rng.choice(bases6) ^ rng.getrandbits(rng.choice([8, 16, 128])))

    for step in range(600):
        action = rng.random()
        if action < 0.6:
            network = random_network()
            routes[network] = step
            table.insert(network, step)
        elif action < 0.8 and routes:
            network = rng.choice(list(routes))
            del routes[network]
            assert table.remove(network)
        elif routes:
            value = routes[rng.choice(list(routes))]
            gone = [n for n, v in routes.items() if v == value]
            for n in gone:
                del routes[n]
            assert table.remove_value(value) == len(gone)
        assert len(table) == len(routes)
        for _ in range(10):
            address = random_address()
            assert table.lookup(address.packed) == _brute_force(routes, address)
            assert table.lookup_ip(address) == _brute_force(routes, address)
    assert sorted(table.routes(), key=lambda r: str(r[0])) == sorted(
        routes.items(), key=lambda r: str(r[0])
    )
