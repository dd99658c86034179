"""Constants of the WireGuard protocol, and gtun's own tuning knobs, kept apart.

Protocol constants come from the WireGuard paper (Donenfeld, NDSS 2017), section 5.4
("Messages") and section 6 ("Timers & Stateless UX"), and match wireguard-go's
device/constants.go.  Changing them breaks interoperability.
"""

# --- Protocol: Noise parameters (paper 5.4) -------------------------------------------
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# --- Protocol: message types and sizes (paper 5.4.2 - 5.4.6) -------------------------
MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
AEAD_TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE
KEY_SIZE = 32
INDEX_SPACE = 1 << 32  # sender and receiver indexes are 32-bit integers (5.4.2)
MAC_SIZE = 16
TAI64N_SIZE = 12
PADDING_MULTIPLE = 16

# --- Protocol: timers and limits (paper section 6, wireguard-go constants.go) --------
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50.0  # at most 50 initiations per second per peer
REPLAY_WINDOW_SIZE = 8192 - 64  # counters kept by the sliding window (RFC 6479 style)

# --- gtun tuning knobs (not protocol; safe to change) --------------------------------
MAX_STAGED_PACKETS = 128  # packets held per peer while a handshake is under way
UNDER_LOAD_HANDSHAKES_PER_SECOND = 64  # above this rate, demand cookies (mac2)
UNDER_LOAD_HOLD = 1.0  # seconds to stay "under load" after the rate was exceeded
TAI64N_WHITENING_NS = 1 << 24  # round timestamps down so they do not leak a fine clock
# The per-source handshake limit (ratelimiter.py), wireguard-go's ratelimiter.go values:
HANDSHAKES_PER_SECOND_PER_SOURCE = 20.0  # packetsPerSecond
HANDSHAKE_BURST_PER_SOURCE = 5  # packetsBurstable
RATELIMITER_GC_INTERVAL = 1.0  # garbageCollectTime
RATELIMITER_MAX_ENTRIES = 8192  # sources tracked at once (the kernel's floor)
# Cookie replies per source under load (device.py): each answers a datagram whose source
# may be forged, so a flood from one address (or in a victim's name) gets at most this
# many a second, the rest dropped unanswered.  A client needs one per two minutes.
COOKIE_REPLIES_PER_SECOND_PER_SOURCE = 20.0
COOKIE_REPLY_BURST_PER_SOURCE = 5
# Relay workers sharing one UDP port (io/steering.py): each device's local indexes name
# its worker (index % workers).  More than a 2-socket VM or a 256-core host will use; it
# leaves every worker 2**32 / 1024 (4 million) indexes to draw from.
MAX_WORKERS = 1024
