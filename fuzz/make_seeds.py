"""Write the small seed corpus of every harness into fuzz/corpus/<harness>/ (run once;
the files are committed).  Inputs that drive a FuzzedDataProvider are bytes of a few
lengths; the others are real examples of what they parse."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = base64.b64encode(bytes(range(32, 64))).decode()

SERVER_TOML = f"""[server]
listen = "0.0.0.0:9621"
private_key_file = "server.key"
network = "10.66.0.0/24"
device = "gtun0"
mode = "tun"
mtu = 1420
routes = ["192.168.77.0/24"]
nat = true
dns = ["10.66.0.1"]
network6 = "fd66::/64"
metrics_listen = "127.0.0.1:9622"
state_dir = "/var/lib/gtun"
control_socket = "/run/gtun/server.sock"
endpoint = "vpn.example.com:9621"

[[peers]]
name = "alice"
public_key = "{KEY}"
address = "10.66.0.10"
subnets = ["192.168.88.0/24"]
"""

CLIENT_TOML = f"""[client]
server = "203.0.113.5:9621"
server_public_key = "{KEY}"
private_key_file = "client.key"
transport = "auto"
device = "gtun0"
control_socket = "/run/gtun/client.sock"
default_route = false
metrics_listen = "127.0.0.1:9623"
"""


def provider_seeds(rng: random.Random) -> list[bytes]:
    return [bytes(n) for n in (8, 64)] + [rng.randbytes(n) for n in (16, 64, 256, 1024)]


def main() -> None:
    rng = random.Random(1)
    frames = b"".join(len(m).to_bytes(2, "big") + m for m in (b"\x01" * 148, b"\x04" * 32))
    seeds = {
        "wg_device": provider_seeds(rng),
        "relay_peer": provider_seeds(rng),
        "offload_codec": provider_seeds(rng),
        "bulk_frames": provider_seeds(rng),
        "l2_frames": provider_seeds(rng),
        "tunnel_messages": provider_seeds(rng),
        "tcp_framing": [b"\x00\x00" + frames, b"\x02\x40\x80" + frames + b"\x00\x02ab"],
        "config_files": [b"\x00" + SERVER_TOML.encode(), b"\x01" + CLIENT_TOML.encode()],
        "control_socket": [
            json.dumps({"command": c}).encode() + b"\n" for c in ("status", "reload", "x")
        ],
        "tun_super": provider_seeds(rng),
        "tcp_connection": provider_seeds(rng),
    }
    for harness, inputs in seeds.items():
        folder = HERE / "corpus" / harness
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(inputs):
            (folder / f"seed-{i}").write_bytes(data)


if __name__ == "__main__":
    main()
