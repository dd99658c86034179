"""A gtun client, sans-IO: one WireGuard peer (the relay) plus gtun's configuration push,
and every decision about staying connected (fallback to TCP and back, backoff, silence,
new paths) as timers and events, so that the daemon only does I/O.

Theory of operation
-------------------
The client is in one of three states (`state`): CONNECTING, CONNECTED, REFUSED.  The
moves between them are the table TRANSITIONS, and `_move()` takes no other; every cause
that remote input can bring has a row from every state, so no datagram can make a move
fail.  Each row below is one thing that happens: what causes it, and what the core does
and says (the events the daemon acts on).

    state         cause                                    effect (events)
    -----------   --------------------------------------   --------------------------------
    CONNECTING    start() / new_path()                     handshake initiation
    CONNECTING    an initiation unanswered                 WireGuard retransmits; NoAnswer
                                                           (attempts), for the daemon to say
    CONNECTING    transport "auto" on UDP: FALLBACK_AFTER  Fallback (the daemon dials TCP,
                  with no handshake (at start, or after    keeps its UDP socket, and calls
                  silence or a loss: below)                new_path()); on TCP now
    CONNECTING    a TCP path (new_path()) and no           NoHandshake(transports): the
                  handshake for NO_HANDSHAKE_AFTER         relay does not know this key;
                                                           reachability "no_handshake"
    CONNECTING    WireGuard gives up a round               GaveUpRound(retry_in): the next
                  (REKEY_ATTEMPT_TIME)                     round after a backoff doubling
                                                           from FIRST_BACKOFF to MAX_BACKOFF
    CONNECTING    handshake completes                      -> CONNECTED: Connected; asks for
                                                           its configuration (as responder:
                                                           once the relay's first message
                                                           confirms the session)
    CONNECTED     no CONFIG yet                            asks again every CONFIG_RETRY
    CONNECTED     CONFIG                                   ConfigReceived(config, changed)
    any           REFUSED, or a CONFIG of the other mode   -> REFUSED: Refused(reason)
    CONNECTED     every ping_interval                      PING (the relay answers PONG)
    CONNECTED     relay silent for dead_after              -> CONNECTING: Disconnected
                                                           (the daemon drops a TCP
                                                           connection, to be made again)
    CONNECTED     roamed(): the local address or route     a keepalive now, from the new
                  to the relay changed                     address: the relay follows it
    CONNECTING    roamed()                                 a handshake initiation now
    REFUSED       roamed()                                 nothing
    CONNECTED     path MTU found lower or higher           MtuChanged(mtu, reason): the
                  (below)                                  daemon sets the device's MTU
    CONNECTED     failover: the relay lost (CHECK_PINGS    -> CONNECTING: Disconnected; a
                  pings unanswered, below)                 failover round (below)
    CONNECTED     "auto" on TCP: UDP probes, the switch    see "The auto transport"; the
                  back to UDP                              state stays CONNECTED throughout
    CONNECTED     silence, with other relays known         the same failover round
    CONNECTING    failover: a handshake with another       -> CONNECTED ("moved"):
                  known relay completes first              RelayChanged, Connected; asks
                                                           that relay for its configuration
    CONNECTED     failover: another relay's handshake      RelayChanged ("moved"), make-
                  RTT is below MOVE_RATIO of this one's    before-break: its session is up
                  (no move within MOVE_HOLD of the last)   before the first packet goes
    REFUSED       failover causes ("moved", "lost")        nothing

A PING is data, so WireGuard's own timer starts a new handshake when no answer came for
KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: that is how a restarted relay (which has forgotten
every session) is noticed and rejoined, unless the relay initiates first (it does, to
the endpoints it stored: relay.py).  Every new session asks for the configuration
again: the relay may have restarted or changed.

A client that only receives sends nothing for up to KEEPALIVE_TIMEOUT, so when its
address changes the relay would go on sending to the old one; roamed() (the daemon
watches the routing tables) sends at once from the new address, as wireguard-go does.

The device mode is `mode` ("tun" or "tap") when the user chose one, which the
configuration request carries (a relay in the other mode refuses); with mode None the
client follows the relay's mode from the CONFIG.  In TAP mode the device carries
Ethernet frames, which travel wrapped in gtun's frame header (l2frame.py).

The auto transport (issue 13)
-----------------------------
With transport "auto" the client starts over UDP and falls back to TCP when UDP brings
no handshake in FALLBACK_AFTER (at start, and again whenever it is back to CONNECTING
over UDP).  It keeps the relay's UDP address (and the daemon its UDP socket) to probe UDP
from TCP, and comes back make-before-break: data moves to UDP only once a handshake over
UDP completed, and TCP closes only once the relay's data arrives over UDP.  While both
paths are open the core, not WireGuard's roaming, picks the relay's endpoint (`_pin`).
A probe is a handshake initiation over UDP, not retransmitted; the relay, following the
latest authentic source, sends over UDP from the moment it reaches it.

    probe_state   cause                                    effect (events)
    -----------   --------------------------------------   --------------------------------
    None          a session over TCP, the first after a    a probe at once (was UDP
                  Fallback                                 blocked, or the relay down?)
    None          later sessions over TCP                  a probe after the interval
    None          the probe timer: udp_probe_interval,     a probe: PROBING (TCP carries
                  doubling to UDP_PROBE_MAX while          the data meanwhile)
                  unanswered
    PROBING       UDP_PROBE_WAIT, no answer                a keepalive over TCP (the relay
                                                           follows back); the first time
                                                           after a Fallback
                                                           UdpBlocked(probe_in) and
                                                           reachability "udp_blocked",
                                                           else UdpUnanswered(probe_in)
    PROBING, or   a handshake completes over UDP (a        SWITCHING: data over UDP, TCP
    None on TCP   probe's answer, or the relay initiated)  open; the CONFIG request too
    SWITCHING     the relay's data arrives over UDP        UdpBack(after): on UDP again,
                                                           reachability None, the daemon
                                                           closes TCP (a reset: what it
                                                           holds is stale); the probe
                                                           interval starts over
    SWITCHING     UDP_PROBE_WAIT, no data over UDP         back to TCP, as PROBING above
    any           silence, a loss, another relay joined    no probe under way or due; a
                                                           SWITCHING client back to TCP

NoHandshake tells a relay that does not know this client's key from blocked UDP: a TCP
connection that is accepted and then never answered (nor UDP before it) means the relay
is there and drops the handshakes, which it does for an unknown key (or a wrong
server_public_key).  A transport "tcp" client says it too; "udp" cannot tell the two.

Failover (issue 12)
-------------------
A relay of a mesh pushes the other relays of its network (tunnel.Caps.relays: name, key,
endpoint), which the client makes WireGuard peers of its own (at most MAX_RELAYS, besides
the configured relay) and announces (RelaysLearned: the daemon keeps them in its state
directory and gives them back at start, `known`).  The relay in use is `server`; the
others are peers with no traffic, which a push replaces (a relay gone from the push is
forgotten; the configured relay never is).  Each relay's handshake RTT is measured from
the client's own initiations (initiation sent to response, a smoothed mean): start()
initiates to every known relay at once, and while connected one other relay is measured
every MEASURE_INTERVAL.  The first relay to answer at start, or after a loss, is joined.

Loss: while the client sends and nothing came from its relay for SUSPECT_AFTER (and
after every periodic PING), it sends a PING every CHECK_INTERVAL; CHECK_PINGS unanswered
mean the relay is lost: a failover round initiates to every known relay (the lost one
too) and the first to complete the handshake is joined.  So traffic that is flowing
stops for at most SUSPECT_AFTER + CHECK_PINGS * CHECK_INTERVAL (3.25 s) plus a handshake
and a configuration round trip: under 5 s on any sane path.  The new relay is asked for
the configuration; relays sharing a store give the same lease, so the address stays
(ConfigReceived.changed says when it did not).  Packets from any known relay are taken,
so what the old relay sent before a move is not lost.  Over TCP a failover round names
the next relay by RTT (RelayChanged) and the daemon dials it.

Path MTU (in the spirit of RFC 8899, packetization-layer PMTU discovery)
------------------------------------------------------------------------
Over UDP, with a relay that answers probes (Caps.pmtu) and `pmtu` on, the client checks
that a packet of the tunnel's MTU still crosses the path, and finds the largest that does
when it no longer does.  A probe is a gtun PROBE padded to the size under test, so the
datagram has exactly the size a data packet of that MTU makes (IPv4 or IPv6 underlay
alike: the probe crosses the real path); the relay answers with a PROBE_ACK of the
same length, so both directions are tested.  The relay's pushed MTU is the ceiling; the
floor is MIN_MTU (1280 when the tunnel carries IPv6, which Linux drops from a device
below 1280).  Sizes are multiples of PMTU_STEP (WireGuard pads to 16), and the ceiling.

    pmtu state   cause                                   effect
    ----------   -------------------------------------   ----------------------------------
    (off)        CONFIG with pmtu, over UDP              CONFIRM: probe the MTU now
    CONFIRM      a packet over the floor from the TUN,   probe at the current MTU (data
                 BUSY_CONFIRM after the last answer;     that may be vanishing: find out
                 or idle for IDLE_CONFIRM                soon), or probe when idle
    CONFIRM      a probe answered                        the MTU is good; MtuChanged if a
                                                         raise search found more
    CONFIRM      MAX_PROBES probes at the MTU unanswered black hole?  SEARCH from the floor
                                                         up to the MTU itself
    CONFIRM      below the ceiling for raise_interval    SEARCH above the MTU (a raise)
    SEARCH       a round: PROBES_PER_ROUND sizes at      next round between the largest
                 once, over by probe_timeout or when     answered and the smallest lost
                 all are answered                        MAX_PROBES times; none left:
                                                         CONFIRM, MtuChanged if moved
    SEARCH       nothing answered in MAX_PROBES rounds,  the path is down, not narrow:
                 not even the floor                      MTU kept, CONFIRM
    any          TCP (or a fallback to it), or no cap    no probes (a stream has no PMTU
                                                         problem to find)

A probe waits for its answer srtt + 4 rttvar of the earlier answers (RFC 6298), no less
than MIN_PROBE_TIMEOUT and no more than probe_timeout. Only an answer proves a size; a
size fails once it went unanswered in MAX_PROBES rounds (as the MTU itself fails after
MAX_PROBES lost confirmations), so random loss seldom makes a search stop low, and when
it does the next raise finds the rest.

The relay's health
------------------
ask_health() sends the relay in use a HEALTH_REQUEST when its configuration granted
tunnel.Caps.health (an older relay never did, and is never asked); the answer comes as
HealthReceived with the request's id.  At most MAX_HEALTH_PENDING wait; the daemon
bounds the wait itself (`gtun doctor` asks through the control socket).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from gtun.core import bulk, l2frame
from gtun.core import tunnel as tm
from gtun.core.drops import CLIENT_DROP_REASONS
from gtun.core.errors import LocalProtocolError
from gtun.core.offload import Gso, OffloadError
from gtun.core.packet import packet_length, tunnel_addresses
from gtun.core.tunnel import NO_CAPS, Caps, PushedConfig
from gtun.core.wg import HandshakeCompleted, HandshakeTimedOut, Peer, WireGuard
from gtun.core.wg.constants import REKEY_TIMEOUT
from gtun.core.wg.crypto import is_degenerate_key
from gtun.core.wg.events import Event

# Tuning knobs.
CONFIG_RETRY = 2.0  # seconds between configuration requests until a CONFIG comes
PING_INTERVAL = 10.0
FIRST_BACKOFF = 2.0  # after a round of handshakes went unanswered ...
MAX_BACKOFF = 60.0  # ... doubling up to this
FALLBACK_AFTER = 5.0  # transport "auto": seconds without a handshake over UDP
# Transport "auto" on TCP (see "The auto transport" in the docstring).  Tuning knobs:
UDP_PROBE_INTERVAL = 30.0  # try UDP again this long after the last try ...
UDP_PROBE_MAX = 240.0  # ... doubling while it goes unanswered, up to this
UDP_PROBE_WAIT = 3.0  # a UDP probe waits this long for its answer, then for UDP data
NO_HANDSHAKE_AFTER = 8.0  # TCP connected and no handshake this long: the key is unknown
MAX_EVENTS = 1024  # events kept for a caller that does not drain them

# Failover (see the docstring).  Tuning knobs:
SUSPECT_AFTER = 1.0  # sending, and nothing from the relay this long: check it
CHECK_INTERVAL = 0.75  # a check PING this often ...
CHECK_PINGS = 3  # ... unanswered this many times in a row: the relay is lost
MEASURE_INTERVAL = 300.0  # a handshake to one other known relay this often, for its RTT
MOVE_RATIO = 0.75  # move to a relay whose RTT is below this share of the current one's ...
MOVE_MARGIN = 0.005  # ... and lower by at least this many seconds
MOVE_HOLD = 60.0  # and not within this long of the last move
MAX_RELAYS = tm.MAX_RELAYS  # known relays kept besides the configured one
MAX_HEALTH_PENDING = 16  # health requests awaiting their answer (the oldest forgotten)

# Path MTU discovery (RFC 8899 names in comments).  Tuning knobs:
PROBE_TIMEOUT = 1.0  # seconds a probe waits for its answer at most (PROBE_TIMER) ...
MIN_PROBE_TIMEOUT = 0.25  # ... and at least: srtt + 4 rttvar of the answers between
MAX_PROBES = 3  # unanswered probes at the MTU that make a black hole (MAX_PROBES)
BUSY_CONFIRM = 1.0  # with large packets flowing: confirm the MTU at most this often
IDLE_CONFIRM = 30.0  # otherwise this often
RAISE_INTERVAL = 60.0  # below the ceiling: try higher this often (PMTU_RAISE_TIMER)
PROBES_PER_ROUND = 8  # sizes probed at once in a search round
# Sizes, from specifications:
MIN_MTU = 576  # IPv4's minimum datagram size (RFC 791)
MIN_MTU_IPV6 = 1280  # IPv6's minimum link MTU (RFC 8200); Linux disables IPv6 below it
PMTU_STEP = 16  # WireGuard pads plaintexts to a multiple of 16 (whitepaper 5.4.6)

TRANSPORTS = ("udp", "tcp", "auto")

# States, and the table of moves between them (state, cause) -> next state, after h11's
# _state.py.  Causes: "handshake" (a session completed), "silence" (nothing from the relay
# for dead_after), "refused" (the relay said no).
CONNECTING = "CONNECTING"
CONNECTED = "CONNECTED"
REFUSED = "REFUSED"
STATES = (CONNECTING, CONNECTED, REFUSED)
# Path MTU discovery's states (pmtu_state; None while not probing).
CONFIRM = "CONFIRM"
SEARCH = "SEARCH"
# Transport "auto" on TCP: a UDP probe's states (probe_state; None: none under way).
PROBING = "PROBING"  # a handshake initiation went over UDP; TCP carries the data
SWITCHING = "SWITCHING"  # that handshake completed: data goes over UDP, TCP still open
# What the client concluded about the way to the relay (`reachability`; None: nothing
# wrong that it knows of).
UDP_BLOCKED = "udp_blocked"  # TCP handshakes, UDP does not: on TCP, trying UDP again
NO_HANDSHAKE = "no_handshake"  # TCP connects, yet no handshake over any transport

TRANSITIONS: dict[tuple[str, str], str] = {
    (CONNECTING, "handshake"): CONNECTED,
    (CONNECTED, "handshake"): CONNECTED,  # a new session: rekey, or a restarted relay
    (REFUSED, "handshake"): REFUSED,  # refused stays refused
    (CONNECTED, "silence"): CONNECTING,
    (CONNECTING, "refused"): REFUSED,
    (CONNECTED, "refused"): REFUSED,
    (REFUSED, "refused"): REFUSED,
    (CONNECTING, "roamed"): CONNECTING,
    (CONNECTED, "roamed"): CONNECTED,
    (REFUSED, "roamed"): REFUSED,
    # Failover: another known relay's handshake completed and it is joined ...
    (CONNECTING, "moved"): CONNECTED,
    (CONNECTED, "moved"): CONNECTED,  # make-before-break, to a better relay
    (REFUSED, "moved"): REFUSED,
    # ... and the relay in use stopped answering its check PINGs.
    (CONNECTED, "lost"): CONNECTING,
    (CONNECTING, "lost"): CONNECTING,
    (REFUSED, "lost"): REFUSED,
}
REMOTE_CAUSES = ("handshake", "refused", "moved")  # what a datagram can bring about
LOCAL_CAUSES = ("silence", "roamed", "lost")  # what a timer or the daemon brings about


@dataclass
class RelayPeer:
    """`Peer.data` of a relay: what it and this client both do (its configuration
    said, ANDed with this client's own abilities), and what failover knows of it."""

    caps: Caps = NO_CAPS
    name: str = ""
    endpoint: str | None = None  # as pushed (None: the configured relay's, the daemon's)
    rtt: float | None = None  # the smoothed handshake round trip, seconds
    configured: bool = False  # the relay the configuration names: never forgotten


# A relay this client learnt (from a push, or its state), as the daemon keeps it: what a
# push carries, the same record.
KnownRelay = tm.RelayInfo


@dataclass(frozen=True, slots=True)
class Connected(Event):
    pass


@dataclass(frozen=True, slots=True)
class Disconnected(Event):
    silent_for: float


@dataclass(frozen=True, slots=True)
class ConfigReceived(Event):
    config: PushedConfig
    changed: bool


@dataclass(frozen=True, slots=True)
class Refused(Event):
    reason: str


@dataclass(frozen=True, slots=True)
class GaveUpRound(Event):
    """A round of handshakes went unanswered; the next starts after `retry_in`."""

    retry_in: float


@dataclass(frozen=True, slots=True)
class NoAnswer(Event):
    """The relay has not answered `attempts` handshake initiations (so far)."""

    attempts: int


@dataclass(frozen=True, slots=True)
class MtuChanged(Event):
    """The path carries packets of `mtu` bytes (and, when lowered, not larger); the
    daemon sets the device's MTU.  `reason` says why, for the log."""

    mtu: int
    reason: str


@dataclass(frozen=True, slots=True)
class RelayChanged(Event):
    """The client now uses another relay: `endpoint` as pushed (None: the configured
    relay's).  Over UDP the core already sends there; over TCP the daemon dials it."""

    name: str
    public_key: bytes
    endpoint: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class RelaysLearned(Event):
    """The known relays changed (a push): the daemon keeps them in its state."""

    relays: tuple[KnownRelay, ...]


@dataclass(frozen=True, slots=True)
class HealthReceived(Event):
    """The relay's answer to health request `id` (ask_health())."""

    id: int
    health: tm.RelayHealth


@dataclass(frozen=True, slots=True)
class Fallback(Event):
    """Transport "auto": UDP brought no handshake in `after` seconds; use TCP (the
    daemon dials the relay and keeps its UDP socket, for the probes)."""

    after: float


@dataclass(frozen=True, slots=True)
class NoHandshake(Event):
    """A TCP connection to the relay is up, yet no handshake came over it (nor over UDP
    before it, with "auto") in `after` seconds: the relay does not know this client's
    key (or server_public_key is not the relay's).  `transports`: those tried."""

    transports: tuple[str, ...]
    after: float


@dataclass(frozen=True, slots=True)
class UdpBlocked(Event):
    """Transport "auto": TCP handshakes and UDP does not (a UDP probe right after the
    TCP handshake went unanswered): UDP is blocked on the way.  Said once a fallback;
    UDP is tried again in `probe_in` seconds."""

    probe_in: float


@dataclass(frozen=True, slots=True)
class UdpUnanswered(Event):
    """Transport "auto": a later UDP probe went unanswered; the next in `probe_in`."""

    probe_in: float


@dataclass(frozen=True, slots=True)
class UdpBack(Event):
    """Transport "auto": UDP answered a probe and the relay's data arrives over it: the
    client is on UDP again (`after` seconds after its fallback), and the daemon closes
    the TCP connection."""

    after: float


class ClientCore:
    def __init__(
        self,
        private_key: bytes,
        server_public_key: bytes,
        endpoint: Hashable | None,
        *,
        mode: str | None = "tun",
        wall_offset: float = 0.0,
        ping_interval: float = PING_INTERVAL,
        accept_partial: bool = False,
        transport: str = "udp",
        pmtu: bool = True,
        raise_interval: float = RAISE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        known: Iterable[KnownRelay] = (),
        endpoint_of: Callable[[str], Hashable | None] | None = None,
        failover: bool = True,
        udp_probe_interval: float = UDP_PROBE_INTERVAL,
        preshared_key: bytes | None = None,
    ) -> None:
        """`accept_partial`: this client completes TCP checksums the relay leaves partial
        (its device does, or its edge finishes them).  `transport`: "udp", "tcp" or
        "auto" (UDP, and Fallback when it brings no handshake).  `pmtu`: probe the path
        MTU (over UDP, when the relay answers probes); `raise_interval` and
        `probe_timeout` are its timers.  `known`: the relays learnt before (the
        daemon's state); `endpoint_of` turns a pushed endpoint into one the transport
        sends to (None: unusable; by default the text itself); `failover`: ask for the
        other relays and move between them.  `udp_probe_interval`: with "auto", on TCP,
        seconds between tries of UDP (doubling up to UDP_PROBE_MAX while unanswered).
        `preshared_key`: WireGuard's PSK, the same with every relay of the network (they
        share the peer's record).
        Raises ValueError for an unknown transport or a probe interval not above 0."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        if not udp_probe_interval > 0:
            raise ValueError(f"udp_probe_interval must be above 0, not {udp_probe_interval}")
        self.wg = WireGuard(private_key, wall_offset=wall_offset)
        self.wg.on_packet = self._on_packet  # the data fast lane
        self.relay = RelayPeer(configured=True)
        self.accept_partial = accept_partial
        self.preshared_key = preshared_key
        self.server = self.wg.add_peer(
            server_public_key, preshared_key=preshared_key, endpoint=endpoint, data=self.relay
        )
        self.mode = mode
        self.transport = transport
        self.ping_interval = ping_interval
        self.dead_after = 2 * ping_interval + 5.0
        self.config: PushedConfig | None = None
        self.state = CONNECTING
        self.drops: dict[str, int] = dict.fromkeys(CLIENT_DROP_REASONS, 0)
        self._events: deque[Event] = deque()
        self._tun_out: list[bytes | tuple[Gso, bytes]] = []
        self._t_config: float | None = None
        self._t_ping: float | None = None
        self._t_retry: float | None = None
        self._t_fallback: float | None = None
        self._backoff = FIRST_BACKOFF
        self._config_confirmed = False
        self._config_when_confirmed = False  # a responder's session, not yet confirmed
        self._attempts_told = 0
        # Path MTU discovery (see the docstring).
        self.pmtu_enabled = pmtu
        self.raise_interval = raise_interval
        self.probe_timeout = probe_timeout
        self.pmtu_state: str | None = None  # None (not probing), CONFIRM or SEARCH
        self.path_mtu: int | None = None  # the MTU in force while probing
        self.probes_sent = 0
        self.probes_answered = 0
        self._pm_ceiling = 0
        self._pm_floor = MIN_MTU
        self._pm_next_id = 1
        self._pm_pending: dict[int, int] = {}  # probe id -> size, this round
        self._pm_sent: dict[int, float] = {}  # probe id -> when it was sent
        self._pm_srtt: float | None = None  # the answers' round-trip time (RFC 6298)
        self._pm_rttvar = 0.0
        self._pm_answered: set[int] = set()  # sizes answered this round
        self._pm_sizes: list[int] = []  # sizes probed this round
        self._pm_low = 0  # SEARCH: the largest size known to pass (0: none yet)
        self._pm_high = 0  # SEARCH: the smallest size known to fail
        self._pm_losses: dict[int, int] = {}  # SEARCH: size -> rounds it went unanswered
        self._pm_raise = False  # SEARCH: a raise attempt (else a black-hole search)
        self._pm_lost = 0  # CONFIRM: probes at the MTU unanswered in a row
        self._t_pmtu: float | None = None  # a round's end, or the next idle confirm
        self._pm_busy_due = float("inf")  # a large TUN packet after this confirms
        self._pm_raise_at: float | None = None
        # Failover (see the docstring).
        self.failover = failover
        self._endpoint_of = endpoint_of if endpoint_of is not None else _text_endpoint
        self.moves = 0  # relays joined after the first
        self._t_check: float | None = None  # the next check of the relay, when one runs
        self._check_since = 0.0  # when the check began: anything received since answers
        self._checks = 0  # check PINGs sent, unanswered so far
        self._t_measure: float | None = None
        self._moved_at = float("-inf")
        # The auto transport (see the docstring).  The configured relay's UDP address
        # (kept through a fallback, for the probes) and the TCP path (new_path()).
        self.auto = transport == "auto"
        self._udp_home: Hashable | None = endpoint if transport != "tcp" else None
        self._stream: Hashable | None = None
        self.reachability: str | None = None  # UDP_BLOCKED, NO_HANDSHAKE or None
        self.udp_probe_interval = udp_probe_interval
        self._probe_every = udp_probe_interval  # the interval now (backoff)
        self.probe_state: str | None = None  # PROBING, SWITCHING or None
        self.udp_probes = 0  # probes sent (status, tests)
        self.udp_returns = 0  # times back on UDP after a fallback
        self._t_probe: float | None = None  # the next UDP probe
        self._t_probe_wait: float | None = None  # the probe's (or the switch's) deadline
        self._t_unanswered: float | None = None  # when a silent TCP path means NoHandshake
        self._probe_handshake: object = None  # the last probe's pending handshake
        self._fell_back_at: float | None = None  # the last fallback, while on TCP
        self._blocked_told = True  # UdpBlocked said since the last fallback
        # Health requests (ask_health()): the next id, and those awaiting an answer.
        self._health_next = 1
        self._health_pending: dict[int, float] = {}
        for relay in known:
            self._know(relay)

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    def _move(self, cause: str) -> str:
        """Take the move TRANSITIONS has for `cause`; the state before it.  Raises
        LocalProtocolError for a move the table does not have (a bug here)."""
        before = self.state
        after = TRANSITIONS.get((before, cause))
        if after is None:
            raise LocalProtocolError(f"client core: no move from {before} on {cause!r}")
        self.state = after
        return before

    def _emit(self, event: Event) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append(event)
        else:
            self.drops["events_full"] += 1

    # --- outputs -------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def tun_writes(self) -> list[bytes | tuple[Gso, bytes]]:
        """Packets for the TUN: plain ones, and (header, super-packet) pairs."""
        out = self._tun_out
        self._tun_out = []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, object]]:
        return self.wg.datagrams_to_send()

    def get_timer(self) -> float | None:
        times = [
            t
            for t in (
                self.wg.get_timer(),
                self._t_config,
                self._t_ping,
                self._t_retry,
                self._t_fallback,
                self._t_pmtu,
                self._t_check,
                self._t_measure,
                self._t_probe,
                self._t_probe_wait,
                self._t_unanswered,
            )
            if t is not None
        ]
        return min(times) if times else None

    # --- inputs --------------------------------------------------------------------

    @property
    def mtu(self) -> int | None:
        """The MTU the device should have: the path's while probing, else the relay's
        (None before a configuration)."""
        if self.path_mtu is not None:
            return self.path_mtu
        return self.config.mtu if self.config is not None else None

    @property
    def device_mode(self) -> str | None:
        """The device's mode, "tun" or "tap": the user's choice, else the relay's (None
        until the relay has said)."""
        if self.mode is not None:
            return self.mode
        return self.config.mode if self.config is not None else None

    def ask_health(self, now: float) -> int | None:
        """Ask the relay in use what its edge last saw of its machine (HEALTH_REQUEST);
        the answer comes as HealthReceived with the id returned.  None when it cannot be
        asked: not connected, no configuration yet, or a relay that does not answer
        health requests (an older gtun: its configuration did not grant Caps.health).
        At most MAX_HEALTH_PENDING requests wait; a newer one forgets the oldest."""
        if not self.connected or self.config is None or not self.relay.caps.health:
            return None
        request_id = self._health_next
        self._health_next = request_id % tm.MAX_HEALTH_ID + 1
        pending = self._health_pending
        if len(pending) >= MAX_HEALTH_PENDING:
            del pending[next(iter(pending))]
        pending[request_id] = now
        self.wg.send(self.server, tm.push_health_request(request_id), now)
        self._drain(now)
        return request_id

    def set_endpoint(self, endpoint: Hashable | None) -> None:
        self.server.endpoint = endpoint

    def start(self, now: float) -> None:
        if self.transport == "auto" and self.server.endpoint is not None:
            self._t_fallback = now + FALLBACK_AFTER
        self.wg.initiate_handshake(self.server, now)
        if self.failover and self.transport != "tcp":
            for peer in self._others():
                self.wg.initiate_handshake(peer, now)  # the first to answer is joined
        self._drain(now)

    def new_path(self, endpoint: Hashable, now: float) -> None:
        """The daemon made a new path to the relay (a TCP connection): use it, and
        handshake on it now, not when WireGuard's rate limit (one initiation per
        REKEY_TIMEOUT) next allows."""
        self._stream = endpoint
        if self.probe_state == SWITCHING:
            return  # data goes over UDP now; this connection stays only should that fail
        if (
            self.state == CONNECTING
            and self._t_unanswered is None
            and self.reachability != NO_HANDSHAKE
        ):
            self._t_unanswered = now + NO_HANDSHAKE_AFTER
        self.server.endpoint = endpoint
        if self.server.has_session:
            # The relay moves this peer to the new path on the first authentic message;
            # the handshake covers a relay that restarted and forgot the session.
            self.wg.send_keepalive(self.server, now)
        self.server.last_initiation_sent = None
        self.wg.initiate_handshake(self.server, now)
        self._drain(now)

    def roamed(self, now: float) -> None:
        """The daemon saw the local address or route to the relay change: tell the
        relay where we are now (a keepalive, which it authenticates and follows), or
        handshake now when there is no session, not when the rate limit allows."""
        before = self._move("roamed")
        if before == REFUSED or self.server.endpoint is None:
            return
        if before == CONNECTED and self.server.has_session:
            self.wg.send_keepalive(self.server, now)
        else:
            self.server.last_initiation_sent = None
            self.wg.initiate_handshake(self.server, now)
        self._drain(now)

    def path_lost(self, endpoint: Hashable) -> None:
        """The daemon's path `endpoint` is gone (a closed TCP connection)."""
        if self._stream is endpoint:
            self._stream = None
        if self.server.endpoint is endpoint:
            self.server.endpoint = None

    def receive_datagram(self, data: bytes, addr: Hashable, now: float) -> None:
        peer = self.server
        switching = self.probe_state == SWITCHING
        rx = peer.rx_bytes  # grows only for an authentic transport message
        self.wg.receive_datagram(data, addr, now)
        self._drain(now)
        if self.auto and self._stream is not None:
            # The relay's first data over UDP after the switch: TCP may go.
            if (
                switching
                and peer is self.server
                and peer.rx_bytes != rx
                and addr == self._udp_for(peer)
            ):
                self._udp_back(now)
            self._pin()
        if self._config_when_confirmed and self.server.next is None:
            # The relay's first message under the session it started has arrived: the
            # request can now go under that session, not the old one it forgot.
            self._config_when_confirmed = False
            if self.connected and not self._config_confirmed:
                self._request_config(now)

    def tun_packet(self, packet: bytes, now: float) -> None:
        if self.config is None:
            self.drops["not_configured"] += 1
            return
        if self.device_mode == "tap":
            if len(packet) < l2frame.ETH_HEADER_LEN:
                self.drops["runt"] += 1
            elif len(packet) > l2frame.max_frame_for(self.config.mtu):
                self.drops["oversized"] += 1
            else:
                self.wg.send(self.server, l2frame.push_frame(packet), now)
                self._drain(now)
            return
        if tunnel_addresses(packet, self.drops) is None:
            return
        if now >= self._pm_busy_due and len(packet) > self._pm_floor:
            self._pmtu_busy(now)
        if self._t_check is None:
            self._suspect(now)
        self.wg.send(self.server, packet, now)
        self._drain(now)

    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None:
        """A TCP super-packet (or a packet whose checksum is ours to finish) from an
        offloading TUN (never a TAP device)."""
        if self.config is None:
            self.drops["not_configured"] += 1
            return
        if tunnel_addresses(packet, self.drops) is None:
            return
        if now >= self._pm_busy_due:
            self._pmtu_busy(now)
        if self._t_check is None:
            self._suspect(now)
        try:
            bulk.send_super(self.wg, self.server, hdr, packet, now)
        except OffloadError as exc:
            self.drops["too_big" if exc.reason == "too_big" else "bad_gso"] += 1
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        if self._t_config is not None and self._t_config <= now:
            self._t_config = None
            if not self._config_confirmed and self.connected:
                self._request_config(now)
        if self._t_ping is not None and self._t_ping <= now:
            self._t_ping = now + self.ping_interval
            last = self.server.last_received
            if self.connected and last is not None and now - last > self.dead_after:
                self._move("silence")
                self._config_confirmed = False
                self._emit(Disconnected(now - last))
                self._reconnecting(now)
                self._fail_over(now)
            self.wg.send(self.server, tm.push_message(tm.PING), now)
            if self._t_check is None and self._can_fail_over():
                self._check_since = now  # this PING is the check's first
                self._checks = 1
                self._t_check = now + CHECK_INTERVAL
        if self._t_check is not None and self._t_check <= now:
            self._t_check = None
            self._check(now)
        if self._t_measure is not None and self._t_measure <= now:
            self._measure(now)
        if self._t_retry is not None and self._t_retry <= now:
            self._t_retry = None
            self.wg.initiate_handshake(self.server, now)
        if self._t_fallback is not None and self._t_fallback <= now:
            self._t_fallback = None
            if not self.connected:
                self._fall_back(now)
        if self._t_unanswered is not None and self._t_unanswered <= now:
            self._t_unanswered = None
            if self.state == CONNECTING:
                self.reachability = NO_HANDSHAKE
                tried = ("UDP", "TCP") if self.auto else ("TCP",)
                self._emit(NoHandshake(tried, NO_HANDSHAKE_AFTER))
        if self._t_probe_wait is not None and self._t_probe_wait <= now:
            self._t_probe_wait = None
            self._probe_unanswered(now)
        if self._t_probe is not None and self._t_probe <= now:
            self._t_probe = None
            self._probe_udp(now)
        if self._t_pmtu is not None and self._t_pmtu <= now:
            self._t_pmtu = None
            self._pmtu_timer(now)
        self._drain(now)

    # --- internals -----------------------------------------------------------------

    def _request_config(self, now: float) -> None:
        request = tm.ConfigRequest(
            mode=self.mode,
            bulk=True,
            partial=self.accept_partial,
            pmtu=self.pmtu_enabled,
            relays=self.failover,
            health=True,
        )
        self.wg.send(self.server, tm.push_config_request(request), now)
        self._t_config = now + CONFIG_RETRY

    def _drain(self, now: float) -> None:
        while (event := self.wg.next_event()) is not None:
            # Data never comes as an event: the fast lane (on_packet) delivers it.
            if isinstance(event, HandshakeCompleted):
                self._handshake_rtt(event, now)
                if event.peer is not self.server:
                    self._other_session(event.peer, now)
                    continue
                self._backoff = FIRST_BACKOFF
                self._t_retry = None
                self._t_fallback = None
                self._t_unanswered = None
                if self.reachability == NO_HANDSHAKE:
                    self.reachability = None
                self._attempts_told = 0
                if self.auto and self.transport == "tcp":
                    self._handshake_on_tcp(now)
                if self._move("handshake") == CONNECTING:
                    self._emit(Connected())
                # Ask after every new session: the relay may have restarted or changed.
                self._config_confirmed = False
                if event.initiator or self.server.current is None:
                    self._request_config(now)
                else:
                    # The relay initiated (it restarted, or rekeys): until its first
                    # message confirms the new session we would still send under the
                    # old one, which a restarted relay cannot read.  CONFIG_RETRY
                    # covers a confirmation that never comes.
                    self._config_when_confirmed = True
                    self._t_config = now + CONFIG_RETRY
                if self._t_ping is None:
                    self._t_ping = now + self.ping_interval
            elif isinstance(event, HandshakeTimedOut):
                if event.peer is not self.server:
                    continue  # another relay: tried again at the next failover round
                self._t_retry = now + self._backoff
                self._emit(GaveUpRound(self._backoff))
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        if not self.connected:
            attempts = self.server.handshake_attempts
            if attempts > 0 and attempts != self._attempts_told:
                self._attempts_told = attempts
                self._emit(NoAnswer(attempts))

    def _on_packet(self, peer: object, plaintext: bytes, now: float) -> None:
        # An IP packet first: the per-packet path (padding trimmed).
        version = plaintext[0] >> 4
        if version == 4 or version == 6:
            if self.device_mode == "tap":
                self.drops["not_frame"] += 1
                return
            length = packet_length(plaintext)
            if length is None:
                self.drops["not_ip"] += 1
            else:
                self._tun_out.append(plaintext if length == len(plaintext) else plaintext[:length])
            return
        kind = tm.classify(plaintext)
        if kind == tm.FRAME:
            self._frame_from_relay(plaintext)
        elif kind == tm.BULK:
            self._bulk_from_relay(plaintext)
        elif plaintext[0] == 0:
            if peer is self.server:
                self._message_from_relay(plaintext, now)
            else:
                self.drops["not_current"] += 1
        elif self.device_mode == "tap":
            self.drops["not_frame"] += 1
        else:
            self.drops["not_ip"] += 1  # neither IP nor a gtun message

    def _frame_from_relay(self, plaintext: bytes) -> None:
        if self.config is None or self.device_mode != "tap":
            self.drops["malformed"] += 1
            return
        try:
            frame = l2frame.pull_frame(plaintext, l2frame.max_frame_for(self.config.mtu))
        except l2frame.L2FrameError as exc:
            self.drops[exc.reason] += 1
            return
        self._tun_out.append(frame)

    def _message_from_relay(self, plaintext: bytes, now: float) -> None:
        try:
            msg = tm.pull_message(plaintext)
            config = tm.parse_pushed_config(msg.payload) if msg.type == tm.CONFIG else None
        except tm.TunnelMessageError:
            self.drops["malformed"] += 1
            return
        if config is not None:
            if self.mode is not None and config.mode != self.mode:
                # A relay that does not check the requested mode.
                reason = f"this relay runs in {config.mode} mode; the client asked for {self.mode}"
                self._move("refused")
                self._emit(Refused(reason))
                return
            self._config_confirmed = True
            self._t_config = None
            changed = config != self.config
            self.config = config
            # Pad no further than the MTU, as WireGuard does: the relay then gets packets
            # it need not trim.  (_pmtu_configured lowers it to a smaller path MTU.)
            self.wg.mtu = config.mtu
            self.relay.caps = Caps(
                bulk=config.bulk,
                partial=config.partial and self.accept_partial,
                pmtu=config.pmtu and self.pmtu_enabled,
                health=config.health,
            )
            self._pmtu_configured(config, now)
            self._emit(ConfigReceived(config, changed))
            if config.relays_pushed:
                self._learn(config, now)
        elif msg.type == tm.PROBE_ACK:
            try:
                probe = tm.parse_probe(msg, len(plaintext))
            except tm.TunnelMessageError:
                self.drops["malformed"] += 1
                return
            self._pmtu_answer(probe, now)
        elif msg.type == tm.HEALTH:
            try:
                request_id = tm.health_id(msg)
            except tm.TunnelMessageError:
                self.drops["malformed"] += 1
                return
            if self._health_pending.pop(request_id, None) is not None:
                self._emit(HealthReceived(request_id, tm.pull_health(msg.payload)))
            # else late (forgotten) or never asked: nothing to tell
        elif msg.type == tm.REFUSED:
            self._move("refused")
            self._emit(Refused(str(msg.payload.get("reason", "refused"))))
        elif msg.type != tm.PONG:
            self.drops["malformed"] += 1

    # --- path MTU ----------------------------------------------------------------

    def _pmtu_configured(self, config: PushedConfig, now: float) -> None:
        """A CONFIG came: start probing, or stop (TCP, no cap), or take a new ceiling."""
        if not self.relay.caps.pmtu or self.transport == "tcp":
            self._pmtu_stop()
            return
        ceiling = config.mtu
        floor = MIN_MTU_IPV6 if config.address6 is not None else MIN_MTU
        self._pm_floor = min(floor, ceiling)
        self._pm_ceiling = ceiling
        if self.pmtu_state is None or self.path_mtu is None:
            self.path_mtu = ceiling
            self._pmtu_confirm(now)  # a path that is narrow from the start
        elif self.path_mtu > ceiling:
            self.path_mtu = ceiling  # the CONFIG itself tells the daemon
        elif self.path_mtu < ceiling and self._pm_raise_at is None:
            self._pm_raise_at = now + self.raise_interval  # a higher ceiling to try
            if self.pmtu_state == CONFIRM and not self._pm_pending:
                self._t_pmtu = min(self._t_pmtu or now, self._pm_raise_at)
        self.wg.mtu = self.path_mtu

    def _pmtu_stop(self) -> None:
        """No more probing: back to the relay's MTU (said, when the path's was lower)."""
        lowered = self.path_mtu
        self.pmtu_state = None
        self.path_mtu = None
        self._t_pmtu = None
        self._pm_busy_due = float("inf")
        self._pm_raise_at = None
        self._pm_pending.clear()
        if self.config is not None:
            self.wg.mtu = self.config.mtu
            if lowered is not None and lowered != self.config.mtu:
                self._emit(MtuChanged(self.config.mtu, "not probed any more; the relay's MTU"))

    def _pmtu_rtt(self, rtt: float) -> None:
        """A probe's round trip: the smoothed RTT and its variation (RFC 6298 2.2-2.3)."""
        srtt = self._pm_srtt
        if srtt is None:
            self._pm_srtt, self._pm_rttvar = rtt, rtt / 2
        else:
            self._pm_rttvar = 0.75 * self._pm_rttvar + 0.25 * abs(srtt - rtt)
            self._pm_srtt = 0.875 * srtt + 0.125 * rtt

    def _pmtu_timeout(self) -> float:
        """How long probes sent now wait: srtt + 4 rttvar, within MIN_PROBE_TIMEOUT and
        probe_timeout (the latter until an answer gave an RTT)."""
        if self._pm_srtt is None:
            return self.probe_timeout
        rto = self._pm_srtt + 4 * self._pm_rttvar
        return min(self.probe_timeout, max(MIN_PROBE_TIMEOUT, rto))

    def _pmtu_send(self, size: int, now: float) -> None:
        probe_id = self._pm_next_id
        self._pm_next_id = probe_id % tm.MAX_PROBE_ID + 1
        self._pm_pending[probe_id] = size
        self._pm_sent[probe_id] = now
        self.probes_sent += 1
        self.wg.send(self.server, tm.push_probe(tm.PROBE, probe_id, size, self.path_mtu), now)

    def _pmtu_confirm(self, now: float) -> None:
        """CONFIRM: one probe at the MTU now."""
        assert self.path_mtu is not None
        self.pmtu_state = CONFIRM
        self._pm_pending.clear()
        self._pm_sent.clear()
        self._pmtu_send(self.path_mtu, now)
        self._t_pmtu = now + self._pmtu_timeout()
        self._pm_busy_due = float("inf")  # one confirmation in flight at a time

    def _pmtu_busy(self, now: float) -> None:
        """A large packet is entering the tunnel and the last confirmation is old."""
        if self.pmtu_state == CONFIRM and not self._pm_pending and self.connected:
            self._pmtu_confirm(now)
        else:
            self._pm_busy_due = float("inf")  # the next answer re-arms it

    def _pmtu_idle(self, now: float) -> None:
        """CONFIRM with nothing in flight: when to confirm next, or raise now."""
        self.pmtu_state = CONFIRM
        self._pm_pending.clear()
        self._pm_busy_due = now + BUSY_CONFIRM
        at = now + IDLE_CONFIRM
        if self._pm_raise_at is not None:
            at = min(at, self._pm_raise_at)
        self._t_pmtu = at

    def _pmtu_timer(self, now: float) -> None:
        if self.pmtu_state == SEARCH:
            self._pmtu_round_end(now)
            return
        if self.pmtu_state != CONFIRM or self.path_mtu is None:
            return
        if self._pm_pending:  # a confirmation went unanswered
            self._pm_lost += 1
            if self._pm_lost >= MAX_PROBES:
                # The MTU itself stays a candidate: it must fail MAX_PROBES rounds of
                # the search too, so that random loss alone seldom lowers it.
                self._pm_lost = 0
                self._pmtu_search(0, self.path_mtu + 1, now)
            else:
                self._pmtu_confirm(now)
        elif not self.connected:
            self._pmtu_idle(now)
        elif self._pm_raise_at is not None and now >= self._pm_raise_at:
            self._pmtu_search(self.path_mtu, self._pm_ceiling + 1, now)
        else:
            self._pmtu_confirm(now)

    def _pmtu_answer(self, probe: tm.Probe, now: float) -> None:
        size = self._pm_pending.get(probe.id)
        if size is None:
            return  # late (its round is over), or not ours
        if probe.size < size:
            self.drops["malformed"] += 1  # an answer must be as long as its probe
            return
        del self._pm_pending[probe.id]
        self.probes_answered += 1
        self._pmtu_rtt(now - self._pm_sent.pop(probe.id, now))
        if self.pmtu_state == SEARCH:
            self._pm_answered.add(size)
            if not self._pm_pending:
                self._pmtu_round_end(now)
            return
        self._pm_lost = 0
        if self._pm_raise_at is not None and now >= self._pm_raise_at:
            assert self.path_mtu is not None
            self._pmtu_search(self.path_mtu, self._pm_ceiling + 1, now)
        else:
            self._pmtu_idle(now)

    def _pmtu_search(self, low: int, high: int, now: float) -> None:
        """SEARCH between `low` (passes; 0: nothing known) and `high` (fails)."""
        self.pmtu_state = SEARCH
        self._pm_low = low
        self._pm_high = high
        self._pm_losses = {}
        self._pm_busy_due = float("inf")
        self._pmtu_round(now)

    def _pmtu_candidates(self) -> list[int]:
        """The sizes strictly between the search's bounds worth probing: multiples of
        PMTU_STEP, the floor and the ceiling."""
        low, high = self._pm_low, self._pm_high
        floor, ceiling = self._pm_floor, self._pm_ceiling
        start = max(low + 1, floor)
        start += -start % PMTU_STEP
        sizes = set(range(start, min(high, ceiling + 1), PMTU_STEP))
        sizes.update(s for s in (floor, ceiling) if low < s < high)
        return sorted(sizes)

    def _pmtu_round(self, now: float) -> None:
        sizes = self._pmtu_candidates()
        if not sizes:
            self._pmtu_done(now)
            return
        if len(sizes) > PROBES_PER_ROUND:
            # Evenly spread, both ends included: the top (the path may carry it all)
            # and the bottom (the floor, on a black-hole search: is the path up at all?).
            last = len(sizes) - 1
            picks = {sizes[i * last // (PROBES_PER_ROUND - 1)] for i in range(PROBES_PER_ROUND)}
            sizes = sorted(picks)
        self._pm_pending.clear()
        self._pm_sent.clear()
        self._pm_answered = set()
        self._pm_sizes = sizes
        for size in reversed(sizes):
            self._pmtu_send(size, now)
        self._t_pmtu = now + self._pmtu_timeout()

    def _pmtu_round_end(self, now: float) -> None:
        self._pm_pending.clear()
        answered = self._pm_answered
        if answered:
            self._pm_low = max(self._pm_low, max(answered))
        losses = self._pm_losses
        for size in self._pm_sizes:
            if size not in answered and size > self._pm_low:
                losses[size] = losses.get(size, 0) + 1
                if losses[size] >= MAX_PROBES:  # lost in MAX_PROBES rounds: too big
                    self._pm_high = min(self._pm_high, size)
        if self._pm_low == 0 and all(losses.get(s, 0) < MAX_PROBES for s in self._pm_sizes):
            self._pmtu_round(now)  # nothing answered yet: again, before calling it dead
            return
        if self._pm_low == 0:
            # Not even the floor came back: the path is down, not narrow.  Keep the MTU
            # (the handshake timers deal with a dead path) and look again later.
            self._pmtu_idle(now)
            self._pm_busy_due = now + IDLE_CONFIRM
            return
        self._pmtu_round(now)

    def _pmtu_done(self, now: float) -> None:
        new, old = self._pm_low, self.path_mtu
        assert old is not None
        ceiling = self._pm_ceiling
        self._pm_lost = 0
        self._pm_raise_at = now + self.raise_interval if new < ceiling else None
        if new != old:
            self.path_mtu = new
            self.wg.mtu = new
            if new < old:
                reason = (
                    f"black hole: {old}-byte packets went unanswered {MAX_PROBES} times; "
                    f"{new} bytes pass"
                )
            else:
                reason = f"the path carries {new}-byte packets again" + (
                    "" if new == ceiling else f" (not {ceiling})"
                )
            self._emit(MtuChanged(new, reason))
        self._pmtu_idle(now)

    def _bulk_from_relay(self, plaintext: bytes) -> None:
        if self.config is None or self.device_mode == "tap":
            self.drops["malformed"] += 1
            return
        if not self.relay.caps.bulk:  # the relay's configuration did not grant them
            self.drops["not_negotiated"] += 1
            return
        try:
            self._tun_out.append(bulk.pull_bulk(plaintext))
        except (bulk.BulkError, OffloadError):
            self.drops["bad_bulk"] += 1

    # --- the auto transport ------------------------------------------------------------

    def _fall_back(self, now: float) -> None:
        """Transport "auto": UDP brought no handshake in FALLBACK_AFTER; TCP now."""
        self.transport = "tcp"
        self.server.endpoint = None
        self._stream = None
        self._pmtu_stop()
        self._fell_back_at = now
        self._blocked_told = False
        self._probe_every = self.udp_probe_interval
        self._emit(Fallback(FALLBACK_AFTER))

    def _reconnecting(self, now: float) -> None:
        """The relay was lost (silence, or check PINGs unanswered): over UDP with "auto",
        the fallback rules apply again; a UDP probe under way is over."""
        if self.probe_state is not None or self._t_probe is not None:
            self._probe_reset()
        if self.auto and self.transport != "tcp" and self.server.endpoint is not None:
            self._t_fallback = now + FALLBACK_AFTER

    def _udp_for(self, peer: Peer) -> Hashable | None:
        """Where `peer`, a relay, takes UDP: the configured relay's address (kept through
        a fallback), a pushed relay's endpoint; None when unknown."""
        data: RelayPeer = peer.data
        if data.configured:
            return self._udp_home
        if data.endpoint is None:
            return None
        try:
            return self._endpoint_of(data.endpoint)
        except ValueError:
            return None

    def _pin(self) -> None:
        """With both paths open, the core chooses the relay's endpoint, not WireGuard's
        roaming: the relay sends over UDP as soon as a probe reaches it, and what it
        sent over TCP before still arrives; neither may move this client off its path."""
        want = self._stream if self.transport == "tcp" else self._udp_for(self.server)
        if want is not None and self.server.endpoint != want:
            self.server.endpoint = want

    def _handshake_on_tcp(self, now: float) -> None:
        """A session with the relay while on TCP: a probe's answer when it came over UDP
        (then SWITCHING: data over UDP, TCP kept until the relay's data arrives over UDP
        too); else a session over TCP, after which UDP is probed: at once the first time
        after a fallback (was UDP blocked, or the relay down?), then at the interval."""
        peer = self.server
        udp = self._udp_for(peer)
        if udp is not None and peer.endpoint == udp:
            self.probe_state = SWITCHING
            self.transport = "auto"
            self._t_probe = None
            self._t_probe_wait = now + UDP_PROBE_WAIT
        elif self.probe_state is None and self._t_probe is None:
            self._t_probe = now if not self._blocked_told else now + self._probe_every

    def _probe_udp(self, now: float) -> None:
        """One UDP probe: a handshake initiation over UDP, while TCP carries the data."""
        peer = self.server
        udp = self._udp_for(peer)
        stream = self._stream
        if (
            self.transport != "tcp"
            or not self.connected
            or self.probe_state is not None
            or udp is None
            or stream is None
        ):
            return  # the next session over TCP arms it again
        if peer.handshake is not None and peer.handshake is not self._probe_handshake:
            self._t_probe = now + REKEY_TIMEOUT  # a rekey under way over TCP: after it
            return
        peer.endpoint = udp
        peer.last_initiation_sent = None  # now, not when the rate limit allows
        self.wg.initiate_handshake(peer, now)  # (an earlier probe's, unanswered, is gone)
        # Not retransmitted (WireGuard would, over TCP): it waits UDP_PROBE_WAIT.
        peer.t_retransmit = None
        peer.endpoint = stream
        self._probe_handshake = peer.handshake
        self.probe_state = PROBING
        self.udp_probes += 1
        self._t_probe_wait = now + UDP_PROBE_WAIT

    def _probe_unanswered(self, now: float) -> None:
        """UDP_PROBE_WAIT is over: no answer to the probe, or (SWITCHING) no data over
        UDP after it.  TCP carries the data (again); the next probe after a backoff."""
        state = self.probe_state
        if state is None:
            return
        self.probe_state = None
        if state == SWITCHING:
            self.transport = "tcp"
            self._pmtu_stop()
        peer = self.server
        if self._stream is not None:
            peer.endpoint = self._stream
            if peer.has_session:
                # The relay follows the latest authentic message: should the probe have
                # reached it (UDP blocked one way only), it sends over TCP again.
                self.wg.send_keepalive(peer, now)
        else:
            peer.endpoint = None  # the connection dropped meanwhile: the next brings it
        probe_in = self._probe_every
        self._probe_every = min(2 * probe_in, max(UDP_PROBE_MAX, self.udp_probe_interval))
        self._t_probe = now + probe_in
        if not self._blocked_told:
            self._blocked_told = True
            self.reachability = UDP_BLOCKED
            self._emit(UdpBlocked(probe_in))
        else:
            self._emit(UdpUnanswered(probe_in))

    def _udp_back(self, now: float) -> None:
        """SWITCHING, and the relay's data arrived over UDP: on UDP again."""
        self.probe_state = None
        self._t_probe = None
        self._t_probe_wait = None
        self._probe_every = self.udp_probe_interval
        self._blocked_told = True
        self.reachability = None
        self.udp_returns += 1
        since = self._fell_back_at
        self._fell_back_at = None
        self._emit(UdpBack(now - since if since is not None else 0.0))

    def _probe_reset(self) -> None:
        """No probe under way or due (the relay lost, or another joined): a SWITCHING
        client goes back to TCP; the next session over TCP arms a probe again."""
        if self.probe_state == SWITCHING:
            self.transport = "tcp"
            self._pmtu_stop()
            self.server.endpoint = self._stream
        self.probe_state = None
        self._t_probe = None
        self._t_probe_wait = None

    @property
    def next_udp_probe(self) -> float | None:
        """When UDP is tried next (the core's clock), with "auto" on TCP; else None."""
        return self._t_probe

    # --- failover --------------------------------------------------------------------

    def _others(self) -> list[Peer]:
        return [p for p in self.wg.peers.values() if p is not self.server]

    def _can_fail_over(self) -> bool:
        return self.failover and len(self.wg.peers) > 1

    def known_relays(self) -> tuple[KnownRelay, ...]:
        """Every relay learnt (with an endpoint as pushed), for the daemon to keep."""
        out = []
        for peer in self.wg.peers.values():
            data: RelayPeer = peer.data
            if data.endpoint is not None:
                out.append(KnownRelay(data.name, peer.public_key, data.endpoint))
        return tuple(sorted(out, key=lambda r: (r.name, r.public_key)))

    def relay_rtts(self) -> dict[bytes, float | None]:
        """Each known relay's smoothed handshake RTT (None: not measured yet)."""
        return {key: peer.data.rtt for key, peer in self.wg.peers.items()}

    def _know(self, relay: KnownRelay) -> bool:
        """Make `relay` a peer, or update it; False when it is refused (counted): our own
        key, a low-order key, or no room."""
        key = relay.public_key
        peer = self.wg.peers.get(key)
        if peer is not None:
            data: RelayPeer = peer.data
            changed = data.name != relay.name or data.endpoint != relay.endpoint
            if data.endpoint != relay.endpoint and not data.configured and peer is not self.server:
                peer.endpoint = self._udp_endpoint(relay.endpoint)
            data.name, data.endpoint = relay.name, relay.endpoint
            return changed
        if (
            len(key) != 32
            or key == self.wg.public_key
            or is_degenerate_key(key)
            or len(self.wg.peers) > MAX_RELAYS
        ):
            self.drops["bad_relay"] += 1
            return False
        try:
            self.wg.add_peer(
                key,
                preshared_key=self.preshared_key,
                endpoint=self._udp_endpoint(relay.endpoint),
                data=RelayPeer(name=relay.name, endpoint=relay.endpoint),
            )
        except ValueError:
            self.drops["bad_relay"] += 1
            return False
        return True

    def _udp_endpoint(self, text: str) -> Hashable | None:
        if self.transport == "tcp":
            return None  # the daemon dials it and calls new_path()
        try:
            return self._endpoint_of(text)
        except ValueError:
            return None

    def _learn(self, config: PushedConfig, now: float) -> None:
        """A push listed the network's relays: they replace those known (the relay in
        use and the configured one stay)."""
        self.drops["bad_relay"] += config.relays_dropped
        if not self.failover:
            return
        wanted = {r.public_key for r in config.relays}
        changed = False
        for peer in self._others():
            if peer.public_key not in wanted and not peer.data.configured:
                self.wg.remove_peer(peer)
                changed = True
        for relay in config.relays:
            changed = self._know(relay) or changed
        if changed:
            self._emit(RelaysLearned(self.known_relays()))
        if self._t_measure is None and self._others():
            self._t_measure = now + MEASURE_INTERVAL

    def _handshake_rtt(self, event: HandshakeCompleted, now: float) -> None:
        """A handshake this client initiated: its round trip, smoothed as RFC 6298's."""
        sent = event.peer.last_initiation_sent
        if not event.initiator or sent is None or now < sent:
            return
        data: RelayPeer = event.peer.data
        sample = now - sent
        data.rtt = sample if data.rtt is None else 0.75 * data.rtt + 0.25 * sample

    def _other_session(self, peer: Peer, now: float) -> None:
        """A session with a relay not in use: join it when the relay in use is lost, or
        when it is clearly nearer (its session is up: make-before-break)."""
        if self.state == REFUSED or not self.failover:
            return
        if not self.connected:
            self._join(peer, now, "it answered first while the relay in use did not")
            return
        cur, new = self.relay.rtt, peer.data.rtt
        if (
            cur is not None
            and new is not None
            and now - self._moved_at >= MOVE_HOLD
            and new < cur * MOVE_RATIO
            and cur - new > MOVE_MARGIN
        ):
            reason = f"handshake RTT {new * 1000:.1f} ms against {cur * 1000:.1f} ms"
            self._join(peer, now, reason)

    def _take(self, peer: Peer, now: float, reason: str) -> None:
        """Make `peer` the relay in use (its capabilities are the next CONFIG's)."""
        self.server = peer
        self.relay = peer.data
        self.relay.caps = NO_CAPS
        self._t_check = None
        self._checks = 0
        self._backoff = FIRST_BACKOFF
        self._t_retry = None
        self._t_fallback = None
        self._attempts_told = 0
        self._moved_at = now
        if self.transport == "tcp":
            self._stream = None  # the old relay's connection: the daemon dials the new
        if self.probe_state is not None or self._t_probe is not None:
            self._probe_reset()
        self.moves += 1
        self._health_pending.clear()  # asked of the old relay, whose answers are not taken
        self._pmtu_stop()  # the new relay's CONFIG starts it again
        self._emit(RelayChanged(self.relay.name, peer.public_key, self.relay.endpoint, reason))

    def _join(self, peer: Peer, now: float, reason: str) -> None:
        before = self._move("moved")
        self._take(peer, now, reason)
        if before != CONNECTED:
            self._emit(Connected())
        self._config_confirmed = False
        if peer.current is not None and peer.next is None:
            self._request_config(now)
        else:
            self._config_when_confirmed = True  # the relay initiated: wait for its word
            self._t_config = now + CONFIG_RETRY
        if self._t_ping is None:
            self._t_ping = now + self.ping_interval

    def _suspect(self, now: float) -> None:
        """Sending: when nothing came from the relay for SUSPECT_AFTER, check it."""
        last = self.server.last_received
        if (
            last is not None
            and now - last > SUSPECT_AFTER
            and self.connected
            and self._can_fail_over()
        ):
            self._check_since = now
            self._checks = 0
            self._check(now)

    def _check(self, now: float) -> None:
        """A check's step: answered (anything from the relay since it began) ends it;
        CHECK_PINGS unanswered PINGs lose the relay; else one more PING."""
        last = self.server.last_received
        if last is not None and last >= self._check_since:
            self._checks = 0
            return
        if not self.connected:
            return
        if self._checks >= CHECK_PINGS:
            self._checks = 0
            self._move("lost")
            self._config_confirmed = False
            self._emit(Disconnected(now - last if last is not None else 0.0))
            self._reconnecting(now)
            self._fail_over(now)
            return
        self._checks += 1
        self.wg.send(self.server, tm.push_message(tm.PING), now)
        self._t_check = now + CHECK_INTERVAL

    def _fail_over(self, now: float) -> None:
        """The relay in use is lost: over UDP, initiate to every known relay (the lost
        one too) and join the first to answer; over TCP, name the nearest other one."""
        if not self._can_fail_over():
            return
        if self.transport == "tcp":
            others = self._others()
            others.sort(key=lambda p: (p.data.rtt is None, p.data.rtt or 0.0, p.data.name))
            self._take(others[0], now, "the relay in use was lost")
            return
        for peer in self.wg.peers.values():
            if peer.endpoint is not None:
                peer.last_initiation_sent = None  # now, not when the rate limit allows
                self.wg.initiate_handshake(peer, now)

    def _measure(self, now: float) -> None:
        """One other relay's handshake RTT (the least recently measured), rarely."""
        self._t_measure = now + MEASURE_INTERVAL
        if not self.connected or not self._can_fail_over():
            return
        others = [p for p in self._others() if p.endpoint is not None]
        if others:
            peer = min(others, key=lambda p: p.last_handshake or float("-inf"))
            self.wg.initiate_handshake(peer, now)


def _text_endpoint(text: str) -> Hashable:
    return text
