"""Fakes for tests, shipped with the package so that any test (ours, or a user's) can
run gtun's edges without sockets or root: in-memory transports (transport.py), as
wireguard-go ships conn/bindtest beside conn, a TUN device over a socketpair (tun.py),
as wireguard-go ships tun/tuntest beside tun, a relay and clients wired together in
memory (link.py), and the machine a daemon changes (platform.py)."""
